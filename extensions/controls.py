"""Ours, not the paper's: replay's controls (`--replay-control`, docs/design.md §6). Each feeds the same replay
pipeline something in place of the new clients' dreams, so that what replay gains from them can be told
apart from what it gains from selection alone:
  * `noise`: as many images, labels and teacher outputs that carry no knowledge;
  * `own`:   nothing from the new clients; the earlier client's own dreams alone.
"""
import torch

import deepinversion

CONTROLS = ("none", "noise", "own")


def noise_dreams(server, new_clients, *, num_images, seed):
    """In place of each new client's dreams: the pixels DeepInversion starts from (N(0, 1) in the normalised
    space the first convolution reads), labels drawn from the client's label counts as synthesis draws them,
    and zero (uniform) teacher logits. So the control removes exactly what synthesis adds."""
    g = torch.Generator().manual_seed(seed)
    size, out = server.image_size, {}
    for j in new_clients:
        counts = server.uploads(j)[1]
        images = torch.randn(num_images, 3, size, size, generator=g).to(counts.device)
        labels = deepinversion.draw_labels(counts.cpu(), num_images, g).to(counts.device)
        out[j] = (images, labels, torch.zeros(num_images, len(counts), device=counts.device))
    return out


def sources(control, teachers):
    """The new clients whose dreams (or stand-ins) the earlier clients learn from."""
    return [] if control == "own" else teachers
