"""Clients, the server, and progressive client onboarding (paper: the PCO-FL protocol; docs/design.md §1-§3).

Owns:
  * Client      holds its own data (never leaves it); trains the weights it is sent for K local SGD
                steps and returns a ClientUpdate: a weight delta, its BatchNorm statistics and its label
                COUNTS. No images and no per-sample labels ever reach the server: the type says so.
  * Server      owns the hypernetwork, the clients' embeddings, masks and BN statistics. It generates,
                updates, and has one place where a stage starts (`begin_stage`) and one where it ends
                (`end_stage`: masks are frozen there; `onboard` then runs replay).
  * onboard     the protocol: batch t trains for R rounds, then every client seen so far is evaluated
                on its own test split with its generated model, filling the accuracy matrix A[t][i].
                The baselines (baselines.py) stand in for Server in the same loop.
  * metrics     mean accuracy (unweighted and sample-weighted) and RI, retro-active improvement.
"""
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import data
import hypernet as hn
import privacy


@dataclass
class ClientUpdate:
    """Everything a client uploads after local training. Deliberately no images, no per-sample labels."""
    delta: torch.Tensor          # flat: trained weights - received weights
    bn_stats: dict               # its BatchNorm running statistics after training
    label_counts: torch.Tensor   # (num_classes,) how many training images of each class it holds
    loss: float                  # mean local training loss, for the progress bar


class Client:
    def __init__(self, cid, dataset, split, model, unflatten, flatten, seed, amp=False):
        self.cid = cid
        self.x_train, self.y_train = dataset.x_train[split.train], dataset.y_train[split.train]
        self.x_val, self.y_val = dataset.x_train[split.val], dataset.y_train[split.val]
        self.x_test, self.y_test = dataset.x_test[split.test], dataset.y_test[split.test]
        self.classes = split.classes
        self.mean, self.std = dataset.mean, dataset.std
        self.label_counts = torch.bincount(self.y_train, minlength=dataset.num_classes).cpu()
        self.model, self.unflatten, self.flatten = model, unflatten, flatten
        # Each client draws its own minibatches and augmentations from its own generator, so the
        # order in which the server visits clients does not change what any one client sees.
        self.generator = torch.Generator(device=self.x_train.device).manual_seed(seed * 100_003 + cid)
        # --amp: training and evaluation under bf16 autocast. Off (the default) means no autocast context
        # at all, so fp32 runs compute exactly what they did before the flag existed.
        self.amp = amp

    def local_train(self, flat_weights, bn_stats, steps, batch_size, lr, momentum=0.9, weight_decay=5e-5,
                    generator=None):
        """K steps of SGD from the weights it is sent; returns the delta, never the data.

        `generator` replaces the client's own for this call (FedAvg-FT's fine-tuning at evaluation time
        uses one, so that evaluating does not change what later training rounds draw)."""
        generator = generator if generator is not None else self.generator
        weights = {n: w.detach().clone().requires_grad_(True) for n, w in self.unflatten(flat_weights).items()}
        bn_stats = {n: b.clone() for n, b in bn_stats.items()}
        optimizer = torch.optim.SGD(weights.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.model.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(len(self.y_train), (batch_size,), generator=generator, device=self.y_train.device)
            x = data.augment(self.x_train[idx], self.mean, self.std, generator=generator)
            with hn.autocast(x.device, self.amp):
                loss = F.cross_entropy(hn.run_model(self.model, weights, bn_stats, x), self.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())        # no .item() here: on a GPU that would wait for every step
        delta = self.flatten({n: w.detach() for n, w in weights.items()}) - flat_weights.detach()
        # One host transfer for all the steps' losses; np.mean of the same floats as before.
        losses = torch.stack(losses).tolist() if losses else []
        return ClientUpdate(delta=delta, bn_stats=bn_stats, label_counts=self.label_counts.clone(),
                            loss=float(np.mean(losses)) if losses else 0.0)

    def held_out(self, split):
        """test, val, or one of the validation split's halves: val_select (replay picks its best point
        there) and val_confirm (which then has to confirm the pick, so a lucky pick rarely passes)."""
        if split == "test":
            return self.x_test, self.y_test
        half = {"val": slice(None), "val_select": slice(0, None, 2), "val_confirm": slice(1, None, 2)}[split]
        return self.x_val[half], self.y_val[half]

    @torch.no_grad()
    def correct(self, flat_weights, bn_stats, split="test", batch_size=128):
        """(per-image correctness, summed loss) of the model it is sent, on its own held-out data."""
        x_all, y_all = self.held_out(split)
        weights = self.unflatten(flat_weights)
        self.model.eval()
        # The summed loss stays on the device, in float64: the same additions as Python floats would do
        # (each float32 batch sum is exact in float64), without a host round trip per batch.
        correct, loss = [], torch.zeros((), dtype=torch.float64, device=y_all.device)
        for start in range(0, len(y_all), batch_size):
            x = data.normalize(x_all[start:start + batch_size], self.mean, self.std)
            y = y_all[start:start + batch_size]
            with hn.autocast(x.device, self.amp):
                logits = hn.run_model(self.model, weights, bn_stats, x)
            correct.append(logits.argmax(1) == y)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        return (torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)), loss.item()

    def evaluate(self, flat_weights, bn_stats, split="test"):
        """(accuracy, mean loss) on its own held-out data; only these numbers go back."""
        correct, loss = self.correct(flat_weights, bn_stats, split)
        if len(correct) == 0:
            return float("nan"), float("nan")
        return correct.float().mean().item(), loss / len(correct)

    def accuracy(self, flat_weights, bn_stats):
        """(test, validation) accuracy: the first is reported, the second is what settings are chosen on."""
        return self.evaluate(flat_weights, bn_stats, "test")[0], self.evaluate(flat_weights, bn_stats, "val")[0]

    def confirm(self, flat_before, flat_after, bn_stats):
        """Images of val_confirm that the new model gets right and the old one wrong, and the reverse.

        Two counts go back, nothing else: what the server needs for a paired (McNemar) test."""
        before, _ = self.correct(flat_before, bn_stats, "val_confirm")
        after, _ = self.correct(flat_after, bn_stats, "val_confirm")
        return int((after & ~before).sum()), int((before & ~after).sum())


