"""Clients and the server (paper: the PCO-FL setting and the "central hypernetwork"; docs/design.md §1-§3).

Owns:
  * Client      holds its own data (it never leaves); trains the weights it is sent for K local SGD steps
                and returns a ClientUpdate: a weight delta, its BatchNorm statistics and its label COUNTS.
                No images and no per-sample labels ever reach the server: the type says so.
  * Server      owns the hypernetwork and what the server may hold per client (embedding, BN statistics,
                label counts). A stage: `begin_stage` (the batch's gate starts, masks.py), rounds of
                `train_round` (generate -> local training -> `update`, pFedHN's step), `end_stage` (the
                batch's gate is binarised and frozen), then `replay` (deepinversion.py). train.py drives it.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
import deepinversion
import hypernet as hn
import masks


@dataclass
class ClientUpdate:
    """Everything a client uploads after local training. Deliberately no images, no per-sample labels."""
    delta: torch.Tensor          # flat: trained weights - received weights
    bn_stats: dict               # its BatchNorm running statistics after training
    label_counts: torch.Tensor   # (num_classes,) how many training images of each class it holds
    loss: float                  # mean local training loss, for the progress bar


def client_generator(seed, cid, device):
    """Client cid's own generator of minibatches and augmentations, as it is when the client arrives."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + cid)


