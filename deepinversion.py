"""DeepInversion: images dreamed from a client's generated model and its BN statistics (paper: the synthesis
step of the "data-free replay"; docs/design.md §5).

After stage t the server holds, for every new client j, only (a) the weights its hypernetwork generated
for j, (b) the BatchNorm running statistics j uploaded and (c) j's label counts. From these it dreams a
batch of images per client: starting from noise, optimise the pixels so that
  - at every BN layer the batch's per-channel mean / variance of the BN *input* match j's running stats,
  - j's model classifies them as targets drawn in proportion to j's label counts,
  - image priors (total variation, l2) keep them smooth; random jitter and flips make them robust.
replay.py then uses them to fine-tune what belongs to each earlier client.

Owns: the BN-statistics loss and the removable hooks that compute it, the optimisation loop (several
clients in one vmapped computation), and save_grid for looking at the results.

DeepInversion: Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR
2020 (NVlabs/DeepInversion). Two known bugs of the public script are avoided here: its hooks are never
removed, and its "best" batch is an alias of the pixels being optimised, so it returns the last iterate.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.utils
from torch.func import functional_call

REFERENCE_BATCH = 256   # the batch size DeepInversion's CIFAR-10 weights (bn 10, TV 2.5e-5) were tuned for


@dataclass
class Teacher:
    """What the server holds about one new client: never images, never labels, only counts."""
    weights: dict           # parameter name -> generated tensor
    bn_stats: dict          # buffer name -> client's running_mean / running_var / num_batches_tracked
    label_counts: torch.Tensor   # (num_classes,) int64


@dataclass
class SynthesisResult:
    images: torch.Tensor    # (num_images, 3, H, W), normalised, a copy of the best iterate
    labels: torch.Tensor    # (num_images,) int64
    bn_loss_start: float    # BN-statistics loss of the initial noise
    bn_loss_end: float      # BN-statistics loss of `images`
    history: list           # total loss per iteration


def bn_statistics_loss(features, running_mean, running_var):
    """||mu(x) - running_mean||_2 + ||var(x) - running_var||_2 over channels, x = one BN layer's input.

    Biased variance: it is what BN normalises a batch with, and the reference compares it the same way.
    """
    mean = features.mean(dim=(0, 2, 3))
    var = features.var(dim=(0, 2, 3), unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


@contextmanager
def bn_loss_hooks(model, first_bn_multiplier=1.0):
    """Forward hooks on every BatchNorm2d of `model`; yields the list each forward appends its losses to.

    Inside torch.func.functional_call, module.running_mean *is* the client's tensor passed in (and under
    vmap a batched one), so one hook serves every client. The finally clause is the fix for the public
    script, whose hooks stayed on the teacher forever.
    """
    losses = []

    def make_hook(multiplier):
        def hook(module, inputs, output):
            losses.append(multiplier * bn_statistics_loss(inputs[0], module.running_mean, module.running_var))
        return hook

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(make_hook(first_bn_multiplier if i == 0 else 1.0)) for i, m in enumerate(bns)]
    try:
        yield losses
    finally:
        for h in handles:
            h.remove()


def teacher_forward(model, weights, bn_stats, images, losses, vmap=True):
    """All clients at once: images (C, N, 3, H, W), weights/bn_stats stacked on dim 0 -> logits (C, N, K), bn (C,)."""
    def one_client(w, b, x):
        losses.clear()
        logits = functional_call(model, (w, b), (x,))
        return logits, torch.stack(losses).sum()

    if vmap:
        return torch.func.vmap(one_client)(weights, bn_stats, images)
    outs = [one_client({k: v[c] for k, v in weights.items()}, {k: v[c] for k, v in bn_stats.items()}, images[c])
            for c in range(images.shape[0])]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def draw_labels(label_counts, n, generator):
    """n targets in proportion to the counts (largest remainder, random ties), then shuffled.

    Exact proportions rather than multinomial draws: with 64 images and two classes, sampling noise
    alone would skew a client's replay by several images.
    """
    quota = n * label_counts.double() / label_counts.sum()
    per_class = quota.floor().long()
    order = torch.randperm(len(quota), generator=generator)           # random tie-breaking ...
    order = order[torch.argsort((quota - per_class)[order], descending=True, stable=True)]
    per_class[order[: n - int(per_class.sum())]] += 1                  # ... among positive remainders only
    labels = torch.repeat_interleave(torch.arange(len(quota)), per_class)
    return labels[torch.randperm(n, generator=generator)]


def image_priors(x):
    """Total variation and l2 priors per client, x (C, N, 3, H, W), as in the reference scripts.

    TV is the sum of four l2 norms of neighbour differences over a client's whole batch: that grows like
    sqrt(N) while the other terms are batch means, so it is rescaled to its value at the reference batch
    size, and tv_weight keeps its meaning at any num_images.
    """
    diffs = [x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:]]
    tv = sum(torch.linalg.vector_norm(d.flatten(1), dim=1) for d in diffs) * math.sqrt(REFERENCE_BATCH / x.shape[1])
    l2 = torch.linalg.vector_norm(x.flatten(2), dim=2).mean(dim=1)    # mean per-image norm (ImageNet script)
    return tv, l2


def synthesize(model, clients, *, num_images=64, iterations=200, lr=0.1, bn_weight=0.1, first_bn_multiplier=1.0,
               tv_weight=2.5e-5, l2_weight=0.0, jitter=2, flip=True, image_size=32, seed=0, device=None,
               progress=None, vmap=True):
    """One batch of images per client; all clients' pixels are optimised together, in one computation.

    Each client's loss depends only on its own pixels and Adam is elementwise, so the joint run is the
    same as C separate runs (up to sharing the jitter/flip draws); `vmap=False` loops over clients instead.
    Always fp32, also under --amp: vmapped batch norm refuses bf16 activations against the clients' fp32
    running statistics (what CUDA autocast hands it), and matching those statistics is what synthesis is for.
    `progress(iteration, loss)`, if given, hears every iteration; loss is the summed loss as a 0-d tensor.
    """
    clients = [c if isinstance(c, Teacher) else Teacher(*c) for c in clients]
    device = torch.device(device) if device is not None else next(iter(clients[0].weights.values())).device
    C, N, S = len(clients), num_images, image_size
    # Frozen teachers: detached copies, so gradients can only reach the pixels.
    weights = {k: torch.stack([c.weights[k].detach() for c in clients]).to(device) for k in clients[0].weights}
    bn_stats = {k: torch.stack([c.bn_stats[k].detach() for c in clients]).to(device) for k in clients[0].bn_stats}
    g = torch.Generator().manual_seed(seed)     # CPU generator: the same draws on any device
    x = torch.randn(C, N, 3, S, S, generator=g).to(device).requires_grad_()
    was_training = model.training
    model.eval()                                # BN normalises with the client's running stats, as in DI
    try:
        with bn_loss_hooks(model, first_bn_multiplier) as losses:
            with torch.no_grad():
                logits, bn_start = teacher_forward(model, weights, bn_stats, x, losses, vmap)
            for c in clients:
                if c.label_counts.numel() != logits.shape[-1] or c.label_counts.sum() <= 0:
                    raise ValueError(f"label_counts must be {logits.shape[-1]} counts with a positive sum")
            labels = torch.stack([draw_labels(c.label_counts.cpu(), N, g) for c in clients]).to(device)
            optimizer = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
            best, best_loss, history = x.detach().clone(), torch.full((C,), math.inf, device=device), []
            for it in range(iterations):
                optimizer.param_groups[0]["lr"] = 0.5 * (1 + math.cos(math.pi * it / iterations)) * lr
                # One shift and one flip for the whole batch, as in the reference; drawn even when unused
                # so that turning flips off does not change the jitter sequence.
                dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist()
                do_flip = bool(torch.rand((), generator=g) < 0.5) and flip
                xj = torch.roll(x, shifts=(dx, dy), dims=(3, 4))
                xj = xj.flip(4) if do_flip else xj
                logits, bn = teacher_forward(model, weights, bn_stats, xj, losses, vmap)
                ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(C, N).mean(1)
                tv, l2 = image_priors(xj)
                loss = ce + bn_weight * bn + tv_weight * tv + l2_weight * l2
                # The loss was measured on the pixels before this step, so those are what "best" keeps;
                # torch.where writes a new tensor: a copy, never an alias of x.
                better = loss.detach() < best_loss
                best_loss = torch.where(better, loss.detach(), best_loss)
                best = torch.where(better.view(C, 1, 1, 1, 1), x.detach(), best)
                # autograd.grad rather than backward: no stray .grad on the model.
                x.grad, = torch.autograd.grad(loss.sum(), [x])
                optimizer.step()
                history.append(loss.detach())
                if progress is not None:     # the loss as a tensor: float() on it would sync a GPU every iteration
                    progress(it, loss.detach().sum())
            with torch.no_grad():
                _, bn_end = teacher_forward(model, weights, bn_stats, best, losses, vmap)
    finally:
        model.train(was_training)
    history = torch.stack(history).T.tolist() if history else [[] for _ in clients]
    return [SynthesisResult(best[c].clone(), labels[c].clone(), bn_start[c].item(), bn_end[c].item(), history[c])
            for c in range(C)]


def save_grid(images, mean, std, path, nrow=16):
    """Undo the normalisation, clamp to [0, 1] and write one PNG grid."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    torchvision.utils.save_image((images.detach() * std + mean).clamp(0, 1), path, nrow=nrow)
