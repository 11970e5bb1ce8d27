"""Ours, not the paper's: replay's borrow gates (docs/design.md §6).

Once its stage is over a client's gate is its batch's frozen 0/1 mask, so the units a later batch owns are
invisible to it. A borrow gate per client and unit lets replay open some of them: how much client i reads
owned units outside its own batch's mask. Exactly zero until replay trains it, so it changes nothing before.
"""
import torch
import torch.nn as nn

import masks


class BorrowGates(masks.BatchGates):
    def __init__(self, num_batches, num_layers, hidden, num_clients, **kwargs):
        super().__init__(num_batches, num_layers, hidden, **kwargs)
        self.borrow = nn.Parameter(torch.zeros(num_clients, num_layers, hidden))

    def client_gate(self, client, batch, s):
        """The gate one client's weights are generated with: its batch's gate plus what it borrows."""
        gate = self.gate(batch, s)
        if not self.finished[batch]:
            return gate
        borrowable = (self.owned & (self.binary[batch] == 0)).float()
        return gate + self.borrow[client] * borrowable     # + 0.0 exactly while borrow is zero
