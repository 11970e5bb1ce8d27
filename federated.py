"""Clients, the server, and progressive client onboarding (paper: the PCO-FL protocol; DESIGN.md §1-§3).

Owns:
  * Client      holds its own data (never leaves it); trains the weights it is sent for K local SGD
                steps and returns a ClientUpdate: a weight delta, its BatchNorm statistics and its label
                COUNTS. No images and no per-sample labels ever reach the server: the type says so.
  * Server      owns the hypernetwork, the clients' embeddings, masks and BN statistics. It generates,
                updates, and has one place where a stage starts (`begin_stage`) and one where it ends
                (`end_stage`: masks are frozen there; `onboard` then runs replay).
  * onboard     the protocol: batch t trains for R rounds, then every client seen so far is evaluated
                on its own test split with its generated model, filling the accuracy matrix A[t][i].
  * metrics     mean accuracy (unweighted and sample-weighted) and RI, retro-active improvement.
"""
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
import hypernet as hn


@dataclass
class ClientUpdate:
    """Everything a client uploads after local training. Deliberately no images, no per-sample labels."""
    delta: torch.Tensor          # flat: trained weights - received weights
    bn_stats: dict               # its BatchNorm running statistics after training
    label_counts: torch.Tensor   # (num_classes,) how many training images of each class it holds
    loss: float                  # mean local training loss, for the progress bar


