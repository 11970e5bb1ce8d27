"""Backward transfer by data-free replay (paper: the "data-free replay"; docs/design.md §5).

After stage t the server dreams images from the new batch's clients (deepinversion.synthesize, from the
weights it generates for them and the BN statistics and label counts they uploaded) and uses them to
improve every earlier client, without any client's data ever reaching it:

  1. `dream`            one vmapped DeepInversion run over batch t's clients (and any earlier client about
                        to be improved whose own dreams the server does not hold yet), with soft labels;
  2. `improve_client`   for one earlier client i that holds a class of the new batch, fine-tune what is i's
                        alone (its embedding row, and its borrow-gate row: how much it reads units the new
                        batch owns) on the new clients' dreams of i's classes next to i's own dreams, every
                        class weighing the same, with KD toward each image's teacher and toward i's own
                        model; the client scores the path on half of its validation split, the best point
                        is its proposal;
  3. `accept`           ours: each proposal is confirmed on the client's other validation half (a paired
                        test on the per-image loss, Holm's step-down over the replay's proposals, and no
                        fewer images right); every client whose proposal fails is restored bitwise;
  4. `backward_transfer` and `run_replay` put the steps together (and undo a replay that diverged).

Two modes (`--replay`). `paper`: the server fine-tunes the hypernetwork on the dreams with every batch's
mask frozen, so no unit a batch owns is written, only each earlier client's own rows; it keeps the end of
the path and asks no client anything. `ours` (the default): the same fine-tuning, and the client's
selection and confirmation of step 2-3, so an earlier client must be online (one that does not answer is
left as it is). Two controls (`--replay-control`, ours) feed the same pipeline something else in place of
the new clients' dreams: `noise` (images, labels and teacher outputs that carry no knowledge) and `own`
(the earlier client's own dreams alone): if they gain as much, replay's gain is selection, not transfer
(docs/design.md §5).
What replay needs of the server: its hypernetwork and target model, the batches, the clients' uploads
(`uploads(cid) -> (bn_stats, label_counts)`), `generate(cid)`, `image_size`, `faults`, and `dreams`
(the dreams it keeps of each client, cid -> (images, labels, teacher logits); in its checkpoint).
"""
import math
import time
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

import deepinversion
from hypernet import run_model
from masks import ServerOptimizer


def distillation_loss(student_logits, teacher_logits, temperature, weight=None):
    """Hinton's KD: KL(teacher || student) at temperature T, times T^2 to keep gradients comparable.
    `weight` (one per image, summing to 1) replaces the batch mean."""
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    per_image = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), teacher,
                         reduction="none").sum(1) * temperature ** 2
    return per_image.mean() if weight is None else (per_image * weight).sum()


def accept(confirmations, alpha):  # ours
    """Which proposals to keep, from what each client's confirmation half says of its proposal:
    {cid: (gained, lost, loss drop, its standard error)}: images the proposal gets right and its start
    wrong and the reverse, and the mean per-image drop in loss with its standard error.

    A one-sided paired test per client on the loss, its z = drop / error, and Holm's step-down over the
    replay's proposals: the largest z must pass at level alpha / m (m proposals), the next at alpha / (m - 1),
    and so on; the first that fails stops the rest. So the chance that any update of a replay that changes
    nothing is kept stays below alpha however many clients it tries (one test at 5 % per client would keep
    such an update in about one replay of five when four clients propose). A proposal must also get at
    least as many images right as its start, so no client ends below where it started on those images.
    Every image counts in the loss, not only the few a small update flips, so a few hundred images per
    client give the test its power (docs/design.md §5)."""
    if alpha == 0:                              # keep nothing (the benchmarks decide afterwards)
        return []
    z = {cid: drop / error if error > 0 else (math.inf if drop > 0 else -math.inf)
         for cid, (_, _, drop, error) in confirmations.items()}
    kept = []
    for rank, cid in enumerate(sorted(z, key=z.get, reverse=True)):
        gained, lost, drop, _ = confirmations[cid]
        if not (drop > 0 and z[cid] >= NormalDist().inv_cdf(1 - alpha / (len(z) - rank))):
            break
        if gained >= lost:
            kept.append(cid)
    return kept


