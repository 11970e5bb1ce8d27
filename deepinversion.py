"""Data-free replay: DeepInversion, and the replay that uses it (paper: the "data-free replay"; docs/design.md §5).

After stage t the server holds, for every new client j, only the weights it generates for j, the
BatchNorm statistics j uploaded and j's label counts. From these it dreams images (`synthesize`): starting
from noise, optimise the pixels so that at every BN layer the batch's per-channel mean and variance match
j's running statistics, j's model classifies them as targets drawn in proportion to j's label counts, and
image priors keep them smooth. Then `replay` fine-tunes each earlier client that holds one of the new
batch's classes on the new clients' dreams of its classes next to its own dreams, through its own embedding
row only: every batch's mask is frozen, and no earlier client is asked anything (they may be offline).

DeepInversion: Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from hypernet import run_model
from masks import ServerOptimizer

REFERENCE_BATCH = 256   # the batch size DeepInversion's CIFAR-10 weights (bn 10, TV 2.5e-5) were tuned for


# --------------------------------------------------------------------------------------------------
# 1. Synthesis
# --------------------------------------------------------------------------------------------------

def bn_statistics_loss(features, running_mean, running_var):
    """||mu(x) - running_mean||_2 + ||var(x) - running_var||_2 over channels, x = one BN layer's input
    (biased variance: what BN normalises a batch with)."""
    mean = features.mean(dim=(0, 2, 3))
    var = features.var(dim=(0, 2, 3), unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def bn_loss_hooks(model, losses):
    """Forward hooks on every BatchNorm2d of `model` that append its BN-statistics loss to `losses`; remove them
    afterwards (the public script never does). Inside functional_call, module.running_mean *is* the client's
    tensor passed in (under vmap a batched one), so one hook serves every client."""
    def hook(module, inputs, output):
        losses.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))
    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def teacher_forward(model, weights, bn_stats, images, losses):
    """All clients at once: images (C, N, 3, H, W), weights/bn_stats stacked on dim 0 -> logits (C, N, K), bn (C,)."""
    def one_client(w, b, x):
        losses.clear()
        return functional_call(model, (w, b), (x,)), torch.stack(losses).sum()
    return torch.func.vmap(one_client)(weights, bn_stats, images)


def draw_labels(label_counts, n, generator):
    """n targets in exact proportion to the counts (largest remainder, random ties), shuffled: with 64 images
    and two classes, multinomial draws alone would skew a client's dreams by several images."""
    quota = n * label_counts.double() / label_counts.sum()
    per_class = quota.floor().long()
    order = torch.randperm(len(quota), generator=generator)
    order = order[torch.argsort((quota - per_class)[order], descending=True, stable=True)]
    per_class[order[: n - int(per_class.sum())]] += 1
    labels = torch.repeat_interleave(torch.arange(len(quota)), per_class)
    return labels[torch.randperm(n, generator=generator)]


def image_priors(x):
    """Total variation per client, x (C, N, 3, H, W), as the reference computes it (four l2 norms of
    neighbour differences over the whole batch), rescaled to the reference batch so tv_weight keeps its meaning."""
    diffs = [x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:]]
    return sum(torch.linalg.vector_norm(d.flatten(1), dim=1) for d in diffs) * math.sqrt(REFERENCE_BATCH / x.shape[1])


