"""Ours, not the paper's: each batch's low-rank adapters of the convolutions and each client's offsets of
its BatchNorm and classifier weights (docs/design.md §6), on top of the core's hypernetwork.

Once batch 0 has finished, the shared base and every owned unit are frozen (that is what keeps earlier
clients bitwise unchanged), so a new batch can adapt only through the few free units. `BatchAdapters`
gives every later batch a rank-r offset U_b V_b of every convolution (LoRA: Hu et al., ICLR 2022), r the
largest rank whose cost fits `budget` x the model's weights once the clients' own offsets are counted;
`ExtendedHyperNetwork.client_offsets` gives every client an offset of its non-convolution weights.
Both start at exactly zero, so they change nothing before they train.
"""
import math

import torch
import torch.nn as nn

import hypernet as hn


class BatchAdapters(nn.Module):
    def __init__(self, layout, num_batches, budget, reserved=0):
        super().__init__()
        self.layout = layout
        self.conv_dims = {name: (shape[0], shape[1:].numel())              # (out, in * k * k)
                          for name, shape in zip(layout.names, layout.shapes) if len(shape) == 4}
        per_rank = sum(o + i for o, i in self.conv_dims.values())
        self.rank = r = max(0, int((budget * layout.num_weights - reserved) // per_rank))
        self.lora_out = nn.Parameter(torch.zeros(num_batches, sum(o * r for o, _ in self.conv_dims.values())))
        # V ~ N(0, 1/r): an Adam step on U then moves each weight by about the learning rate, as a full offset would.
        self.lora_in = nn.Parameter(torch.randn(num_batches, sum(r * i for _, i in self.conv_dims.values()))
                                    / math.sqrt(max(r, 1)))

    def per_batch_cost(self):
        return self.lora_out.shape[1] + self.lora_in.shape[1]

    def forward(self, batch_ids):
        """(len(batch_ids), num_weights) offsets, one row per client in the call (zero off the convolutions)."""
        n, r = len(batch_ids), self.rank
        outs = self.lora_out[batch_ids].split([o * r for o, _ in self.conv_dims.values()], dim=1)
        ins = self.lora_in[batch_ids].split([r * i for _, i in self.conv_dims.values()], dim=1)
        pieces = iter(zip(outs, ins, self.conv_dims.values()))
        flat = []
        for name, numel in zip(self.layout.names, self.layout.numels):
            if name in self.conv_dims:
                u, v, (o, i) = next(pieces)
                flat.append((u.view(n, o, r) @ v.view(n, r, i)).view(n, numel))
            else:
                flat.append(self.lora_out.new_zeros(n, numel))
        return torch.cat(flat, dim=1)

    def free_masks(self, batch):
        """A batch writes its own adapter, never another's; batch 0 trains the shared base instead."""
        masks = {}
        for name, p in self.named_parameters():
            own = torch.zeros_like(p, dtype=torch.bool)
            own[batch] = batch > 0
            masks[f"adapters.{name}"] = own
        return masks


class ExtendedHyperNetwork(hn.HyperNetwork):
    """The core's hypernetwork plus the client offsets, the batch adapters (adapter_budget > 0) and the
    borrow gates of extensions.borrow (its `gates`)."""

    def __init__(self, target, num_clients, *, gates, adapter_budget, **kwargs):
        super().__init__(target, num_clients, gates=gates, **kwargs)
        # Registered before the clients' classifiers, as they were when this lived in the core: the server
        # clips the joint gradient norm summed in this order, and same_numbers compares bits.
        classifiers = self.client_classifiers
        del self.client_classifiers
        self.register_buffer("non_conv_index", self.layout.index_of(lambda name, shape: len(shape) < 4))
        self.client_offsets = nn.Parameter(torch.zeros(num_clients, len(self.non_conv_index)))
        self.client_classifiers = classifiers
        self.adapters = None
        if adapter_budget > 0:
            num_batches = gates.embeddings.shape[0]
            self.adapters = BatchAdapters(self.layout, num_batches, adapter_budget,
                                          reserved=math.ceil(num_clients / num_batches) * self.client_offsets.shape[1])

    def gate_of(self, client, batch, s):
        return self.gates.client_gate(client, batch, s)

    def personalise(self, weights, ids, batch_of_client):
        if self.adapters is not None:
            weights = weights + self.adapters(torch.as_tensor(batch_of_client, device=weights.device))
        weights = super().personalise(weights, ids, batch_of_client)
        return weights.index_add(1, self.non_conv_index, self.client_offsets[ids])
