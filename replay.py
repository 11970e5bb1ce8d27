"""Backward transfer by data-free replay (paper: the "data-free replay"; docs/design.md §5).

After stage t the server dreams images from the new batch's clients (deepinversion.synthesize, from the
weights it generates for them and the BN statistics and label counts they uploaded) and uses them to
improve every earlier client, without any client's data ever reaching it:

  1. `dream`            one vmapped DeepInversion run over batch t's clients, and their soft labels;
  2. `improve_client`   for one earlier client i, fine-tune what is i's alone (its embedding row, its borrow
                        gate row and its client offset) on the dreams of classes i holds, with KD toward the
                        dreaming teacher and toward i's own model; the client scores the path on half of its
                        validation split and the best point is proposed;
  3. `accept`           ours: the proposal is kept only if i's other validation half confirms it (a paired
                        McNemar test), otherwise i is restored bitwise;
  4. `backward_transfer` and `run_replay` put the steps together (and undo a replay that diverged).

The paper fine-tunes the global hypernetwork on the synthetic data with earlier masks frozen; that
replay writes only an earlier client's own rows, and the acceptance test, are ours (docs/design.md §5).
What replay needs of the server: its hypernetwork and target model, the batches, the clients' uploads
(`uploads(cid) -> (bn_stats, label_counts)`), `generate(cid)`, `image_size` and `faults`.
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import deepinversion
from hypernet import run_model
from masks import ServerOptimizer


def distillation_loss(student_logits, teacher_logits, temperature):
    """Hinton's KD: KL(teacher || student) at temperature T, times T^2 to keep gradients comparable."""
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), teacher,
                    reduction="batchmean") * temperature ** 2


def accept(gained, lost, z):  # ours
    """One-sided paired (McNemar) test on the client's confirmation images: did the update fix more
    images than it broke, by more than chance would? z = 1.645 lets noise through about 5 % of the time."""
    return gained > lost and (gained - lost) >= z * math.sqrt(gained + lost)


def held_uploads(server):
    """cid -> (bn_stats, label_counts) as the server holds them: the uploads without noise."""
    return lambda cid: (server.bn_stats[cid], server.label_counts[cid])


def dream(server, new_clients, uploads, *, num_images, iterations, bn_weight, seed, progress=None):
    """DeepInversion from each new client's generated model and upload: (images, labels, teacher logits,
    BN losses at the start and end per client). Each image's teacher is the client it was dreamed from."""
    teachers = [deepinversion.Teacher(server.hypernet.unflatten(server.generate(j)), *uploads(j))
                for j in new_clients]
    dreamed = deepinversion.synthesize(
        server.model, teachers, num_images=num_images, iterations=iterations, bn_weight=bn_weight, seed=seed,
        image_size=server.image_size,
        progress=None if progress is None else lambda it, loss: progress("synthesis", it + 1, iterations))
    server.model.eval()
    with torch.no_grad():
        teacher_logits = torch.cat([run_model(server.model, teacher.weights, teacher.bn_stats, d.images)
                                    for teacher, d in zip(teachers, dreamed)])
    return (torch.cat([d.images for d in dreamed]), torch.cat([d.labels for d in dreamed]), teacher_logits,
            [d.bn_loss_start for d in dreamed], [d.bn_loss_end for d in dreamed])


def improve_client(server, cid, batch, dreams, params, validate, confirm, uploads, *, steps, lr, kd_weight,
                   anchor_weight, temperature, validate_every, confirm_z):
    """Fine-tune earlier client `cid`'s own rows of `params` on the dreams of its classes; keep the best
    point of the path if its confirmation half agrees, else restore it bitwise.
    Returns (val before, val of the proposal, confirmation counts, accepted), or None with nothing to learn."""
    hypernet, model = server.hypernet, server.model
    images, labels, teacher_logits = dreams
    bn_stats, counts = uploads(cid)
    held = counts > 0
    keep = held.to(labels.device)[labels]
    if not keep.any():                          # no new client dreamed any class this client holds
        return None
    x, soft = images[keep], teacher_logits[keep]
    classes = held.nonzero().flatten().to(x.device)
    y = torch.searchsorted(classes, labels[keep])       # labels as positions in the client's own class list
    start_flat = server.generate(cid)
    with torch.no_grad():
        own = run_model(model, hypernet.unflatten(start_flat), bn_stats, x)[:, classes]
    saved = best = {name: p.detach().clone() for name, p in params.items()}
    free = {name: torch.zeros_like(p) for name, p in params.items()}
    for mask in free.values():
        mask[cid] = 1.0                         # only this client's rows may move
    optimizer = ServerOptimizer(params, kind="adam", lr=lr)
    before = best_score = validate(cid, start_flat)
    for step in range(1, steps + 1):
        logits = run_model(model, hypernet.unflatten(hypernet([cid], [batch])[0]), bn_stats, x)[:, classes]
        loss = (F.cross_entropy(logits, y) + kd_weight * distillation_loss(logits, soft[:, classes], temperature)
                + anchor_weight * distillation_loss(logits, own, temperature))
        optimizer.step(dict(zip(params, torch.autograd.grad(loss, list(params.values())))), free)
        if step % validate_every == 0 or step == steps:
            score = validate(cid, server.generate(cid))
            if score[0] > best_score[0] or (score[0] == best_score[0] and score[1] < best_score[1]):
                best_score, best = score, {name: p.detach().clone() for name, p in params.items()}
    counts = (0, 0)
    if best is not saved:                       # a proposal: the confirmation half has the last word
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best[name])
        counts = confirm(cid, start_flat, server.generate(cid))
        if not accept(*counts, confirm_z):
            best = saved
    with torch.no_grad():                       # the confirmed point of the path, or exactly the start
        for name, p in params.items():
            p.copy_(best[name])
    return list(before), list(best_score), list(counts), best is not saved