@torch.no_grad()
def set_rows(params, cid, rows):
    """Write client cid's rows of `params` ({name: row})."""
    for name, p in params.items():
        p[cid] = rows[name]


def replayed_rows(hypernet):
    """{name: parameter} of what replay may change, one row per client: the embedding and the borrow gate,
    through which a client reads units the new batch owns (that is where the new batch's knowledge is).
    Not its offset of the BatchNorm and classifier weights: fitting those to dreams tilted the decision and
    lost on real images (docs/results.md)."""
    rows = {"client_embeddings": hypernet.client_embeddings}
    if hypernet.gates is not None:
        rows["gates.borrow"] = hypernet.gates.borrow
    return rows


def held_uploads(server):
    """cid -> (bn_stats, label_counts) as the server holds them: the uploads without noise."""
    return lambda cid: (server.bn_stats[cid], server.label_counts[cid])


def dream(server, dreamers, uploads, *, num_images, iterations, bn_weight, seed, progress=None):
    """DeepInversion from each dreamer's generated model and upload, in one vmapped run: {cid: (images,
    labels, teacher logits)} and the BN losses at the start and end per dreamer. Each image's teacher is
    the client it was dreamed from."""
    teachers = [deepinversion.Teacher(server.hypernet.unflatten(server.generate(j)), *uploads(j))
                for j in dreamers]
    dreamed = deepinversion.synthesize(
        server.model, teachers, num_images=num_images, iterations=iterations, bn_weight=bn_weight, seed=seed,
        image_size=server.image_size,
        progress=None if progress is None else lambda it, loss: progress("synthesis", it + 1, iterations))
    server.model.eval()
    with torch.no_grad():
        out = {j: (d.images, d.labels, run_model(server.model, teacher.weights, teacher.bn_stats, d.images))
               for j, teacher, d in zip(dreamers, teachers, dreamed)}
    return out, [d.bn_loss_start for d in dreamed], [d.bn_loss_end for d in dreamed]