def synthesize(model, teachers, *, num_images=64, iterations=200, lr=0.1, bn_weight=0.1, tv_weight=2.5e-5,
               jitter=2, flip=True, image_size=32, seed=0, progress=None):
    """Dreams from each teacher, (weights, BN statistics, label counts): what the server holds of a client,
    never images. Every teacher's pixels are optimised together in one vmapped computation (each loss
    depends only on its own pixels and Adam is elementwise, so it is C separate runs). Returns the images
    (C, N, 3, H, W), normalised, each teacher's best iterate; their labels (C, N); the BN losses of the
    starting noise and of the images (C,). `progress(iteration)`, if given, hears every iteration."""
    device = next(iter(teachers[0][0].values())).device
    C, N, S = len(teachers), num_images, image_size
    weights = {k: torch.stack([w[k].detach() for w, _, _ in teachers]) for k in teachers[0][0]}
    bn_stats = {k: torch.stack([b[k].detach() for _, b, _ in teachers]) for k in teachers[0][1]}
    g = torch.Generator().manual_seed(seed)     # a CPU generator: the same draws on any device
    x = torch.randn(C, N, 3, S, S, generator=g).to(device).requires_grad_()
    model.eval()                                # BN normalises with the client's running statistics
    losses = []
    hooks = bn_loss_hooks(model, losses)
    try:
        with torch.no_grad():
            _, bn_start = teacher_forward(model, weights, bn_stats, x, losses)
        labels = torch.stack([draw_labels(counts.cpu(), N, g) for _, _, counts in teachers]).to(device)
        optimizer = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
        best, best_loss = x.detach().clone(), torch.full((C,), math.inf, device=device)
        for it in range(iterations):
            optimizer.param_groups[0]["lr"] = 0.5 * (1 + math.cos(math.pi * it / iterations)) * lr
            # One shift and one flip for the whole batch, as in the reference (the flip is drawn even when off).
            dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist()
            do_flip = bool(torch.rand((), generator=g) < 0.5) and flip
            xj = torch.roll(x, shifts=(dx, dy), dims=(3, 4))
            xj = xj.flip(4) if do_flip else xj
            logits, bn = teacher_forward(model, weights, bn_stats, xj, losses)
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(C, N).mean(1)
            loss = ce + bn_weight * bn + tv_weight * image_priors(xj)
            # The loss was measured on the pixels before this step: those are what "best" keeps (a copy).
            better = loss.detach() < best_loss
            best_loss = torch.where(better, loss.detach(), best_loss)
            best = torch.where(better.view(C, 1, 1, 1, 1), x.detach(), best)
            x.grad, = torch.autograd.grad(loss.sum(), [x])      # no stray .grad on the model
            optimizer.step()
            if progress is not None:
                progress(it)
        with torch.no_grad():
            _, bn_end = teacher_forward(model, weights, bn_stats, best, losses)
    finally:
        for h in hooks:
            h.remove()
    return best, labels, bn_start, bn_end


# --------------------------------------------------------------------------------------------------
# 2. Replay: the earlier clients learn from the new clients' dreams
# --------------------------------------------------------------------------------------------------

def distillation_loss(student_logits, teacher_logits, temperature, weight=None):
    """Hinton's KD, KL(teacher || student) at temperature T times T^2; `weight` per image replaces the mean."""
    per_image = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                         F.softmax(teacher_logits / temperature, dim=1), reduction="none").sum(1) * temperature ** 2
    return per_image.mean() if weight is None else (per_image * weight).sum()


def who_replays(server, t):
    """(tried, teachers): the earlier clients that hold a class of batch t's, and the new clients that hold a
    class of some tried client (the others' dreams would reach no one). A client that never uploaded is out."""
    new = [j for j in server.batches[t] if j in server.label_counts]
    earlier = [i for k in range(t) for i in server.batches[k] if i in server.label_counts]
    held = {c: server.uploads(c)[1] > 0 for c in new + earlier}
    tried = [i for i in earlier if any(bool((held[i] & held[j]).any()) for j in new)]
    return tried, [j for j in new if any(bool((held[j] & held[i]).any()) for i in tried)]


def dream(server, dreamers, *, num_images, iterations, bn_weight, seed, progress=None):
    """{cid: (images, labels, teacher logits)} dreamed from each dreamer's generated model and upload, and
    the BN losses at the start and the end per dreamer."""
    teachers = [(server.hypernet.unflatten(server.generate(j)), *server.uploads(j)) for j in dreamers]
    images, labels, bn_start, bn_end = synthesize(
        server.model, teachers, num_images=num_images, iterations=iterations, bn_weight=bn_weight, seed=seed,
        image_size=server.image_size, progress=progress and (lambda it: progress("synthesis", it + 1, iterations)))
    with torch.no_grad():
        out = {j: (images[c], labels[c], run_model(server.model, weights, bn_stats, images[c]))
               for c, (j, (weights, bn_stats, _)) in enumerate(zip(dreamers, teachers))}
    return out, bn_start.tolist(), bn_end.tolist()


def fine_tuning_set(server, cid, images, labels, teacher_logits):
    """(the new clients' dreams of client cid's classes, cid's own dreams), each (images, labels, teacher
    logits): together they hold every class cid holds."""
    held = (server.uploads(cid)[1] > 0).to(server.dreams[cid][1].device)
    keep, keep_own = held[labels.to(held.device)], held[server.dreams[cid][1]]
    return tuple(t[keep] for t in (images, labels, teacher_logits)), tuple(t[keep_own] for t in server.dreams[cid])


