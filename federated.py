"""Clients and the server (paper: the PCO-FL setting and the "central hypernetwork"; docs/design.md §1-§3).

Owns:
  * Client      holds its own data (it never leaves); trains the weights it is sent for K local SGD steps
                and returns a ClientUpdate: a weight delta, its BatchNorm statistics and its label COUNTS.
                No images and no per-sample labels ever reach the server: the type says so.
  * Server      owns the hypernetwork and what the server may hold per client (embedding, BN statistics,
                label counts). A stage: `begin_stage` (the batch's gate starts, masks.py), rounds of
                `train_round` (generate -> local training -> `update`, pFedHN's step), `end_stage` (the
                batch's gate is binarised and frozen). The onboarding loop that drives it is in train.py.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import data
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
        self.generator = client_generator(seed, cid, self.x_train.device)
        # --amp: training and evaluation under bf16 autocast (hypernet.autocast: no context at all when off).
        self.amp = amp
        self.steps_trained = 0      # ours: the local SGD steps it has taken, the compute a method used (results.json)

    def local_train(self, flat_weights, bn_stats, steps, minibatch_size, lr, momentum=0.9, weight_decay=5e-5,
                    generator=None, trainable=None, extra_loss=None):
        """K steps of SGD from the weights it is sent; returns the delta, never the data.

        `generator` replaces the client's own for this call (FedAvg-FT's fine-tuning at evaluation time
        uses one, so that evaluating does not change what later training rounds draw).
        Two optional hooks for the baselines (shell/baselines.py); without them every step is plain
        SGD on all weights:
          * trainable: the parameter names that train (FedRep's head-then-body steps); the others keep
            their values bit for bit (their delta is exactly 0).
          * extra_loss(weights, x, logits) -> scalar added to the cross-entropy (Ditto's proximal pull,
            LwF's distillation); x is the augmented, normalised minibatch the logits came from."""
        generator = generator if generator is not None else self.generator
        self.steps_trained += steps
        trains = (lambda name: True) if trainable is None else (lambda name: name in trainable)
        weights = {n: w.detach().clone().requires_grad_(trains(n)) for n, w in self.unflatten(flat_weights).items()}
        bn_stats = {n: b.clone() for n, b in bn_stats.items()}
        optimizer = torch.optim.SGD([w for n, w in weights.items() if trains(n)], lr=lr, momentum=momentum,
                                    weight_decay=weight_decay)
        self.model.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(len(self.y_train), (minibatch_size,), generator=generator, device=self.y_train.device)
            x = data.augment(self.x_train[idx], self.mean, self.std, generator=generator)
            with hn.autocast(x.device, self.amp):
                logits = hn.run_model(self.model, weights, bn_stats, x)
                loss = F.cross_entropy(logits, self.y_train[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(weights, x, logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())        # no .item() here: on a GPU that would wait for every step
        delta = self.flatten({n: w.detach() for n, w in weights.items()}) - flat_weights.detach()
        # One host transfer for all the steps' losses.
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

    def logits_on(self, flat_weights, bn_stats, split, minibatch_size=128):
        """(logits, labels) of the model it is sent on its own held-out `split`, a minibatch at a time."""
        x_all, y_all = self.held_out(split)
        weights = self.unflatten(flat_weights)
        self.model.eval()
        for start in range(0, len(y_all), minibatch_size):
            x = data.normalize(x_all[start:start + minibatch_size], self.mean, self.std)
            # --amp speeds up what is reported; replay's decisions (val_select, val_confirm) stay fp32.
            with hn.autocast(x.device, self.amp and split in ("test", "val")):
                logits = hn.run_model(self.model, weights, bn_stats, x)
            yield logits.float(), y_all[start:start + minibatch_size]

    @torch.no_grad()
    def correct(self, flat_weights, bn_stats, split="test"):
        """(per-image correctness, summed loss) of the model it is sent, on its own held-out data."""
        # The summed loss stays on the device, in float64: the same additions as Python floats would do
        # (each float32 batch sum is exact in float64), without a host round trip per batch.
        correct, loss = [], torch.zeros((), dtype=torch.float64, device=self.y_val.device)
        for logits, y in self.logits_on(flat_weights, bn_stats, split):
            correct.append(logits.argmax(1) == y)
            loss += F.cross_entropy(logits, y, reduction="sum").double()
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

    @torch.no_grad()
    def confirm(self, flat_before, flat_after, bn_stats):
        """What the new model changes on val_confirm, for replay's acceptance test (replay.accept): images
        it gets right and the old one wrong and the reverse, and how much it lowers the loss per image
        (mean and standard error). Four numbers go back, nothing else."""
        def per_image(flat):
            right, loss = [], []
            for logits, y in self.logits_on(flat, bn_stats, "val_confirm"):
                right.append(logits.argmax(1) == y)
                loss.append(F.cross_entropy(logits, y, reduction="none"))
            if not right:                           # no confirmation images (a tiny validation split)
                return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
            return torch.cat(right), torch.cat(loss)

        (right_before, loss_before), (right_after, loss_after) = per_image(flat_before), per_image(flat_after)
        drop = (loss_before - loss_after).double()
        # Under two images there is no spread to test against: an infinite error, which accepts nothing.
        error = drop.std().item() / len(drop) ** 0.5 if len(drop) > 1 else float("inf")
        return (int((right_after & ~right_before).sum()), int((right_before & ~right_after).sum()),
                drop.mean().item() if len(drop) else 0.0, error)


class Server:
    """The hypernetwork and all per-client state the server may hold (embeddings, BN statistics)."""

    def __init__(self, hypernet, model, batches, *, optimizer="adam", server_lr=3e-3, server_momentum=0.9,
                 server_weight_decay=0.0, grad_clip=50.0, sparsity=0.5, image_size=32, adapter_lr=1e-2):
        self.hypernet, self.model, self.batches, self.image_size = hypernet, model, batches, image_size
        self.batch_of = {cid: t for t, ids in enumerate(batches) for cid in ids}
        # The server's optimizer owns everything but the gates (BatchGates.step learns them, HAT's way; only
        # replay writes the borrow gates) and, without adapters (the paper's shape), the client offsets,
        # which then stay exactly zero.
        not_ours = {"gates.borrow"} | ({"client_offsets"} if hypernet.adapters is None else set())
        self.params = {name: p for name, p in hypernet.named_parameters()
                       if not name.startswith("gates.") and name not in not_ours}
        # ours: a new batch has a stage of tens of server steps to move its adapter as far as the classifier's
        # own scale: at the hypernetwork's rate it would not get there (docs/design.md), so it has its own rate.
        adapter_rates = {name: adapter_lr for name in self.params
                         if (name.startswith("adapters.") or name in ("client_offsets", "client_classifiers"))
                         and adapter_lr}
        self.optimizer = masks.ServerOptimizer(
            self.params, kind=optimizer, lr=server_lr, momentum=server_momentum, weight_decay=server_weight_decay,
            lr_of=adapter_rates)
        self.grad_clip, self.sparsity = grad_clip, sparsity
        fresh = hn.bn_stats_init(model)
        self.bn_stats = {cid: {n: b.clone() for n, b in fresh.items()} for ids in batches for cid in ids}
        self.label_counts = {}
        self.dreams = {}            # replay's: cid -> (images, labels, logits) dreamed from that client's model
        self.stage = 0
        self.gate_scale = 1.0       # HAT's s: annealed within a stage, 1 between stages (frozen gates ignore it)
        self.free = {}              # masks.compact_masks of what this stage may write
        # Numerical faults met and survived (reported in results.json): a NaN/Inf client update is
        # dropped, a round whose updates were all dropped makes no server step, a diverged replay is undone.
        self.faults = no_faults()

    # --- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, cid):
        """One client's flat weights, generated alone so the result never depends on who else is asked."""
        return self.hypernet([cid], [self.batch_of[cid]], s=self.gate_scale)[0]

    def evaluate(self, client):
        """(test, validation) accuracy of the client's generated model, measured by the client."""
        return client.accuracy(self.generate(client.cid), self.bn_stats[client.cid])

    # --- a stage -------------------------------------------------------------------------------------

    def begin_stage(self, t):
        """Batch t joins: fresh optimizer state, its gate prepared, and the entries this stage may write."""
        self.stage = t
        self.optimizer.reset()
        if self.hypernet.gates is not None:
            self.hypernet.gates.prepare(self.hypernet, t)
            if t > 0:
                self.blank_classifier(t)
        self.free = masks.compact_masks(self.free_masks(t))

    @torch.no_grad()
    def blank_classifier(self, t):  # ours
        """Each of batch t's clients gets the classifier offset that cancels the classifier the frozen base,
        head bias and owned units generate for it: a new client starts with a blank decision (equal logits),
        not the earlier batches' classes, while it reads their features."""
        hypernet, ids = self.hypernet, self.batches[t]
        hypernet.client_classifiers[ids] = 0.0
        generated = hypernet(ids, [t] * len(ids), s=hypernet.gates.scale(0.0))
        hypernet.client_classifiers[ids] = -generated[:, hypernet.classifier_index]

    def free_masks(self, t):
        """{parameter name: 0/1 mask} of the entries stage t may write; a name not listed is all free."""
        gates = self.hypernet.gates
        return gates.free_masks(self.hypernet, t) if gates is not None else {}

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        """One pFedHN round: generate for the round's clients in one call, local training, one server step.

        `stage_fraction` in [0, 1]: how far into the stage this round is (it sets the gates' annealing s).
        Returns the mean local loss of the kept updates (NaN if none was kept).
        """
        if self.hypernet.gates is not None:
            self.gate_scale = self.hypernet.gates.scale(stage_fraction)
        generated = self.hypernet(client_ids, [self.batch_of[c] for c in client_ids], s=self.gate_scale)
        updates = [clients[c].local_train(generated[k], self.bn_stats[c], steps, minibatch_size, lr)
                   for k, c in enumerate(client_ids)]
        return self.update(client_ids, generated, updates)

    def update(self, client_ids, generated, updates):
        """The server's half of a round (pFedHN's rule), from what the clients sent back.

        `generated` is what the updates were trained from, still attached to the hypernetwork's graph. A
        client moved its weights by delta; the hypernetwork should move so that its output moves by delta
        too. The vector-Jacobian product d(generated)/d(phi)^T (-delta) is the gradient of
        1/2 ||generated - (generated + delta)||^2, so a step pulls the generated weights toward the trained ones.
        """
        gates = self.hypernet.gates
        kept = keep_finite(updates, self.faults)        # a diverged client is dropped
        if not kept:
            return float("nan")
        kept_ids = [client_ids[k] for k in kept]
        deltas = torch.stack([updates[k].delta for k in kept])
        params = dict(self.params, **({"gates.embeddings": gates.embeddings} if gates is not None else {}))
        grads = pull_toward(generated[kept], deltas, params)
        if gates is not None:           # HAT learns the batch's gate from the same gradient (masks.py)
            gates.step(grads.pop("gates.embeddings"), self.stage, self.gate_scale, self.sparsity)
        grads = clipped(grads, self.grad_clip)
        # The step moves only what this stage may write, and only the embeddings of the kept clients.
        free = dict(self.free)
        rows = torch.zeros_like(self.hypernet.client_embeddings)
        rows[kept_ids] = 1.0
        free["client_embeddings"] = rows
        for name in ("client_offsets", "client_classifiers"):
            if name in self.params:
                free[name] = rows[:, :1].expand_as(self.params[name])
        self.optimizer.step(grads, free)
        for k in kept:
            self.bn_stats[client_ids[k]] = updates[k].bn_stats
            self.label_counts[client_ids[k]] = updates[k].label_counts
        return float(np.mean([updates[k].loss for k in kept]))

    def end_stage(self, t):
        """Freeze batch t's sub-hypernetwork; returns the neuron accounting (None without masks)."""
        self.gate_scale = 1.0
        if self.hypernet.gates is None:
            return None
        return self.hypernet.gates.finish(t)


def no_faults():
    """The fault counters every server (and every baseline) reports in results.json, all zero."""
    return {"dropped_updates": 0, "skipped_rounds": 0, "dropped_replays": 0}


def pull_toward(generated, deltas, params):
    """pFedHN's gradient of {name: parameter} from the clients' deltas: the vector-Jacobian product
    d(generated)/d(params)^T (-delta), averaged over the clients (deltas / -n is bitwise -deltas / n, with one
    pass less). A parameter the generated weights do not depend on gets a zero gradient."""
    vjp = torch.autograd.grad(generated, list(params.values()), grad_outputs=deltas / -len(deltas),
                              allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), vjp)}


def clipped(grads, max_norm):
    """The gradients scaled together so that their joint L2 norm is at most max_norm."""
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values())).item()   # one host round trip
    clip = min(1.0, max_norm / (norm + 1e-12))
    return {name: g * clip for name, g in grads.items()}


def keep_finite(updates, faults):  # ours
    """The indices of the round's updates with no NaN or Inf; the others are counted in `faults` (dropped
    updates, and a skipped round when none is left). Every server and baseline screens a round this way."""
    kept = [k for k, u in enumerate(updates) if is_finite_update(u)]
    faults["dropped_updates"] += len(updates) - len(kept)
    faults["skipped_rounds"] += not kept
    return kept


def is_finite_update(update):
    """No NaN or Inf in the delta or the BN statistics, with one host round trip for the whole update.

    x * 0 is 0 for every finite x and NaN for NaN and +-Inf, so the sum of those zeros is finite exactly
    when every entry is (it cannot overflow, as a plain sum could): one multiply and one sum per tensor,
    several times cheaper than torch.isfinite(x).all() over the 61 tensors of a client's update.
    """
    zeros = [(update.delta * 0).sum()] + [(b * 0).sum() for b in update.bn_stats.values() if b.is_floating_point()]
    return bool(torch.isfinite(torch.stack(zeros).sum()))