class Server:
    """The hypernetwork and all per-client state the server may hold (embeddings, BN statistics)."""

    def __init__(self, hypernet, model, batches, *, optimizer="adam", server_lr=3e-3, server_momentum=0.9,
                 server_weight_decay=0.0, grad_clip=50.0, sparsity=0.75, image_size=32, adapter_lr=None, amp=False):
        self.hypernet, self.model, self.batches, self.image_size = hypernet, model, batches, image_size
        self.amp = amp              # --amp: replay's synthesis runs under bf16 autocast (deepinversion.py)
        self.batch_of = {cid: t for t, ids in enumerate(batches) for cid in ids}
        # The server's optimizer owns everything but the gates (masks.BatchGates.step learns them, HAT's
        # way) and what only replay writes.
        self.params = {name: p for name, p in hypernet.named_parameters()
                       if not name.startswith("gates.") and name not in hn.replay_only(hypernet)}
        # A new batch has a stage of tens of server steps to move its adapter as far as the classifier's own
        # scale: at the hypernetwork's rate it would not get there (docs/design.md), so it has a rate of its own.
        adapter_rates = {name: adapter_lr for name in self.params
                         if (name.startswith("adapters.") or name == "client_offsets") and adapter_lr}
        self.optimizer = hn.ServerOptimizer(
            self.params, kind=optimizer, lr=server_lr, momentum=server_momentum, weight_decay=server_weight_decay,
            lr_of=adapter_rates)
        self.grad_clip, self.sparsity = grad_clip, sparsity
        fresh = hn.bn_stats_init(model)
        self.bn_stats = {cid: {n: b.clone() for n, b in fresh.items()} for ids in batches for cid in ids}
        self.label_counts = {}
        self.stage, self.s = 0, 1.0
        self.free = {}
        # Numerical faults met and survived (reported in results.json): a NaN/Inf client update is
        # dropped, a round whose updates were all dropped makes no server step, a diverged replay is undone.
        self.faults = no_faults()

    # --- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, cid):
        """One client's flat weights, generated alone so the result never depends on who else is asked."""
        return self.hypernet([cid], [self.batch_of[cid]], s=self.s)[0]

    def evaluate(self, client):
        """(test, validation) accuracy of the client's generated model, measured by the client."""
        return client.accuracy(self.generate(client.cid), self.bn_stats[client.cid])

    # --- a stage -------------------------------------------------------------------------------------

    def begin_stage(self, t):
        """Batch t joins: fresh optimizer state, and the entries this stage may write."""
        self.stage = t
        self.optimizer.reset()
        if self.hypernet.gates is not None:
            self.hypernet.gates.prepare(self.hypernet, t)
        self.free = hn.compact_masks(self.free_masks(t))

    def free_masks(self, t):
        """{parameter name: 0/1 mask} of the entries stage t may write; a name not listed is all free."""
        gates = self.hypernet.gates
        return gates.free_masks(self.hypernet, t) if gates is not None else {}

    def train_round(self, client_ids, clients, stage_fraction, steps, batch_size, lr):
        """One pFedHN round: generate for the round's clients in one call, local training, one server step.

        `stage_fraction` in [0, 1]: how far into the stage this round is (it sets the gates' annealing s).

        An update holding NaN or Inf (a client that diverged) is dropped: it moves nothing and its BN
        statistics are not stored. Returns the mean local loss of the kept updates (NaN if none was kept).
        """
        gates = self.hypernet.gates
        if gates is not None:
            self.s = gates.scale(stage_fraction)
        flat = self.hypernet(client_ids, [self.batch_of[c] for c in client_ids], s=self.s)
        updates = [clients[c].local_train(flat[k], self.bn_stats[c], steps, batch_size, lr)
                   for k, c in enumerate(client_ids)]
        return self.apply_updates(client_ids, flat, updates)

    def apply_updates(self, client_ids, flat, updates):
        """The server's half of a round: drop non-finite updates, pFedHN's VJP step (and the gates' HAT
        step), store the kept clients' BN statistics and label counts. `flat` is the generation the
        updates were trained from, still attached to the hypernetwork's graph."""
        gates = self.hypernet.gates
        kept = [k for k, u in enumerate(updates) if is_finite_update(u)]
        self.faults["dropped_updates"] += len(updates) - len(kept)
        if not kept:
            self.faults["skipped_rounds"] += 1
            return float("nan")
        kept_ids = [client_ids[k] for k in kept]
        deltas = torch.stack([updates[k].delta for k in kept])
        with_gates = dict(self.params, **({"gates.embeddings": gates.embeddings} if gates is not None else {}))
        grads = hn.pfedhn_gradients(flat[kept], deltas, with_gates)
        if gates is not None:
            gates.step(grads.pop("gates.embeddings"), self.stage, self.s, self.sparsity)
        grads, _ = hn.clip_gradients(grads, self.grad_clip)
        free = dict(self.free)
        rows = torch.zeros_like(self.hypernet.client_embeddings)
        rows[kept_ids] = 1.0                # only the embeddings of clients whose update was kept may move
        free["client_embeddings"] = rows
        if "client_offsets" in self.params:
            free["client_offsets"] = rows[:, :1].expand_as(self.hypernet.client_offsets)
        self.optimizer.step(grads, free)
        for k in kept:
            self.bn_stats[client_ids[k]] = updates[k].bn_stats
            self.label_counts[client_ids[k]] = updates[k].label_counts
        return float(np.mean([updates[k].loss for k in kept]))

    def end_stage(self, t):
        """Freeze batch t's sub-hypernetwork; returns the neuron accounting (None without masks)."""
        self.s = 1.0
        if self.hypernet.gates is None:
            return None
        return self.hypernet.gates.finish(t)

    # --- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self):
        """Everything the server holds that training changes (the hypernetwork includes the gates' buffers)."""
        return {"hypernet": self.hypernet.state_dict(), "optimizer": self.optimizer.state_dict(),
                "stage": self.stage, "s": self.s, "bn_stats": self.bn_stats, "label_counts": self.label_counts,
                "faults": dict(self.faults)}

    def load_state_dict(self, sd):
        """Continue where state_dict left off, mid-stage included: unlike begin_stage this neither resets
        the optimizer nor re-prepares the gates (that would zero head columns and rewrite gate embeddings)."""
        self.hypernet.load_state_dict(sd["hypernet"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.stage, self.s = sd["stage"], sd["s"]
        self.bn_stats, self.label_counts = sd["bn_stats"], sd["label_counts"]
        self.faults = dict(sd["faults"])
        # The free masks depend only on the ownership buffers, which do not change within a stage.
        self.free = hn.compact_masks(self.free_masks(self.stage))


def no_faults():
    """The fault counters every server (and every baseline) reports in results.json, all zero."""
    return {"dropped_updates": 0, "skipped_rounds": 0, "dropped_replays": 0}


def is_finite_update(update):
    """No NaN or Inf in the delta or the BN statistics, with one host round trip for the whole update.

    x * 0 is 0 for every finite x and NaN for NaN and +-Inf, so the sum of those zeros is finite exactly
    when every entry is (it cannot overflow, as a plain sum could); one multiply and one sum per tensor,
    several times cheaper than torch.isfinite(x).all(), which the server paid for 61 tensors per client.
    """
    zeros = [(update.delta * 0).sum()] + [(b * 0).sum() for b in update.bn_stats.values() if b.is_floating_point()]
    return bool(torch.isfinite(torch.stack(zeros).sum()))


# ------------------------------------------------------------------------------------------------------
# The onboarding protocol and its metrics
# ------------------------------------------------------------------------------------------------------

def evaluate_all(server, clients, seen):
    return {cid: server.evaluate(clients[cid]) for cid in seen}


@dataclass
class OnboardingState:
    """Where onboarding stands, apart from the server and the clients: what a checkpoint needs to resume.

    `stage` is the stage running (len(batches) once all are done) and `round` how many of its rounds are
    done; round 0 means the stage has not begun, so begin_stage still has to run.
    """
    stage: int = 0
    round: int = 0
    stage_elapsed: float = 0.0      # seconds the current stage had taken before a resume
    accuracy: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)     # the same on validation splits: for choosing settings
    neurons: list = field(default_factory=list)
    stage_seconds: list = field(default_factory=list)
    replays: list = field(default_factory=list)


def onboard(server, clients, batches, *, rounds, clients_per_round, local_steps, batch_size, lr, seed,
            progress_bar=None, replay=None, onboarding=None, rng=None, after_round=None,
            replay_progress=None, bn_noise=0.0, audit=None):
    """Run every stage; returns the final OnboardingState (accuracy matrices, neurons, stage seconds, replays).

    `replay`: None, or the keyword arguments of deepinversion.backward_transfer, run after every stage
    t > 0 once batch t's masks are frozen; `replay_progress(phase, done, total)`, if given, hears how it
    advances (backward_transfer's `progress`). `bn_noise` and `audit`: run_replay's.
    Resuming: pass the restored `onboarding` (an OnboardingState) and round-sampling `rng` (a numpy
    Generator), with the server and the clients' generators restored too. `after_round(onboarding, rng,
    stage_done)` is called after every round and after every stage (where train.py writes checkpoints and
    notices signals).
    """
    p = onboarding if onboarding is not None else OnboardingState()
    rng = rng if rng is not None else np.random.default_rng(seed)
    num_clients = sum(len(b) for b in batches)
    for t in range(p.stage, len(batches)):
        batch = batches[t]
        start = time.time() - p.stage_elapsed
        if p.round == 0:
            server.begin_stage(t)
        for r in range(p.round, rounds):
            round_clients = sorted(rng.choice(batch, size=min(clients_per_round, len(batch)), replace=False).tolist())
            loss = server.train_round(round_clients, clients, r / max(rounds - 1, 1), local_steps, batch_size, lr)
            if progress_bar is not None:
                progress_bar.set_postfix(stage=f"{t + 1}/{len(batches)}", loss=f"{loss:.3f}")
                progress_bar.update(1)
            p.round, p.stage_elapsed = r + 1, time.time() - start
            if after_round is not None:
                after_round(p, rng, stage_done=False)
        p.neurons.append(server.end_stage(t))
        if replay is not None and t > 0:
            p.replays.append(run_replay(server, clients, t, seed, replay, progress=replay_progress,
                                        bn_noise=bn_noise, audit=audit))
        seen = [cid for b in batches[:t + 1] for cid in b]
        acc = evaluate_all(server, clients, seen)
        p.accuracy.append([acc[cid][0] if cid in acc else None for cid in range(num_clients)])
        p.val_accuracy.append([acc[cid][1] if cid in acc else None for cid in range(num_clients)])
        p.stage_seconds.append(time.time() - start)
        p.stage, p.round, p.stage_elapsed = t + 1, 0, 0.0
        if after_round is not None:
            after_round(p, rng, stage_done=True)
    return p


def run_replay(server, clients, t, seed, replay, progress=None, bn_noise=0.0, audit=None):
    """deepinversion.backward_transfer, undone when it diverged (non-finite images, BN loss or weights).

    The server replays from what the clients uploaded: with `bn_noise` sigma > 0, their statistics and
    label counts under Gaussian noise (privacy.uploads; 0 is the upload as it is, nothing drawn).
    `audit(server, clients, t, report, upload)`, if given, runs afterwards on the clients' side of the line
    (privacy.audit_replay) and its figures go into the report as `audit`; it changes nothing.
    """
    import deepinversion

    # Replay writes only these: a copy undoes a divergence.
    changed = {name: p for name, p in server.hypernet.named_parameters()
               if name in ("client_embeddings", "client_offsets", "gates.borrow")}
    saved = {name: p.detach().clone() for name, p in changed.items()}

    def validate(cid, flat):            # runs on client cid: its own validation data, two numbers back
        return clients[cid].evaluate(flat, server.bn_stats[cid], split="val_select")

    def confirm(cid, flat_before, flat_after):      # on client cid too: two counts back
        return clients[cid].confirm(flat_before, flat_after, server.bn_stats[cid])

    upload = privacy.uploads(server, seed, bn_noise)
    replay_start = time.time()
    report = deepinversion.backward_transfer(server, t, validate, confirm, seed=seed + t, progress=progress,
                                             uploads=upload, **replay)
    report["replay_s"] = time.time() - replay_start
    finite = (bool(torch.isfinite(report["images"]).all())
              and all(np.isfinite(report["bn_loss_end"])) and all(bool(torch.isfinite(p).all())
                                                                   for p in changed.values()))
    report["dropped"] = not finite
    if not finite:
        server.faults["dropped_replays"] += 1
        with torch.no_grad():
            for name, p in changed.items():
                p.copy_(saved[name])
    if audit is not None:
        report["audit"] = None if report["dropped"] else audit(server, clients, t, report, upload)
    return report


def metrics(accuracy, batches, test_sizes):
    """Mean accuracy after the last stage (unweighted and by test size) and RI per earlier batch.

    RI of batch k = mean over its clients of A[T-1][i] - A[k][i]: how much better (or worse, when
    negative: forgetting) they are at the end than right after their own stage.
    """
    final = accuracy[-1]
    ids = [cid for b in batches for cid in b]
    mean_acc = float(np.mean([final[c] for c in ids]))
    weighted_acc = float(sum(final[c] * test_sizes[c] for c in ids) / sum(test_sizes[c] for c in ids))
    ri_per_batch = [float(np.mean([final[c] - accuracy[k][c] for c in b])) for k, b in enumerate(batches[:-1])]
    ri = float(np.mean(ri_per_batch)) if ri_per_batch else 0.0
    batch_acc = [[None if row[b[0]] is None else float(np.mean([row[c] for c in b])) for b in batches]
                 for row in accuracy]
    return {"mean_acc": mean_acc, "weighted_acc": weighted_acc, "ri": ri, "ri_per_batch": ri_per_batch,
            "batch_acc": batch_acc}