def replay_loss(logits, y, soft, own, weight, *, kd_weight, anchor_weight, temperature):
    """Cross-entropy on the dreamed labels, KD toward each image's teacher and KD toward the client's own
    model before replay (the anchor), each image weighted by `weight`."""
    return ((F.cross_entropy(logits, y, reduction="none") * weight).sum()
            + kd_weight * distillation_loss(logits, soft, temperature, weight)
            + anchor_weight * distillation_loss(logits, own, temperature, weight))


def targets(server, cid, pool):
    """What client cid learns from `pool` (images, labels, teacher logits): the images; its classes; each label
    as a position among them; the teachers' and its own model's logits before replay (the anchor) on those
    classes; a weight per image that makes every class weigh the same (dreams of one class alone would tilt a
    two-class decision toward it)."""
    x, labels, teacher_logits = pool
    bn_stats, label_counts = server.uploads(cid)
    classes = (label_counts > 0).nonzero().flatten().to(labels.device)
    y = torch.searchsorted(classes, labels)
    per_class = torch.bincount(y, minlength=len(classes)).float()
    with torch.no_grad():
        own = run_model(server.model, server.hypernet.unflatten(server.generate(cid)), bn_stats, x)[:, classes]
    return x, classes, y, teacher_logits[:, classes], own, 1.0 / (per_class[y] * (per_class > 0).sum())


def loss_on(server, cid, target, **weights):
    """replay_loss of client cid's model as its embedding row now generates it, on `target` (targets())."""
    x, classes, y, soft, own, weight = target
    flat = server.hypernet([cid], [server.batch_of[cid]])[0]
    logits = run_model(server.model, server.hypernet.unflatten(flat), server.uploads(cid)[0], x)[:, classes]
    return replay_loss(logits, y, soft, own, weight, **weights)


def fine_tune(server, cid, new, own, *, steps, lr, keep, **weights):
    """Client cid's embedding row, fine-tuned with Adam on the new clients' dreams `new` and its own dreams `own`.

    keep "end": the end of the path, as the paper describes it. keep "own" (ours, docs/design.md §5): every
    other own dream is held out, never fitted, and the row keeps the point of the path (the start included)
    that explains them best: the server's only view of the client's own data decides, so what the new batch
    teaches is kept only where it does not cost the client what it knew."""
    if keep == "own":
        fit, held = [tuple(torch.cat([n, o[0::2]]) for n, o in zip(new, own)), tuple(o[1::2] for o in own)]
    else:
        fit, held = tuple(torch.cat(pair) for pair in zip(new, own)), None
    fit, held = targets(server, cid, fit), held and targets(server, cid, held)
    rows = server.hypernet.client_embeddings
    free = {"client_embeddings": torch.arange(len(rows), device=rows.device)[:, None] == cid}    # its row alone
    optimizer = ServerOptimizer({"client_embeddings": rows}, lr=lr)
    with torch.no_grad():
        best = (loss_on(server, cid, held, **weights), rows[cid].clone()) if held else None
    for _ in range(steps):
        grad, = torch.autograd.grad(loss_on(server, cid, fit, **weights), [rows])
        optimizer.step({"client_embeddings": grad}, free)
        if held:            # the point of the path that explains the held-out own dreams best
            with torch.no_grad():
                loss = loss_on(server, cid, held, **weights)
            best = (loss, rows[cid].clone()) if loss < best[0] else best
    if held:
        rows.detach()[cid] = best[1]


def replay(server, t, *, num_images, iterations, bn_weight, seed, progress=None, **fine_tuning):
    """After stage t: dream from batch t's clients, fine-tune every earlier client that holds one of their
    classes (each client's own dreams are made the first time it needs them, then kept in server.dreams).
    Returns the report: who was tried, who dreamed, the BN losses, the new clients' dreams."""
    tried, teachers = who_replays(server, t)
    report = {"tried": tried, "dreamers": teachers, "client_queries": 0, "bn_loss_start": [], "bn_loss_end": []}
    if not tried:
        return dict(report, images=torch.zeros(0, 3, server.image_size, server.image_size))
    dreamed, report["bn_loss_start"], report["bn_loss_end"] = dream(
        server, teachers + [i for i in tried if i not in server.dreams], num_images=num_images,
        iterations=iterations, bn_weight=bn_weight, seed=seed, progress=progress)
    server.dreams.update({i: dreamed[i] for i in tried if i in dreamed})
    images, labels, logits = (torch.cat([dreamed[j][n] for j in teachers]) for n in range(3))
    for n, i in enumerate(tried):
        fine_tune(server, i, *fine_tuning_set(server, i, images, labels, logits), **fine_tuning)
        if progress is not None:
            progress("fine-tune", n + 1, len(tried))
    return dict(report, images=images, labels=labels)