class Client:
    def __init__(self, cid, dataset, split, model, unflatten, flatten, seed):
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

    def local_train(self, flat_weights, bn_stats, steps, batch_size, lr, momentum=0.9, weight_decay=5e-5):
        """K steps of SGD from the generated weights; returns the delta, never the data."""
        weights = {n: w.detach().clone().requires_grad_(True) for n, w in self.unflatten(flat_weights).items()}
        bn_stats = {n: b.clone() for n, b in bn_stats.items()}
        optimizer = torch.optim.SGD(weights.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.model.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(len(self.y_train), (batch_size,), generator=self.generator,
                                device=self.y_train.device)
            x = data.augment(self.x_train[idx], self.mean, self.std, generator=self.generator)
            loss = F.cross_entropy(hn.run_model(self.model, weights, bn_stats, x), self.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        delta = self.flatten({n: w.detach() for n, w in weights.items()}) - flat_weights.detach()
        return ClientUpdate(delta=delta, bn_stats=bn_stats, label_counts=self.label_counts.clone(),
                            loss=float(np.mean(losses)) if losses else 0.0)

    @torch.no_grad()
    def evaluate(self, flat_weights, bn_stats, split="test", batch_size=1000):
        """(accuracy, mean loss) of the model it is sent, on its own held-out data; only numbers go back."""
        x_all, y_all = (self.x_test, self.y_test) if split == "test" else (self.x_val, self.y_val)
        if len(y_all) == 0:
            return float("nan"), float("nan")
        weights = self.unflatten(flat_weights)
        self.model.eval()
        correct, loss = 0, 0.0
        for start in range(0, len(y_all), batch_size):
            x = data.normalize(x_all[start:start + batch_size], self.mean, self.std)
            y = y_all[start:start + batch_size]
            logits = hn.run_model(self.model, weights, bn_stats, x)
            correct += (logits.argmax(1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
        return correct / len(y_all), loss / len(y_all)


class Server:
    """The hypernetwork and all per-client state the server may hold (embeddings, BN statistics)."""

    def __init__(self, hypernet, model, batches, *, optimizer="adam", server_lr=3e-3, server_momentum=0.9,
                 server_weight_decay=0.0, grad_clip=50.0, sparsity=0.75, image_size=32):
        self.hypernet, self.model, self.batches, self.image_size = hypernet, model, batches, image_size
        self.batch_of = {cid: t for t, ids in enumerate(batches) for cid in ids}
        self.params = dict(hypernet.named_parameters())
        self.optimizer = hn.ServerOptimizer(
            self.params, kind=optimizer, lr=server_lr, momentum=server_momentum, weight_decay=server_weight_decay)
        self.grad_clip, self.sparsity = grad_clip, sparsity
        fresh = hn.bn_stats_init(model)
        self.bn_stats = {cid: {n: b.clone() for n, b in fresh.items()} for ids in batches for cid in ids}
        self.label_counts = {}
        self.stage, self.s = 0, 1.0
        self.free = {}

    # --- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, cid):
        """One client's flat weights, generated alone so the result never depends on who else is asked."""
        return self.hypernet([cid], [self.batch_of[cid]], s=self.s)[0]

    # --- a stage -------------------------------------------------------------------------------------

    def begin_stage(self, t):
        """Batch t joins: fresh optimizer state, and the entries this stage may write."""
        self.stage = t
        self.optimizer.reset()
        gates = self.hypernet.gates
        self.free = {}
        if gates is not None:
            gates.prepare(self.hypernet, t)
            self.free = gates.free_masks(self.hypernet, t)

    def train_round(self, client_ids, clients, progress, steps, batch_size, lr):
        """One pFedHN round: generate for the round's clients in one call, local training, one server step."""
        gates = self.hypernet.gates
        if gates is not None:
            self.s = gates.scale(progress)
        flat = self.hypernet(client_ids, [self.batch_of[c] for c in client_ids], s=self.s)
        updates = [clients[c].local_train(flat[k], self.bn_stats[c], steps, batch_size, lr)
                   for k, c in enumerate(client_ids)]
        deltas = torch.stack([u.delta for u in updates])
        grads = hn.pfedhn_gradients(flat, deltas, self.params)
        if gates is not None:
            penalty = self.sparsity * gates.sparsity_penalty(self.stage, self.s)
            grads["gates.embeddings"] += torch.autograd.grad(penalty, gates.embeddings)[0]
            grads["gates.embeddings"] = gates.compensate(grads["gates.embeddings"], self.stage, self.s)
        # Clip the hypernetwork's gradient, not the gates': HAT's compensation scales gate gradients by up
        # to s_max/s (1e5 early in a stage), which would otherwise swallow every other gradient in the clip.
        gate_grad = grads.pop("gates.embeddings", None)
        grads, _ = hn.clip_gradients(grads, self.grad_clip)
        if gate_grad is not None:
            grads["gates.embeddings"] = gate_grad
        free = dict(self.free)
        rows = torch.zeros_like(self.hypernet.client_embeddings)
        rows[client_ids] = 1.0                        # only the round's clients' embeddings may move
        free["client_embeddings"] = rows
        self.optimizer.step(grads, free)
        if gates is not None:
            gates.clamp_(self.stage)
        for c, u in zip(client_ids, updates):
            self.bn_stats[c] = u.bn_stats
            self.label_counts[c] = u.label_counts
        return float(np.mean([u.loss for u in updates]))

    def end_stage(self, t):
        """Freeze batch t's sub-hypernetwork; returns the neuron accounting (None without masks)."""
        self.s = 1.0
        if self.hypernet.gates is None:
            return None
        return self.hypernet.gates.finish(t)


# ------------------------------------------------------------------------------------------------------
# The onboarding protocol and its metrics
# ------------------------------------------------------------------------------------------------------

def evaluate_all(server, clients, seen):
    return {cid: clients[cid].evaluate(server.generate(cid), server.bn_stats[cid])[0] for cid in seen}


def onboard(server, clients, batches, *, rounds, clients_per_round, local_steps, batch_size, lr, seed,
            progress_bar=None, replay=None):
    """Run every stage; returns (accuracy matrix, neuron accounting, seconds per stage, replay reports).

    `replay`: None, or the keyword arguments of deepinversion.backward_transfer, run after every stage
    t > 0 once batch t's masks are frozen.
    """
    import deepinversion

    rng = np.random.default_rng(seed)
    num_clients = sum(len(b) for b in batches)
    accuracy, neurons, stage_seconds, replays = [], [], [], []
    seen = []
    for t, batch in enumerate(batches):
        start = time.time()
        server.begin_stage(t)
        for r in range(rounds):
            round_clients = sorted(rng.choice(batch, size=min(clients_per_round, len(batch)), replace=False).tolist())
            loss = server.train_round(round_clients, clients, r / max(rounds - 1, 1), local_steps, batch_size, lr)
            if progress_bar is not None:
                progress_bar.set_postfix(stage=f"{t + 1}/{len(batches)}", loss=f"{loss:.3f}")
                progress_bar.update(1)
        neurons.append(server.end_stage(t))
        if replay is not None and t > 0:
            def validate(cid, flat):        # runs on client cid, with its own validation data
                return clients[cid].evaluate(flat, server.bn_stats[cid], split="val")
            replay_start = time.time()
            report = deepinversion.backward_transfer(server, t, validate, seed=seed + t, **replay)
            report["replay_s"] = time.time() - replay_start
            replays.append(report)
        seen += batch
        acc = evaluate_all(server, clients, seen)
        accuracy.append([acc.get(cid) for cid in range(num_clients)])
        stage_seconds.append(time.time() - start)
    return accuracy, neurons, stage_seconds, replays


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
