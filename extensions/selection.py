"""Ours, not the paper's: replay with the earlier clients' selection and confirmation (docs/design.md §6).

The paper's replay (deepinversion.replay) keeps the end of each earlier client's fine-tuning path and asks
no client anything. This one fine-tunes each earlier client's embedding row and its borrow-gate row
(extensions.borrow: how much it reads units the new batch owns), and asks the client, online, twice:
  1. `improve_client`  the client scores the path on half of its validation split (`val_select`); the
                       best point is its proposal;
  2. `accept`          the client's other half (`val_confirm`) confirms it: a paired test on the per-image
                       loss, Holm's step-down over the replay's proposals, and no fewer images right. Every
                       client whose proposal fails, or that does not answer, stays bitwise where it was.
`--replay-control noise / noise-kd / own` (extensions/controls.py) feed the same pipeline something in their place.
"""
import math
from statistics import NormalDist

import torch
import torch.nn.functional as F

import data
import deepinversion as di
from extensions import controls
from hypernet import run_model
from masks import ServerOptimizer

HALVES = {"val_select": slice(0, None, 2), "val_confirm": slice(1, None, 2)}


class Halves:
    """A local client as selection asks it, on the halves of its own validation split; numbers go back,
    nothing else. (A Flower node answers the same questions through shell/flower_app.py.)"""

    def __init__(self, client):
        self.client = client

    def logits_on(self, flat, bn_stats, split):
        """(logits, labels) of the model it is sent on `split`, a minibatch of 128 at a time."""
        c = self.client
        x_all, y_all = c.x_val[HALVES[split]], c.y_val[HALVES[split]]
        weights = c.layout.unflatten(flat)
        c.model.eval()
        for start in range(0, len(y_all), 128):
            x = data.normalize(x_all[start:start + 128], c.mean, c.std)
            yield run_model(c.model, weights, bn_stats, x), y_all[start:start + 128]

    @torch.no_grad()
    def evaluate(self, flat, bn_stats, split):
        """(accuracy, mean loss) on `split`; NaN when it holds no image."""
        right, loss = [], torch.zeros((), dtype=torch.float64, device=self.client.y_val.device)
        for logits, y in self.logits_on(flat, bn_stats, split):
            right.append(logits.argmax(1) == y)
            loss += F.cross_entropy(logits, y, reduction="sum").double()
        if not right:
            return float("nan"), float("nan")
        right = torch.cat(right)
        return right.float().mean().item(), loss.item() / len(right)

    @torch.no_grad()
    def per_image(self, flat, bn_stats):
        """(right, loss) per image on val_confirm."""
        right, loss = [], []
        for logits, y in self.logits_on(flat, bn_stats, "val_confirm"):
            right.append(logits.argmax(1) == y)
            loss.append(F.cross_entropy(logits, y, reduction="none"))
        if not right:
            return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
        return torch.cat(right), torch.cat(loss)

    def confirm(self, flat_before, flat_after, bn_stats):
        """What the new model changes on val_confirm: images it gets right and the old one wrong and the
        reverse, and the mean per-image drop in loss with its standard error."""
        (right_before, loss_before), (right_after, loss_after) = (self.per_image(flat, bn_stats)
                                                                  for flat in (flat_before, flat_after))
        drop = (loss_before - loss_after).double()
        # Under two images there is no spread to test against: an infinite error, which accepts nothing.
        error = drop.std().item() / len(drop) ** 0.5 if len(drop) > 1 else float("inf")
        return (int((right_after & ~right_before).sum()), int((right_before & ~right_after).sum()),
                drop.mean().item() if len(drop) else 0.0, error)


def answer(question, *args):
    """The client's numbers, or None when it did not answer (unreachable, or NaN: no image to score on)."""
    try:
        numbers = question(*args)
    except (ConnectionError, TimeoutError):
        return None
    return None if numbers is None or any(math.isnan(v) for v in numbers) else numbers


def accept(confirmations, alpha):
    """Which proposals to keep, from {cid: (gained, lost, loss drop, its standard error)}.

    A one-sided paired test per client on the loss, z = drop / error, and Holm's step-down over the
    replay's proposals: the largest z must pass at level alpha / m, the next at alpha / (m - 1), and so on;
    the first that fails stops the rest. A proposal must also get at least as many images right as its start."""
    if alpha == 0:
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


def rows_of(hypernet):
    """{name: parameter} of what this replay may change, one row per client: the embedding and the borrow
    gate. Not the client's offsets: fitting those to dreams tilted the decision and lost on real images."""
    return {"client_embeddings": hypernet.client_embeddings, "gates.borrow": hypernet.gates.borrow}


@torch.no_grad()
def set_rows(params, cid, rows):
    for name, p in params.items():
        p[cid] = rows[name]


