"""Data-free replay: DeepInversion on a client's generated model, then backward transfer (paper: the
"data-free replay" for backward transfer; docs/design.md §5).

After stage t the server holds, for every new client j, only (a) the weights its hypernetwork generated
for j, (b) the BatchNorm running statistics j uploaded and (c) j's label counts. From these it dreams a
batch of images per client: starting from noise, optimise the pixels so that
  - at every BN layer the batch's per-channel mean / variance of the BN *input* match j's running stats,
  - j's model classifies them as targets drawn in proportion to j's label counts,
  - image priors (total variation, l2) keep them smooth; random jitter and flips make them robust.
backward_transfer then uses them to fine-tune what belongs to each earlier client (docs/design.md §5).

Owns: the BN-statistics loss and the removable hooks that compute it, the optimisation loop (several
clients in one vmapped computation), save_grid for looking at the results, and backward_transfer.

DeepInversion: Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR
2020 (NVlabs/DeepInversion). Two known bugs of the public script are avoided here: its hooks are never
removed, and its "best" batch is an alias of the pixels being optimised, so it returns the last iterate.
"""
import math
import time
from contextlib import contextmanager, nullcontext
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
            # .float(): under --amp the layer's input is bf16, too coarse for a variance; a no-op in fp32.
            losses.append(multiplier * bn_statistics_loss(inputs[0].float(), module.running_mean, module.running_var))
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


def jensen_shannon(teacher_logits, student_logits, temperature=3.0):
    """Adaptive DeepInversion's JS divergence per client, with its temperature and probability clamps."""
    p = F.softmax(student_logits / temperature, dim=-1)
    q = F.softmax(teacher_logits / temperature, dim=-1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    # the reference's KLDivLoss(log P, M): KL(M || P), summed over classes, averaged over the batch
    kl_p, kl_q = ((m * (m.log() - a.log())).sum(-1).mean(-1) for a in (p, q))
    return (0.5 * kl_p + 0.5 * kl_q).clamp(0.0, 1.0)


def synthesize(model, clients, *, num_images=64, iterations=200, lr=0.1, bn_weight=10.0, first_bn_multiplier=1.0,
               tv_weight=2.5e-5, l2_weight=0.0, jitter=2, flip=True, competition_weight=0.0, student=None,
               image_size=32, seed=0, device=None, progress=None, vmap=True, amp=False):
    """One batch of images per client; all clients' pixels are optimised together, in one computation.

    Each client's loss depends only on its own pixels and Adam is elementwise, so the joint run is the
    same as C separate runs (up to sharing the jitter/flip draws). `student` (x -> logits) is ADI's
    competitor, called on all clients' images at once; `vmap=False` loops over clients instead.
    `amp`: the teachers' forward and backward under bf16 autocast (the pixels and the losses stay fp32).
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
    # No autocast context at all when amp is off: fp32 synthesis is bitwise what it was without the option.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
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
                with autocast:
                    logits, bn = teacher_forward(model, weights, bn_stats, xj, losses, vmap)
                logits = logits.float()
                ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(C, N).mean(1)
                tv, l2 = image_priors(xj)
                loss = ce + bn_weight * bn + tv_weight * tv + l2_weight * l2
                if competition_weight > 0 and student is not None:
                    student_logits = student(xj.flatten(0, 1)).view(C, N, -1)
                    loss = loss + competition_weight * (1 - jensen_shannon(logits, student_logits))
                # The loss was measured on the pixels before this step, so those are what "best" keeps;
                # torch.where writes a new tensor: a copy, never an alias of x.
                better = loss.detach() < best_loss
                best_loss = torch.where(better, loss.detach(), best_loss)
                best = torch.where(better.view(C, 1, 1, 1, 1), x.detach(), best)
                # autograd.grad rather than backward: no stray .grad on the student or the model.
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


# --------------------------------------------------------------------------------------------------
# Backward transfer: the synthetic images improve earlier clients (docs/design.md §5)
# --------------------------------------------------------------------------------------------------

def distillation_loss(student_logits, teacher_logits, temperature):
    """Hinton's KD: KL(teacher || student) at temperature T, times T^2 to keep gradients comparable."""
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), teacher,
                    reduction="batchmean") * temperature ** 2


def accept(gained, lost, z):
    """One-sided paired (McNemar) test on the client's confirmation images: did the update fix more
    images than it broke, by more than chance would? z = 1.645 lets noise through about 5 % of the time."""
    return gained > lost and (gained - lost) >= z * math.sqrt(gained + lost)