def backward_transfer(server, t, validate, confirm, *, num_images, iterations, bn_weight, steps, lr, kd_weight,
                      anchor_weight, temperature, validate_every, confirm_z, seed, progress=None, uploads=None):
    """After stage t: dream images from batch t's clients and use them to improve every earlier client.

    The clients take part on their own data, sending back numbers only: `validate(cid, flat) -> (accuracy,
    loss)` on half of the validation split, `confirm(cid, flat_before, flat_after) -> (gained, lost)` on
    the other half. `uploads(cid) -> (bn_stats, label_counts)`: what the server holds of a client (None:
    its own copies). `progress(phase, done, total)` hears ("synthesis", ...) then ("fine-tune", ...).
    Returns the report: BN losses, accepted / rejected / skipped counts, per-client scores, the images.
    No defaults here: train.py's DEFAULTS are the one place the settings live.
    """
    uploads = uploads or held_uploads(server)
    # A client whose every update was dropped, or that was never drawn for a round, uploaded nothing.
    new_clients = [j for j in server.batches[t] if j in server.label_counts]
    earlier = [(k, i) for k in range(t) for i in server.batches[k]]
    report = {"synthesis_s": 0.0, "bn_loss_start": [], "bn_loss_end": [], "accepted": 0, "rejected": 0,
              "skipped": 0, "val_before": [], "val_after": [], "confirm": [], "dreamers": list(new_clients)}
    if not new_clients:
        size = server.image_size
        return dict(report, skipped=len(earlier), images=torch.zeros(0, 3, size, size),
                    labels=torch.zeros(0, dtype=torch.long))
    start = time.time()
    images, labels, teacher_logits, report["bn_loss_start"], report["bn_loss_end"] = dream(
        server, new_clients, uploads, num_images=num_images, iterations=iterations, bn_weight=bn_weight,
        seed=seed, progress=progress)
    report.update(synthesis_s=time.time() - start, images=images, labels=labels,
                  # how many dreams their own teacher reads as the class they were dreamed for
                  teacher_reads=float((teacher_logits.argmax(1) == labels).float().mean()))
    hypernet = server.hypernet
    params = {"client_embeddings": hypernet.client_embeddings, "client_offsets": hypernet.client_offsets}
    if hypernet.gates is not None:
        params["gates.borrow"] = hypernet.gates.borrow
    if progress is not None:
        progress("fine-tune", 0, len(earlier))
    for n, (k, i) in enumerate(earlier):
        outcome = None if i not in server.label_counts else improve_client(
            server, i, k, (images, labels, teacher_logits), params, validate, confirm, uploads, steps=steps,
            lr=lr, kd_weight=kd_weight, anchor_weight=anchor_weight, temperature=temperature,
            validate_every=validate_every, confirm_z=confirm_z)
        if outcome is None:
            report["skipped"] += 1
        else:
            for key, value in zip(("val_before", "val_after", "confirm"), outcome):
                report[key].append(value)
            report["accepted" if outcome[3] else "rejected"] += 1
        if progress is not None:
            progress("fine-tune", n + 1, len(earlier))
    return report


def run_replay(server, clients, t, seed, settings, progress=None, uploads=None, audit=None):
    """backward_transfer after stage t, undone when it diverged (non-finite images, BN loss or weights).

    `settings`: backward_transfer's keyword arguments (train.replay_settings). `uploads`: as there.
    `audit(server, clients, t, report, uploads)`, if given, runs afterwards on the clients' side of the line
    (privacy.py, ours) and its figures go into the report as `audit`; it changes nothing.
    """
    # Replay writes only these: a copy undoes a divergence.
    changed = {name: p for name, p in server.hypernet.named_parameters()
               if name in ("client_embeddings", "client_offsets", "gates.borrow")}
    saved = {name: p.detach().clone() for name, p in changed.items()}

    def validate(cid, flat):            # runs on client cid: its own validation data, two numbers back
        return clients[cid].evaluate(flat, server.bn_stats[cid], split="val_select")

    def confirm(cid, flat_before, flat_after):      # on client cid too: two counts back
        return clients[cid].confirm(flat_before, flat_after, server.bn_stats[cid])

    replay_start = time.time()
    report = backward_transfer(server, t, validate, confirm, seed=seed + t, progress=progress, uploads=uploads,
                               **settings)
    report["replay_s"] = time.time() - replay_start
    finite = (bool(torch.isfinite(report["images"]).all()) and all(np.isfinite(report["bn_loss_end"]))
              and all(bool(torch.isfinite(p).all()) for p in changed.values()))
    report["dropped"] = not finite
    if not finite:
        server.faults["dropped_replays"] += 1
        with torch.no_grad():
            for name, p in changed.items():
                p.copy_(saved[name])
    if audit is not None:
        report["audit"] = None if report["dropped"] else audit(server, clients, t, report,
                                                                 uploads or held_uploads(server))
    return report