def improve_client(server, client, cid, pool, params, *, steps, lr, kd_weight, anchor_weight, temperature,
                   validate_every):
    """Fine-tune cid's rows of `params` on `pool`, the client scoring the path on val_select; the best point
    is its proposal, which val_confirm then reads. Leaves `params` as it found them.
    Returns (val before, val of the proposal, its rows or None, the confirmation or None, questions asked);
    all None but the questions when the client is offline."""
    bn_stats, start_flat = server.uploads(cid)[0], server.generate(cid)
    before = best_score = answer(client.evaluate, start_flat, bn_stats, "val_select")
    questions = 1
    if before is None:                          # offline: nothing is tried, nothing changes
        return None, None, None, None, questions
    target = di.targets(server, cid, pool)
    saved = {name: p.detach().clone() for name, p in params.items()}
    free = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in params.items()}
    for mask in free.values():
        mask[cid] = True
    optimizer, best = ServerOptimizer(params, lr=lr), None
    for step in range(1, steps + 1):
        loss = di.loss_on(server, cid, target, kd_weight=kd_weight, anchor_weight=anchor_weight,
                          temperature=temperature)
        optimizer.step(dict(zip(params, torch.autograd.grad(loss, list(params.values())))), free)
        if step % validate_every == 0 or step == steps:
            score = answer(client.evaluate, server.generate(cid), bn_stats, "val_select")
            questions += 1
            if score is None:                   # the client left mid-path: no proposal
                best = None
                break
            if score[0] > best_score[0] or (score[0] == best_score[0] and score[1] < best_score[1]):
                best_score, best = score, {name: p[cid].detach().clone() for name, p in params.items()}
    with torch.no_grad():                       # exactly the start again
        for name, p in params.items():
            p.copy_(saved[name])
    confirmation = None
    if best is not None:
        set_rows(params, cid, best)
        confirmation = answer(client.confirm, start_flat, server.generate(cid), bn_stats)
        questions += 1
        set_rows(params, cid, {name: saved[name][cid] for name in params})
        best = best if confirmation is not None else None
    return list(before), list(best_score), best, confirmation, questions


def dream_set(server, tried, teachers, control, report, *, num_images, iterations, bn_weight, seed, progress):
    """(images, labels, teacher logits, read): what the tried clients learn from, with `control`'s stand-in
    for the new clients' dreams; `read`: which dreams their own teacher reads as the class they were made for."""
    dreamers = ([] if control != "none" else teachers) + [i for i in tried if i not in server.dreams]
    dreamed = {}
    if dreamers:
        dreamed, report["bn_loss_start"], report["bn_loss_end"] = di.dream(
            server, dreamers, num_images=num_images, iterations=iterations, bn_weight=bn_weight, seed=seed,
            progress=progress)
    server.dreams.update({i: dreamed[i] for i in tried if i in dreamed})
    dreamed.update(controls.stand_ins(server, control, teachers, num_images=num_images, seed=seed)
                   if control != "none" else {})
    sources = report["dreamers"] = controls.sources(control, teachers)
    if not sources:
        own = server.dreams[tried[0]]
        return own[0][:0], own[1][:0], own[2][:0], None
    images, labels, teacher_logits = (torch.cat([dreamed[j][n] for j in sources]) for n in range(3))
    return images, labels, teacher_logits, (teacher_logits.argmax(1) == labels) if control == "none" else None


def replay(server, clients, t, *, num_images, iterations, bn_weight, steps, lr, kd_weight, anchor_weight,
           temperature, validate_every, confirm_alpha, control, seed, progress=None):
    """After stage t: dreams (or a control's stand-in), each tried client's proposal, Holm's acceptance."""
    earlier = [i for k in range(t) for i in server.batches[k]]
    report = {"mode": "ours", "control": control, "bn_loss_start": [], "bn_loss_end": [], "accepted": 0,
              "rejected": 0, "skipped": 0, "val_before": [], "val_after": [], "confirm": [], "tried": [],
              "kept": [], "unanswered": [], "client_queries": 0, "dreamers": []}
    tried, teachers = di.who_replays(server, t)
    if not tried:
        size = server.image_size
        return dict(report, images=torch.zeros(0, 3, size, size), labels=torch.zeros(0, dtype=torch.long),
                    read=None, teacher_reads=None, skipped=len(earlier))
    images, labels, teacher_logits, read = dream_set(
        server, tried, teachers, control, report, num_images=num_images, iterations=iterations,
        bn_weight=bn_weight, seed=seed, progress=progress)
    report.update(images=images, labels=labels, read=read,
                  teacher_reads=None if read is None else float(read.float().mean()))
    params, proposals, confirmations = rows_of(server.hypernet), {}, {}
    for n, i in enumerate(tried):
        asked = clients[i] if hasattr(clients[i], "confirm") else Halves(clients[i])
        pool = tuple(torch.cat(pair) for pair in zip(*di.fine_tuning_set(server, i, images, labels, teacher_logits)))
        before, after, best, confirmation, questions = improve_client(
            server, asked, i, pool, params, steps=steps, lr=lr, kd_weight=kd_weight, anchor_weight=anchor_weight,
            temperature=temperature, validate_every=validate_every)
        report["client_queries"] += questions
        if before is None:
            report["unanswered"].append(i)
        if best is not None:
            proposals[i], confirmations[i] = best, confirmation
        report["tried"].append(i)
        for key, value in zip(("val_before", "val_after", "confirm"), (before, after, list(confirmation or ()))):
            report[key].append(value)
        if progress is not None:
            progress("fine-tune", n + 1, len(tried))
    kept = accept(confirmations, confirm_alpha)
    for i in kept:                              # every other client stays exactly at its start
        set_rows(params, i, proposals[i])
    report.update(kept=kept, accepted=len(kept), rejected=len(tried) - len(kept), skipped=len(earlier) - len(tried))
    return report