def noise_dreams(uploads, new_clients, *, num_images, image_size, seed):  # ours: the control `noise`
    """In place of each new client's dreams: as many images, labels and teacher outputs that carry no
    knowledge. The images are the pixels DeepInversion starts from (N(0, 1) in the normalised space the
    first convolution reads, so the first BN layer sees inputs of the data's scale), the labels are drawn
    from the client's label counts as synthesis draws them, the teacher's logits are zero (uniform). So
    the control removes exactly what synthesis adds: the images the new clients' models shaped."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j in new_clients:
        counts = uploads(j)[1]
        images = torch.randn(num_images, 3, image_size, image_size, generator=g).to(counts.device)
        labels = deepinversion.draw_labels(counts.cpu(), num_images, g).to(counts.device)
        out[j] = (images, labels, torch.zeros(num_images, len(counts), device=counts.device))
    return out


def own_class_targets(labels, teacher_logits, label_counts):
    """An earlier client's view of its fine-tuning set: its classes, each image's label as a position among
    them, the teachers' logits of those classes, and a weight per image that makes every class weigh the
    same (dreams of one class alone would tilt a two-class decision toward it: docs/results.md, "Why
    replay rarely helps")."""
    classes = (label_counts > 0).nonzero().flatten().to(labels.device)
    y = torch.searchsorted(classes, labels)
    per_class = torch.bincount(y, minlength=len(classes)).float()
    return classes, y, teacher_logits[:, classes], 1.0 / (per_class[y] * (per_class > 0).sum())


def replay_loss(logits, y, soft, own, weight, *, kd_weight, anchor_weight, temperature):
    """Cross-entropy on the dreamed labels, KD toward each image's teacher, and KD toward the client's own
    model before replay (the anchor), each image weighted by `weight`."""
    return ((F.cross_entropy(logits, y, reduction="none") * weight).sum()
            + kd_weight * distillation_loss(logits, soft, temperature, weight)
            + anchor_weight * distillation_loss(logits, own, temperature, weight))


def fine_tuning_set(server, cid, images, labels, teacher_logits, uploads):
    """The new clients' dreams of client cid's classes next to cid's own dreams (images, labels, teacher
    logits), so that every class it holds is in the set."""
    held = (uploads(cid)[1] > 0).to(server.dreams[cid][1].device)
    keep, keep_own = held[labels.to(held.device)], held[server.dreams[cid][1]]
    return tuple(torch.cat([new[keep], own[keep_own]]) for new, own in
                 zip((images, labels, teacher_logits), server.dreams[cid]))


def improve_client(server, cid, batch, dreams, params, validate, confirm, uploads, *, steps, lr, kd_weight,
                   anchor_weight, temperature, validate_every):
    """Fine-tune earlier client `cid`'s own rows of `params` on `dreams` (images of its classes, their
    labels and their teachers' logits), every class weighing the same, and score the path on the
    client's selection half; the best point is its proposal, which the client's confirmation half then
    reads. Leaves `params` exactly as it found them: accept() decides what is kept.
    `validate` None (the paper's replay): no client is asked and the end of the path is the proposal.
    A client that does not answer (validate or confirm gives None) gets no proposal.
    Returns (val before, val of the proposal, the proposal's rows of `params` or None if no point beat the
    start, what the confirmation half says of it (gained, lost, loss drop, its standard error))."""
    hypernet, model = server.hypernet, server.model
    x, labels, teacher_logits = dreams
    bn_stats, label_counts = uploads(cid)
    classes, y, soft, weight = own_class_targets(labels, teacher_logits, label_counts)
    start_flat = server.generate(cid)
    asks = validate is not None
    before = best_score = validate(cid, start_flat) if asks else None
    if asks and before is None:                 # offline: nothing is tried, nothing changes
        return None, None, None, None
    with torch.no_grad():
        own = run_model(model, hypernet.unflatten(start_flat), bn_stats, x)[:, classes]
    saved = {name: p.detach().clone() for name, p in params.items()}
    free = {name: torch.zeros_like(p) for name, p in params.items()}
    for mask in free.values():
        mask[cid] = 1.0                         # only this client's rows may move
    optimizer = ServerOptimizer(params, kind="adam", lr=lr)
    best = None
    for step in range(1, steps + 1):
        logits = run_model(model, hypernet.unflatten(hypernet([cid], [batch])[0]), bn_stats, x)[:, classes]
        loss = replay_loss(logits, y, soft, own, weight, kd_weight=kd_weight, anchor_weight=anchor_weight,
                           temperature=temperature)
        optimizer.step(dict(zip(params, torch.autograd.grad(loss, list(params.values())))), free)
        if asks and (step % validate_every == 0 or step == steps):
            score = validate(cid, server.generate(cid))
            if score is None:                   # the client left mid-path: no proposal
                best = None
                break
            if score[0] > best_score[0] or (score[0] == best_score[0] and score[1] < best_score[1]):
                best_score, best = score, {name: p[cid].detach().clone() for name, p in params.items()}
    if not asks:
        best = {name: p[cid].detach().clone() for name, p in params.items()}
    with torch.no_grad():                       # exactly the start again
        for name, p in params.items():
            p.copy_(saved[name])
    confirmation = (0, 0, 0.0, 0.0)
    if best is not None and asks:               # a proposal: the client's confirmation half measures its effect
        set_rows(params, cid, best)
        confirmation = confirm(cid, start_flat, server.generate(cid))
        set_rows(params, cid, {name: saved[name][cid] for name in params})
        if confirmation is None:
            best, confirmation = None, (0, 0, 0.0, 0.0)
    return (None if before is None else list(before), None if best_score is None else list(best_score), best,
            confirmation)


def who_replays(server, t, earlier, uploads):
    """(tried, teachers): the earlier clients that hold a class of batch t's, as (k, i), and the new clients
    that hold a class of some tried client (the others' dreams would reach no fine-tuning set)."""
    # A client whose every update was dropped, or that was never drawn for a round, uploaded nothing.
    new_clients = [j for j in server.batches[t] if j in server.label_counts]
    held = {c: uploads(c)[1] > 0 for c in new_clients + [i for _, i in earlier if i in server.label_counts]}
    new_classes = torch.stack([held[j] for j in new_clients]).any(0) if new_clients else None
    tried = [(k, i) for k, i in earlier if new_classes is not None and i in held
             and bool((held[i] & new_classes).any())]
    teachers = [j for j in new_clients if any(bool((held[j] & held[i]).any()) for _, i in tried)]
    return tried, teachers


def dream_set(server, tried, teachers, uploads, control, report, *, num_images, iterations, bn_weight, seed,
              progress):
    """(images, labels, teacher logits, read): what the tried clients learn from, with `control`'s stand-in
    for the new clients' dreams. Each tried client's own dreams are made the first time it needs them and
    kept in server.dreams. `read`: which dreams their own teacher reads as the class they were dreamed for."""
    dreamers = ([] if control != "none" else teachers) + [i for _, i in tried if i not in server.dreams]
    dreamed = {}
    if dreamers:
        dreamed, report["bn_loss_start"], report["bn_loss_end"] = dream(
            server, dreamers, uploads, num_images=num_images, iterations=iterations, bn_weight=bn_weight,
            seed=seed, progress=progress)
    server.dreams.update({i: dreamed[i] for _, i in tried if i in dreamed})     # kept for later replays
    if control == "noise":
        dreamed.update(noise_dreams(uploads, teachers, num_images=num_images, image_size=server.image_size,
                                    seed=seed))
    sources = [] if control == "own" else teachers
    report["dreamers"] = sources
    if not sources:
        own = server.dreams[tried[0][1]]
        return own[0][:0], own[1][:0], own[2][:0], None
    images, labels, teacher_logits = (torch.cat([dreamed[j][n] for j in sources]) for n in range(3))
    return images, labels, teacher_logits, (teacher_logits.argmax(1) == labels) if control == "none" else None


def backward_transfer(server, t, validate, confirm, *, num_images, iterations, bn_weight, steps, lr, kd_weight,
                      anchor_weight, temperature, validate_every, confirm_alpha, seed, mode, control,
                      progress=None, uploads=None):
    """After stage t: dream images from batch t's clients and use them to improve every earlier client
    that holds one of their classes.

    An earlier client i learns from the new clients' dreams of its classes, next to its own dreams (made
    from its own model the first time it needed them, then kept by the server as `server.dreams`), so
    that every class it holds is in its fine-tuning set: the new batch brings knowledge of the classes
    it shares, i's own dreams keep the rest where they were. Only the new clients that hold a class of
    some tried client are dreamed from (the others' dreams would reach no fine-tuning set).
    `mode` "ours": the clients take part on their own data, sending back numbers only: `validate(cid,
    flat) -> (accuracy, loss)` on half of the validation split, `confirm(cid, flat_before, flat_after) ->
    (gained, lost, loss drop, its standard error)` on the other half; None from either: the client did
    not answer and stays as it is. `mode` "paper": neither is called; every tried client keeps the end
    of its path. `control` (ours): "none", "noise" (noise_dreams in place of the new clients' dreams) or
    "own" (the client's own dreams alone). `uploads(cid) -> (bn_stats, label_counts)`: what the server
    holds of a client (None: its own copies). `progress(phase, done, total)` hears ("synthesis", ...)
    then ("fine-tune", ...).
    Returns the report: BN losses, accepted / rejected / skipped counts, per-client scores, the clients
    that did not answer, how many questions the clients were asked, the new clients' images. No defaults
    here: train.py's DEFAULTS are the one place the settings live.
    """
    if mode not in ("ours", "paper") or control not in ("none", "noise", "own"):
        raise ValueError(f"replay mode must be ours or paper and control none, noise or own: {mode}, {control}")
    uploads = uploads or held_uploads(server)
    asked = [0]                                 # questions put to clients: 0 in the paper's mode

    def counted(question):
        def ask(*args):
            asked[0] += 1
            return question(*args)
        return ask
    if mode == "paper":
        validate = confirm = None
    else:
        validate, confirm = counted(validate), counted(confirm)
    earlier = [(k, i) for k in range(t) for i in server.batches[k]]
    report = {"mode": mode, "control": control, "synthesis_s": 0.0, "bn_loss_start": [], "bn_loss_end": [],
              "accepted": 0, "rejected": 0, "skipped": 0, "val_before": [], "val_after": [], "confirm": [],
              "tried": [], "kept": [], "unanswered": [], "client_queries": 0, "dreamers": []}
    tried, teachers = who_replays(server, t, earlier, uploads)
    if not tried:
        size = server.image_size
        return dict(report, images=torch.zeros(0, 3, size, size), labels=torch.zeros(0, dtype=torch.long),
                    read=None, teacher_reads=None, skipped=len(earlier))
    start = time.time()
    images, labels, teacher_logits, read = dream_set(
        server, tried, teachers, uploads, control, report, num_images=num_images, iterations=iterations,
        bn_weight=bn_weight, seed=seed, progress=progress)
    report.update(synthesis_s=time.time() - start, images=images, labels=labels, read=read,
                  teacher_reads=None if read is None else float(read.float().mean()))
    params = replayed_rows(server.hypernet)
    if progress is not None:
        progress("fine-tune", 0, len(tried))
    proposals, confirmations = {}, {}
    for n, (k, i) in enumerate(tried):
        pool = fine_tuning_set(server, i, images, labels, teacher_logits, uploads)
        before, after, best, confirmation = improve_client(
            server, i, k, pool, params, validate, confirm, uploads, steps=steps, lr=lr, kd_weight=kd_weight,
            anchor_weight=anchor_weight, temperature=temperature, validate_every=validate_every)
        if mode == "ours" and before is None:
            report["unanswered"].append(i)
        if best is not None:
            proposals[i], confirmations[i] = best, confirmation
        report["tried"].append(i)
        for key, value in zip(("val_before", "val_after", "confirm"), (before, after, list(confirmation or ()))):
            report[key].append(value)
        if progress is not None:
            progress("fine-tune", n + 1, len(tried))
    kept = list(proposals) if mode == "paper" else accept(confirmations, confirm_alpha)
    for i in kept:                              # every other client stays exactly at its start
        set_rows(params, i, proposals[i])
    report.update(kept=kept, accepted=len(kept), rejected=len(tried) - len(kept),
                  skipped=len(earlier) - len(tried), client_queries=asked[0])
    return report


def run_replay(server, clients, t, seed, settings, progress=None, uploads=None, audit=None):
    """backward_transfer after stage t, undone when it diverged (non-finite images, BN loss or weights).

    `settings`: backward_transfer's keyword arguments (train.replay_settings). `uploads`: as there.
    `audit(server, clients, t, report, uploads)`, if given, runs afterwards on the clients' side of the line
    (shell/privacy.py, ours) and its figures go into the report as `audit`; it changes nothing.
    """
    # Replay writes only these: a copy undoes a divergence.
    changed = replayed_rows(server.hypernet)
    saved = {name: p.detach().clone() for name, p in changed.items()}

    def answer(question, *args):
        """None: the client did not answer (unreachable; or NaN, which is also what a client with no
        validation image to score on sends back)."""
        try:
            numbers = question(*args)
        except (ConnectionError, TimeoutError):
            return None
        return None if numbers is None or any(math.isnan(v) for v in numbers) else numbers

    def validate(cid, flat):            # runs on client cid: its own validation data, two numbers back
        return answer(clients[cid].evaluate, flat, server.bn_stats[cid], "val_select")

    def confirm(cid, flat_before, flat_after):      # on client cid too: four numbers back
        return answer(clients[cid].confirm, flat_before, flat_after, server.bn_stats[cid])

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