class Client:
    def __init__(self, cid, dataset, split, model, layout, seed):
        self.cid, self.model, self.layout = cid, model, layout
        self.x_train, self.y_train = dataset.x_train[split.train], dataset.y_train[split.train]
        self.x_val, self.y_val = dataset.x_train[split.val], dataset.y_train[split.val]
        self.x_test, self.y_test = dataset.x_test[split.test], dataset.y_test[split.test]
        self.mean, self.std = dataset.mean, dataset.std
        self.label_counts = torch.bincount(self.y_train, minlength=dataset.num_classes).cpu()
        # Its own generator: the order in which the server visits clients never changes what one sees.
        self.generator = client_generator(seed, cid, self.x_train.device)
        self.steps_trained = 0      # the local SGD steps it has taken: the compute a method used

    def local_train(self, flat_weights, bn_stats, steps, minibatch_size, lr, generator=None, trainable=None,
                    extra_loss=None):
        """K steps of SGD (momentum 0.9) from the weights it is sent; returns the delta, never the data.

        `generator` replaces the client's own for this call. Two hooks the baselines use (shell/baselines.py):
        `trainable`, the parameter names that train (the others keep their values bit for bit), and
        `extra_loss(weights, x, logits)`, added to the cross-entropy (Ditto's pull, LwF's distillation)."""
        generator = generator or self.generator
        self.steps_trained += steps
        weights = {n: w.detach().clone().requires_grad_(trainable is None or n in trainable)
                   for n, w in self.layout.unflatten(flat_weights).items()}
        bn_stats = {n: b.clone() for n, b in bn_stats.items()}
        optimizer = torch.optim.SGD([w for w in weights.values() if w.requires_grad], lr=lr, momentum=0.9,
                                    weight_decay=5e-5)
        self.model.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(len(self.y_train), (minibatch_size,), generator=generator, device=self.y_train.device)
            x = data.augment(self.x_train[idx], self.mean, self.std, generator=generator)
            logits = hn.run_model(self.model, weights, bn_stats, x)
            loss = F.cross_entropy(logits, self.y_train[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(weights, x, logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())        # no .item() here: on a GPU that would wait for every step
        delta = self.layout.flatten({n: w.detach() for n, w in weights.items()}) - flat_weights.detach()
        return ClientUpdate(delta, bn_stats, self.label_counts.clone(),
                            float(np.mean(torch.stack(losses).tolist())) if losses else 0.0)

    @torch.no_grad()
    def evaluate(self, flat_weights, bn_stats, split="test"):
        """Accuracy of the model it is sent on its own held-out `split` (test or val); NaN with no image."""
        x_all, y_all = (self.x_test, self.y_test) if split == "test" else (self.x_val, self.y_val)
        weights, right = self.layout.unflatten(flat_weights), []
        self.model.eval()
        for start in range(0, len(y_all), 128):
            x = data.normalize(x_all[start:start + 128], self.mean, self.std)
            right.append(hn.run_model(self.model, weights, bn_stats, x).argmax(1) == y_all[start:start + 128])
        return torch.cat(right).float().mean().item() if right else float("nan")


class Server:
    """The hypernetwork and all per-client state the server may hold (embeddings, BN statistics, counts)."""

    def __init__(self, hypernet, model, batches, *, server_lr=3e-3, grad_clip=50.0,
                 sparsity=0.5, classifier_lr=1e-2, image_size=32, replay=None):
        self.hypernet, self.model, self.batches, self.image_size = hypernet, model, batches, image_size
        self.batch_of = {cid: t for t, ids in enumerate(batches) for cid in ids}
        # HAT learns the gates (BatchGates.step), not the server's optimizer. A new client's classifier has a
        # stage of tens of steps to move as far as its own scale: it learns at a rate of its own.
        self.params = {name: p for name, p in hypernet.named_parameters() if not name.startswith("gates.")}
        self.optimizer = masks.ServerOptimizer(self.params, lr=server_lr, lr_of={"client_classifiers": classifier_lr})
        self.grad_clip, self.sparsity = grad_clip, sparsity
        fresh = hn.bn_stats_init(model)
        self.bn_stats = {cid: {n: b.clone() for n, b in fresh.items()} for cid in self.batch_of}
        self.label_counts = {}
        self.replay_settings = replay   # deepinversion.replay's keyword arguments; None: no replay
        self.dreams = {}                # cid -> (images, labels, teacher logits) dreamed from its model
        self.stage, self.gate_scale, self.free = 0, 1.0, {}

    def uploads(self, cid):
        """What the server holds of a client for replay: its BN statistics and label counts."""
        return self.bn_stats[cid], self.label_counts[cid]

    @torch.no_grad()
    def generate(self, cid):
        """One client's flat weights, generated alone so the result never depends on who else is asked."""
        return self.hypernet([cid], [self.batch_of[cid]], s=self.gate_scale)[0]

    def evaluate(self, client):
        """(test, validation) accuracy of the client's generated model, measured by the client."""
        flat, bn_stats = self.generate(client.cid), self.bn_stats[client.cid]
        return client.evaluate(flat, bn_stats), client.evaluate(flat, bn_stats, "val")

    def begin_stage(self, t):
        """Batch t joins: fresh optimizer state, its gate prepared, its clients' classifiers blank, and the
        entries this stage may write."""
        self.stage = t
        self.optimizer.reset()
        gates = self.hypernet.gates
        if gates is not None:
            gates.prepare(self.hypernet, t)
            if t > 0:
                self.blank_classifiers(self.batches[t])
        self.free = self.free_masks()

    def free_masks(self):
        """{name: bool mask} of the hypernetwork entries this stage may write (masks.py)."""
        gates = self.hypernet.gates
        return gates.free_masks(self.hypernet) if gates is not None else {}

    @torch.no_grad()
    def blank_classifiers(self, ids):
        """Each new client's classifier offset cancels the classifier that the frozen part generates for it:
        it starts with a blank decision (equal logits), not the earlier batches' classes, while it reads
        their features (docs/design.md §4)."""
        hypernet = self.hypernet
        hypernet.client_classifiers[ids] = 0.0
        generated = hypernet(ids, [self.stage] * len(ids), s=hypernet.gates.scale(0.0))
        hypernet.client_classifiers[ids] = -generated[:, hypernet.classifier_index]

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        """One pFedHN round: generate for the round's clients in one call, local training, one server step.
        `stage_fraction` in [0, 1] sets the gates' annealing s. Returns the mean local loss."""
        if self.hypernet.gates is not None:
            self.gate_scale = self.hypernet.gates.scale(stage_fraction)
        generated = self.hypernet(client_ids, [self.batch_of[c] for c in client_ids], s=self.gate_scale)
        updates = [clients[c].local_train(generated[k], self.bn_stats[c], steps, minibatch_size, lr)
                   for k, c in enumerate(client_ids)]
        return self.update(client_ids, generated, updates)

    def update(self, client_ids, generated, updates):
        """The server's half of a round (pFedHN's rule), from what the clients sent back.

        A client moved its weights by delta; the hypernetwork should move so that its output moves by delta
        too. The vector-Jacobian product d(generated)/d(phi)^T (-delta) is the gradient of
        1/2 ||generated - (generated + delta)||^2: a step pulls the generated weights toward the trained ones.
        """
        gates = self.hypernet.gates
        deltas = torch.stack([u.delta for u in updates])
        params = dict(self.params, **({"gates.embeddings": gates.embeddings} if gates is not None else {}))
        grads = pull_toward(generated, deltas, params)
        if gates is not None:           # HAT learns the batch's gate from the same gradient (masks.py)
            gates.step(grads.pop("gates.embeddings"), self.stage, self.gate_scale, self.sparsity)
        # The step writes what this stage may, and of the per-client rows only those of the round's clients.
        rows = torch.zeros(len(self.hypernet.client_embeddings), 1, dtype=torch.bool, device=self.hypernet.base.device)
        rows[client_ids] = True
        free = dict(self.free, **{n: rows.expand_as(p) for n, p in self.params.items() if n.startswith("client_")})
        self.optimizer.step(clipped(grads, self.grad_clip), free)
        for cid, u in zip(client_ids, updates):
            self.bn_stats[cid], self.label_counts[cid] = u.bn_stats, u.label_counts
        return float(np.mean([u.loss for u in updates]))

    def end_stage(self, t):
        """Freeze batch t's sub-hypernetwork; returns the neuron accounting (None without masks)."""
        self.gate_scale = 1.0
        return self.hypernet.gates.finish(t) if self.hypernet.gates is not None else None

    def replay(self, clients, t, seed, progress=None):
        """Data-free replay after stage t (deepinversion.replay); the earlier clients are not asked anything."""
        return deepinversion.replay(self, t, seed=seed + t, progress=progress, **self.replay_settings)


def pull_toward(generated, deltas, params):
    """pFedHN's gradient of {name: parameter}: the vector-Jacobian product d(generated)/d(params)^T (-delta),
    averaged over the clients. A parameter the generated weights do not depend on gets a zero gradient."""
    vjp = torch.autograd.grad(generated, list(params.values()), grad_outputs=deltas / -len(deltas),
                              allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), vjp)}


def clipped(grads, max_norm):
    """The gradients scaled together so that their joint L2 norm is at most max_norm."""
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values())).item()
    clip = min(1.0, max_norm / (norm + 1e-12))
    return {name: g * clip for name, g in grads.items()}