def backward_transfer(server, t, validate, confirm, *, num_images, iterations, bn_weight, steps, lr, kd_weight,
                      anchor_weight, temperature, validate_every, confirm_z, seed, progress=None, uploads=None):
    """After stage t: dream images from batch t's clients and use them to improve every earlier client.

    The server uses only what it holds: its hypernetwork, each new client's BN statistics and label
    counts. The client takes part in two ways, on its own data, sending back numbers only:
    `validate(cid, flat) -> (accuracy, loss)` on half of its validation split, and `confirm(cid,
    flat_before, flat_after) -> (gained, lost)` on the other half.
    For earlier client i only what is i's alone may change: its embedding row, its borrow-gate row and
    its own offset of the classifier and BatchNorm weights (hypernet.client_offsets), so no other client can
    be disturbed. Every `validate_every` steps the client scores the current model; the best point of the
    path is proposed if it beats the start, and kept only if the confirmation half agrees (`accept`);
    otherwise i is restored bitwise. `anchor_weight` adds KD toward i's own model before replay.
    `progress(phase, done, total)`, if given, is called as it goes: ("synthesis", iteration, iterations),
    then ("fine-tune", earlier clients done, earlier clients).
    `uploads(cid) -> (bn_stats, label_counts)` is what the server holds of a client's statistics
    (privacy.uploads: noisy under --bn-noise); None reads the server's copies, as without noise. The report
    says which clients dreamed (`dreamers`, in the order of `images`).
    No defaults here: train.py's DEFAULTS are the one place the settings live.
    """
    from hypernet import ServerOptimizer, run_model   # local import: deepinversion.py stays standalone

    hypernet, model, gates = server.hypernet, server.model, server.hypernet.gates
    if uploads is None:
        def uploads(cid):
            return server.bn_stats[cid], server.label_counts[cid]
    # A new client whose every update was dropped uploaded no statistics: there is nothing to dream from.
    new_clients = [j for j in server.batches[t] if j in server.label_counts]
    earlier = [(k, i) for k in range(t) for i in server.batches[k]]
    if not new_clients:
        size = server.image_size
        return {"synthesis_s": 0.0, "bn_loss_start": [], "bn_loss_end": [], "accepted": 0, "rejected": 0,
                "skipped": len(earlier), "val_before": [], "val_after": [], "confirm": [],
                "images": torch.zeros(0, 3, size, size), "labels": torch.zeros(0, dtype=torch.long),
                "dreamers": []}
    teachers = [Teacher(hypernet.unflatten(server.generate(j)), *uploads(j)) for j in new_clients]
    start = time.time()
    dreamed = synthesize(model, teachers, num_images=num_images, iterations=iterations, bn_weight=bn_weight, seed=seed,
                         image_size=server.image_size, amp=getattr(server, "amp", False),
                         progress=None if progress is None else lambda it, loss: progress("synthesis", it + 1,
                                                                                           iterations))
    synthesis_s = time.time() - start
    images = torch.cat([d.images for d in dreamed])
    labels = torch.cat([d.labels for d in dreamed])
    model.eval()
    with torch.no_grad():       # each image's teacher is the client it was dreamed from
        teacher_logits = torch.cat([run_model(model, teacher.weights, teacher.bn_stats, d.images)
                                    for teacher, d in zip(teachers, dreamed)])

    params = {"client_embeddings": hypernet.client_embeddings, "client_offsets": hypernet.client_offsets}
    if gates is not None:
        params["gates.borrow"] = gates.borrow

    def better(a, b):
        return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])

    report = {"synthesis_s": synthesis_s, "bn_loss_start": [d.bn_loss_start for d in dreamed],
              "bn_loss_end": [d.bn_loss_end for d in dreamed], "accepted": 0, "rejected": 0, "skipped": 0,
              "val_before": [], "val_after": [], "confirm": [], "images": images, "labels": labels,
              "dreamers": list(new_clients)}
    if progress is not None:
        progress("fine-tune", 0, len(earlier))
    for n, (k, i) in enumerate(earlier):
        bn_i, counts_i = uploads(i)
        held = counts_i > 0
        keep = held.to(labels.device)[labels]
        if not keep.any():                      # no new client dreamed any class client i holds
            report["skipped"] += 1
            if progress is not None:
                progress("fine-tune", n + 1, len(earlier))
            continue
        x, y, soft = images[keep], labels[keep], teacher_logits[keep]
        classes = held.nonzero().flatten().to(x.device)
        y_local = torch.searchsorted(classes, y)       # labels as positions in i's own class list
        start_flat = server.generate(i)
        with torch.no_grad():
            own = run_model(model, hypernet.unflatten(start_flat), bn_i, x)[:, classes]
        saved = {name: p.detach().clone() for name, p in params.items()}
        best = saved
        free = {name: torch.zeros_like(p) for name, p in params.items()}
        for mask in free.values():
            mask[i] = 1.0
        optimizer = ServerOptimizer(params, kind="adam", lr=lr)
        before = best_score = validate(i, start_flat)
        for step in range(1, steps + 1):
            flat = hypernet([i], [k])[0]
            logits = run_model(model, hypernet.unflatten(flat), bn_i, x)[:, classes]
            loss = (F.cross_entropy(logits, y_local)
                    + kd_weight * distillation_loss(logits, soft[:, classes], temperature)
                    + anchor_weight * distillation_loss(logits, own, temperature))
            grads = torch.autograd.grad(loss, list(params.values()))
            optimizer.step(dict(zip(params, grads)), free)
            if step % validate_every == 0 or step == steps:
                score = validate(i, server.generate(i))
                if better(score, best_score):
                    best_score, best = score, {name: p.detach().clone() for name, p in params.items()}
        counts = (0, 0)
        if best is not saved:                   # a proposal: the confirmation half has the last word
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(best[name])
            counts = confirm(i, start_flat, server.generate(i))
            if not accept(*counts, confirm_z):
                best = saved
        with torch.no_grad():                   # the confirmed point of the path, or exactly the start
            for name, p in params.items():
                p.copy_(best[name])
        report["val_before"].append(list(before))
        report["val_after"].append(list(best_score))
        report["confirm"].append(list(counts))
        report["accepted" if best is not saved else "rejected"] += 1
        if progress is not None:
            progress("fine-tune", n + 1, len(earlier))
    return report
