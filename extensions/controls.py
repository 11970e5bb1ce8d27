"""Ours, not the paper's: replay's controls (`--replay-control`, docs/design.md §6). Each feeds the same replay
pipeline something in place of the new clients' dreams, and removes one thing:
  * `noise`:    noise images, the labels synthesis would draw, no teacher's outputs (zero logits): nothing of
                the new clients at all;
  * `noise-kd`: the same noise images with the new teachers' outputs as targets (their logits, and their argmax
                as the labels): the new models' function, distilled through inputs that carry nothing of the data;
  * `own`:      nothing from the new clients: the earlier client's own dreams alone.
With `--method pfeddsh` a control takes the dreams' place in the paper's replay (`replay` below, no selection);
with `--method pfeddsh-ext` in ours (selection.py). In the paper's mode the synthesis runs exactly as it does
for the dreams, so every tried client's own dreams are the same bits in each arm: only the new part differs.
"""
import torch

import deepinversion as di
from hypernet import run_model

CONTROLS = ("none", "noise", "noise-kd", "own")


def noise_dreams(server, new_clients, *, num_images, seed):
    """In place of each new client's dreams: the pixels DeepInversion starts from (N(0, 1) in the normalised
    space the first convolution reads), labels drawn from the client's label counts as synthesis draws them,
    and zero (uniform) teacher logits. So the control removes exactly what synthesis adds."""
    g = torch.Generator().manual_seed(seed)
    size, out = server.image_size, {}
    for j in new_clients:
        counts = server.uploads(j)[1]
        images = torch.randn(num_images, 3, size, size, generator=g).to(counts.device)
        labels = di.draw_labels(counts.cpu(), num_images, g).to(counts.device)
        out[j] = (images, labels, torch.zeros(num_images, len(counts), device=counts.device))
    return out


@torch.no_grad()
def read_by_teachers(server, noise):
    """noise-kd: each new client's noise images labelled by its generated model: its logits, and as the label
    the class it finds likeliest among those it holds (as the dreams' labels are drawn from its label counts)."""
    server.model.eval()
    out = {}
    for j, (images, _, _) in noise.items():
        bn_stats, counts = server.uploads(j)
        logits = run_model(server.model, server.hypernet.unflatten(server.generate(j)), bn_stats, images)
        held = (counts > 0).nonzero().flatten().to(logits.device)
        out[j] = (images, held[logits[:, held].argmax(1)], logits)
    return out


def stand_ins(server, control, new_clients, *, num_images, seed):
    """{new client: (images, labels, teacher logits)} that `control` puts where that client's dreams would be."""
    if control == "own":
        return {}
    noise = noise_dreams(server, new_clients, num_images=num_images, seed=seed)
    return read_by_teachers(server, noise) if control == "noise-kd" else noise


def sources(control, teachers):
    """The new clients whose dreams (or stand-ins) the earlier clients learn from."""
    return [] if control == "own" else teachers


def replay(server, t, control, *, num_images, iterations, bn_weight, seed, progress=None, **fine_tuning):
    """deepinversion.replay, the paper's, with `control`'s stand-ins where the new clients' dreams would be."""
    tried, teachers = di.who_replays(server, t)
    report = {"tried": tried, "dreamers": sources(control, teachers), "control": control, "client_queries": 0,
              "bn_loss_start": [], "bn_loss_end": []}
    if not tried:
        return dict(report, images=torch.zeros(0, 3, server.image_size, server.image_size))
    # Dream as the paper's replay does (the new clients' dreams are made and then not used): the tried
    # clients' own dreams come out of the same synthesis, bit for bit.
    dreamed, report["bn_loss_start"], report["bn_loss_end"] = di.dream(
        server, teachers + [i for i in tried if i not in server.dreams], num_images=num_images,
        iterations=iterations, bn_weight=bn_weight, seed=seed, progress=progress)
    server.dreams.update({i: dreamed[i] for i in tried if i in dreamed})
    given = stand_ins(server, control, teachers, num_images=num_images, seed=seed)
    parts = [given[j] for j in report["dreamers"]] or [tuple(t[:0] for t in server.dreams[tried[0]])]
    images, labels, logits = (torch.cat([part[n] for part in parts]) for n in range(3))
    for n, i in enumerate(tried):
        di.fine_tune(server, i, *di.fine_tuning_set(server, i, images, labels, logits), **fine_tuning)
        if progress is not None:
            progress("fine-tune", n + 1, len(tried))
    return dict(report, images=images, labels=labels)


def install(server, control):
    """Make the core server's replay `control`'s (the shell calls this for `--method pfeddsh --replay-control`)."""
    server.replay = lambda clients, t, seed, progress=None: replay(
        server, t, control, seed=seed + t, progress=progress, **server.replay_settings)
    return server
