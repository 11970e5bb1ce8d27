"""The methods pFedDSH is compared with (docs/design.md §6): same clients, split, budget and evaluation.

Each class stands in for federated.Server: the onboarding loop (train.onboard) calls begin_stage,
train_round, end_stage and evaluate; checkpoints call state_dict and load_state_dict (a federated.Server's
state is shell/checkpoint.py's). So every method trains the same clients for the same rounds and local
steps, drawing their minibatches from the same per-client generators (Client.local_train). Each method's
adaptation budget is in its docstring.

  * Local         each client trains alone from the same initial weights; nothing is ever sent.
  * FedAvg        one global model for everyone, continued on each new batch (McMahan et al., 2017,
                  "Communication-Efficient Learning of Deep Networks from Decentralized Data").
                  With finetune_steps > 0 it is FedAvg-FT: before it is evaluated, each client
                  fine-tunes the global model for that many local steps on its own training data.
  * FrozenPFedHN  pFedHN's protocol for novel clients (Shamsian et al., ICML 2021): the hypernetwork is
                  frozen after batch 0, and each later client's embedding is optimised alone.
  * PFedHNPC      pFedHN-PC (same paper): the hypernetwork generates the model, each client keeps a
                  classifier of its own.
  * FedRep        shared body, personal head (Collins et al., ICML 2021, "Exploiting Shared
                  Representations for Personalized Federated Learning"); body continued or frozen.
  * Ditto         FedAvg plus a personal model per client pulled toward the global one (Li et al.,
                  ICML 2021, "Ditto: Fair and Robust Federated Learning Through Personalization").
  * FedLwF        FedAvg whose later stages distil the previous stage's global model on the clients' own
                  data (Learning without Forgetting: Li and Hoiem, ECCV 2016; its federated form is a
                  usual federated continual-learning baseline).
  * FrozenAdapters  ours, an ablation of pFedDSH: FedAvg's body frozen after batch 0, plus pFedDSH's own
                  per-batch low-rank adapters and per-client offsets, trained as pFedDSH's server trains them.
  * FedTarget     FedAvg whose later stages distil the previous stage's global model on images the server
                  dreams from it (TARGET: Zhang et al., ICCV 2023, "TARGET: Federated Class-Continual
                  Learning via Exemplar-Free Distillation"; DeepInversion in place of its generator).

pFedHN itself is federated.Server without masks; the ablation "pFedDSH without masks" is that server
plus replay (train.py wires both). Methods with a personal part (PFedHNPC, FedRep, Ditto) keep it in
their object only so that onboard() and checkpoints handle every method alike, as Local does: only the
client it belongs to ever trains or reads it, and what is averaged or sent into the hypernetwork never
contains it (tests/test_baselines_mechanisms.py checks this).
"""
import dataclasses
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepinversion
import federated as fl
import hypernet as hn
import masks
from extensions.adapters import BatchAdapters
from shell import checkpoint
from shell.faults import is_finite_update, keep_finite, no_faults


class Local:
    """Every client's own model. The weights live here only so that onboard() and checkpoints handle
    every method alike: no client ever reads another's entry, and there is no server step."""

    def __init__(self, model, layout, batches):
        start = layout.flatten(dict(model.named_parameters())).detach().clone()
        self.weights = {cid: start.clone() for ids in batches for cid in ids}
        self.bn_stats = {cid: hn.bn_stats_init(model) for ids in batches for cid in ids}
        self.stage, self.faults = 0, no_faults()

    def begin_stage(self, t):
        self.stage = t

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        losses = []
        for cid in client_ids:
            update = clients[cid].local_train(self.weights[cid], self.bn_stats[cid], steps, minibatch_size, lr)
            if not is_finite_update(update):     # a diverged step is dropped, as the server would
                self.faults["dropped_updates"] += 1
                continue
            self.weights[cid] = self.weights[cid] + update.delta
            self.bn_stats[cid] = update.bn_stats
            losses.append(update.loss)
        return float(np.mean(losses)) if losses else float("nan")

    def end_stage(self, t):
        return None

    def evaluate(self, client):
        return accuracy(client, self.weights[client.cid], self.bn_stats[client.cid])

    def state_dict(self):
        return {"weights": self.weights, "bn_stats": self.bn_stats, "stage": self.stage, "faults": dict(self.faults)}

    def load_state_dict(self, sd):
        self.weights, self.bn_stats, self.stage = sd["weights"], sd["bn_stats"], sd["stage"]
        self.faults = dict(sd["faults"])


class FedAvg:
    """One global model; each round it moves to the average of the round's trained models."""

    def __init__(self, model, layout, batches, *, finetune_steps=0, batch_size=64, lr=0.05, seed=0):
        self.weights = layout.flatten(dict(model.named_parameters())).detach().clone()
        self.bn = hn.bn_stats_init(model)       # BN running statistics are averaged like the weights
        self.finetune_steps, self.batch_size, self.lr, self.seed = finetune_steps, batch_size, lr, seed
        self.stage, self.faults = 0, no_faults()

    def begin_stage(self, t):
        self.stage = t

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        updates = [clients[cid].local_train(self.weights, self.bn, steps, minibatch_size, lr) for cid in client_ids]
        return self.average(client_ids, clients, updates)

    def average(self, client_ids, clients, updates):
        """FedAvg's server step from the round's updates; returns their mean local loss (NaN if none kept)."""
        kept = [(client_ids[k], updates[k]) for k in keep_finite(updates, self.faults)]
        if not kept:
            return float("nan")
        # FedAvg weighs each client by its number of training images.
        sizes = torch.tensor([float(len(clients[cid].y_train)) for cid, _ in kept], device=self.weights.device)
        share = sizes / sizes.sum()
        self.weights = self.weights + sum(w * u.delta for w, (_, u) in zip(share, kept))
        self.bn = {name: (sum(w * u.bn_stats[name] for w, (_, u) in zip(share, kept)) if stat.is_floating_point()
                          else kept[0][1].bn_stats[name])       # num_batches_tracked: a counter, not averaged
                   for name, stat in self.bn.items()}
        return float(np.mean([u.loss for _, u in kept]))

    def end_stage(self, t):
        return None

    def evaluate(self, client):
        if self.finetune_steps == 0:
            return accuracy(client, self.weights, self.bn)
        # FedAvg-FT: the client fine-tunes a copy with a generator of its own for this (stage, client),
        # so evaluating never changes what later rounds draw, and FedAvg and FedAvg-FT train identically.
        generator = torch.Generator(device=client.y_train.device)
        generator.manual_seed(1_000_003 * self.seed + 10_007 * self.stage + client.cid)
        update = client.local_train(self.weights, self.bn, self.finetune_steps, self.batch_size, self.lr,
                                    generator=generator)
        return accuracy(client, self.weights + update.delta, update.bn_stats)

    def state_dict(self):
        return {"weights": self.weights, "bn": self.bn, "stage": self.stage, "faults": dict(self.faults)}

    def load_state_dict(self, sd):
        self.weights, self.bn, self.stage = sd["weights"], sd["bn"], sd["stage"]
        self.faults = dict(sd["faults"])


HEAD = ("fc.weight", "fc.bias")     # the classifier of the generated / shared ResNet-18: the personal part


def head_index(layout):
    """Flat positions of the classifier (fc.weight, fc.bias) in `layout`'s weight vector."""
    starts = dict(zip(layout.names, torch.tensor([0] + layout.numels).cumsum(0)[:-1].tolist()))
    numels = dict(zip(layout.names, layout.numels))
    return torch.cat([torch.arange(starts[n], starts[n] + numels[n]) for n in HEAD])


def accuracy(client, flat, bn_stats):
    """(test, validation) accuracy of a model on the client's own held-out data, measured by the client."""
    return client.evaluate(flat, bn_stats), client.evaluate(flat, bn_stats, "val")


def without_head(update, index):
    """The update with its classifier part zeroed: what leaves a client whose classifier is its own."""
    return dataclasses.replace(update, delta=update.delta.index_fill(0, index.to(update.delta.device), 0.0))


class FrozenPFedHN(fl.Server):
    """pFedHN's protocol for novel clients: after batch 0 the hypernetwork is frozen and each new client
    learns only its own embedding, with an optimiser of its own.

    Adaptation budget: the same rounds and local steps as every method; from batch 1 on, the server's
    step moves nothing but the round's clients' embeddings, with Adam at `embed_lr` (fresh each stage)
    instead of the hypernetwork's optimiser and rate. The gradient clip then sees the embeddings alone.
    """

    def __init__(self, *args, embed_lr=0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_lr = embed_lr
        self.hypernet_params = self.params

    def use_stage(self, t):
        """Batch 0 trains the whole hypernetwork; later stages own only the embeddings, so the VJP, the
        clip and the optimiser see nothing else: at the hypernetwork's Adam rate of 3e-3 an embedding drawn
        from N(0, 1) would move about 0.06 in a stage of 20 steps (docs/design.md §6)."""
        if t == 0:
            self.params = self.hypernet_params
            return
        self.params = {"client_embeddings": self.hypernet.client_embeddings}
        self.optimizer = masks.ServerOptimizer(self.params, lr=self.embed_lr)

    def begin_stage(self, t):
        self.use_stage(t)
        super().begin_stage(t)

    def load_state_dict(self, sd):
        self.use_stage(sd["stage"])         # the optimiser of the stage the checkpoint was in
        checkpoint.load_hypernet_server_state(self, sd)


class PFedHNPC(fl.Server):
    """pFedHN-PC: pFedHN with a personal classifier. The hypernetwork generates the whole ResNet, but each
    client replaces the generated classifier (fc.weight, fc.bias) with its own, trained in its local steps
    together with the rest and never sent: the delta that reaches the hypernetwork has zeros there.

    Adaptation budget: the same rounds and local steps as pfedhn; the classifier learns in those steps.
    Each client's classifier starts from the target model's initial one. The hypernetwork is continued on
    every new batch, as pfedhn's is.
    """

    def __init__(self, hypernet, model, batches, **kwargs):
        super().__init__(hypernet, model, batches, **kwargs)
        self.head_index = head_index(hypernet.layout).to(hypernet.base.device)
        start = hypernet.layout.flatten(dict(model.named_parameters())).detach()[self.head_index]
        self.heads = {cid: start.clone() for ids in batches for cid in ids}     # each client's own

    def with_head(self, flat, cid):
        return flat.detach().index_copy(0, self.head_index, self.heads[cid])

    @torch.no_grad()
    def generate(self, cid):
        return self.with_head(super().generate(cid), cid)

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        generated = self.hypernet(client_ids, [self.batch_of[c] for c in client_ids], s=self.gate_scale)
        updates = []
        for k, cid in enumerate(client_ids):
            update = clients[cid].local_train(self.with_head(generated[k], cid), self.bn_stats[cid], steps,
                                              minibatch_size, lr)
            if is_finite_update(update):     # the client's half: its classifier moves on its side only
                self.heads[cid] = self.heads[cid] + update.delta[self.head_index]
            updates.append(without_head(update, self.head_index))
        return self.update(client_ids, generated, updates)

    def state_dict(self):
        return dict(checkpoint.hypernet_server_state(self), heads=self.heads)

    def load_state_dict(self, sd):
        checkpoint.load_hypernet_server_state(self, sd)
        self.heads = sd["heads"]


class FedRep(FedAvg):
    """FedRep: a shared body averaged FedAvg-style (BN statistics with it), and a head (the classifier
    fc.*) of each client's own, trained locally and never averaged.

    Local update (FedRep's alternation, simplified to fit everyone's budget): of a round's K local steps,
    the first ceil(K/2) train the head with the body fixed, the rest the body with the new head fixed
    (FedRep itself gives the head several epochs and the body one). So the adaptation budget is the same
    K steps per round as every method (with K = 1 the body never trains).
    frozen=True (fedrep-frozen): after batch 0 the body and its BN statistics never change; new clients
    spend all K steps on their heads. Earlier clients then cannot forget.
    A client's head starts from the initial classifier, which the global vector keeps (it is never averaged).
    """

    def __init__(self, model, layout, batches, *, frozen=False, **kwargs):
        super().__init__(model, layout, batches, **kwargs)
        self.frozen = frozen
        self.head_index = head_index(layout).to(self.weights.device)
        self.heads = {}         # cid -> its head (flat); only that client trains or reads it
        self.body_names = [n for n in layout.names if n not in HEAD]

    def body_frozen(self):
        return self.frozen and self.stage > 0

    def head_of(self, cid):
        return self.heads.get(cid, self.weights[self.head_index])

    def model_of(self, cid):
        return self.weights.index_copy(0, self.head_index, self.head_of(cid))

    def local_round(self, client, steps, minibatch_size, lr):
        """The client's side: head steps, then body steps; the update carries both (one delta)."""
        start = self.model_of(client.cid)
        head_steps = steps if self.body_frozen() else (steps + 1) // 2
        head = client.local_train(start, self.bn, head_steps, minibatch_size, lr, trainable=HEAD)
        if head_steps == steps or not is_finite_update(head):
            return head
        body = client.local_train(start + head.delta, head.bn_stats, steps - head_steps, minibatch_size, lr,
                                  trainable=self.body_names)
        loss = (head_steps * head.loss + (steps - head_steps) * body.loss) / steps
        return dataclasses.replace(body, delta=head.delta + body.delta, loss=loss)

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        updates = [self.local_round(clients[cid], steps, minibatch_size, lr) for cid in client_ids]
        for cid, update in zip(client_ids, updates):
            if is_finite_update(update):     # the head stays with its client
                self.heads[cid] = self.head_of(cid) + update.delta[self.head_index]
        body_updates = [without_head(u, self.head_index) for u in updates]
        if not self.body_frozen():
            return self.average(client_ids, clients, body_updates)
        kept = keep_finite(updates, self.faults)
        return float(np.mean([updates[k].loss for k in kept])) if kept else float("nan")

    def evaluate(self, client):
        return accuracy(client, self.model_of(client.cid), self.bn)

    def state_dict(self):
        return dict(super().state_dict(), heads=self.heads)

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.heads = sd["heads"]


class Ditto(FedAvg):
    """Ditto: FedAvg's global model, plus a personal model per client trained with a proximal pull
    lam / 2 * ||v - w||^2 toward the global model w it received that round. The personal model is what a
    client is evaluated with; a client that has left keeps its last one (so RI is 0 by construction).

    Adaptation budget: each round a client takes K local steps for the global model and K more for its
    personal one (Ditto's protocol): twice the local computation of FedAvg, with the same rounds.
    A personal model starts as the global model (and BN statistics) of the client's first round.
    """

    def __init__(self, model, layout, batches, *, lam=0.1, **kwargs):
        super().__init__(model, layout, batches, **kwargs)
        self.layout, self.lam = layout, lam
        self.personal, self.personal_bn = {}, {}

    def proximal(self, anchor):
        """The extra loss of the personal steps: the pull toward `anchor` (flat, the received global model)."""
        anchor = self.layout.unflatten(anchor)
        return lambda weights, x, logits: 0.5 * self.lam * sum(((w - anchor[n]) ** 2).sum()
                                                               for n, w in weights.items())

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        received, pull = self.weights, self.proximal(self.weights)
        updates = []
        for cid in client_ids:
            updates.append(clients[cid].local_train(received, self.bn, steps, minibatch_size, lr))
            if cid not in self.personal:
                self.personal[cid], self.personal_bn[cid] = received.clone(), dict(self.bn)
            own = clients[cid].local_train(self.personal[cid], self.personal_bn[cid], steps, minibatch_size, lr,
                                           extra_loss=pull)
            if is_finite_update(own):
                self.personal[cid], self.personal_bn[cid] = self.personal[cid] + own.delta, own.bn_stats
            else:
                self.faults["dropped_updates"] += 1
        return self.average(client_ids, clients, updates)

    def evaluate(self, client):
        if client.cid not in self.personal:         # never trained: the global model is all it has
            return super().evaluate(client)
        return accuracy(client, self.personal[client.cid], self.personal_bn[client.cid])

    def state_dict(self):
        return dict(super().state_dict(), personal=self.personal, personal_bn=self.personal_bn)

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.personal, self.personal_bn = sd["personal"], sd["personal_bn"]


class FedLwF(FedAvg):
    """FedLwF: FedAvg continued on each new batch; from stage 1 on, each client's local loss adds
    kd_weight * T^2 * KL(teacher_T || student_T), the teacher being the global model as it was at the end
    of the previous stage, run on the same augmented minibatch (its outputs over every class: a fixed task).

    Adaptation budget: the same rounds and local steps as FedAvg; each step also runs the teacher forward.
    """

    def __init__(self, model, layout, batches, *, kd_weight=1.0, temperature=2.0, **kwargs):
        super().__init__(model, layout, batches, **kwargs)
        self.model, self.layout = model, layout
        self.kd_weight, self.temperature = kd_weight, temperature
        self.teacher = None         # (flat weights, BN statistics) of the previous stage's global model

    def begin_stage(self, t):
        super().begin_stage(t)
        if t > 0:
            self.teacher = (self.weights.clone(), {n: b.clone() for n, b in self.bn.items()})

    def distillation(self):
        """The extra loss of a local step: KD toward the teacher's softened outputs."""
        weights, bn = self.layout.unflatten(self.teacher[0]), self.teacher[1]
        T = self.temperature

        def extra_loss(student_weights, x, logits):
            with torch.no_grad():
                # eval mode: the teacher answers with its own running statistics (as it was evaluated) and
                # leaves them untouched; the client's training goes on in train mode.
                self.model.eval()
                target = F.softmax(hn.run_model(self.model, weights, bn, x).float() / T, dim=1)
                self.model.train()
            kd = F.kl_div(F.log_softmax(logits.float() / T, dim=1), target, reduction="batchmean")
            return self.kd_weight * T * T * kd
        return extra_loss

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        if self.teacher is None or self.kd_weight == 0:
            return super().train_round(client_ids, clients, stage_fraction, steps, minibatch_size, lr)
        kd = self.distillation()
        updates = [clients[cid].local_train(self.weights, self.bn, steps, minibatch_size, lr, extra_loss=kd)
                   for cid in client_ids]
        return self.average(client_ids, clients, updates)

    def state_dict(self):
        return dict(super().state_dict(), teacher=self.teacher)

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.teacher = sd["teacher"]


class ClientAdapters(nn.Module):  # ours
    """pFedDSH's own adaptation parameters (hypernet.py) on a fixed body instead of a hypernetwork's output:
    each batch's low-rank offset of the convolutions (hn.BatchAdapters, its budget counted the same way),
    each client's offset of its non-convolution weights (HyperNetwork.client_offsets) and of its classifier
    (HyperNetwork.client_classifiers), under the same names. All start at zero (the adapter as U = 0)."""

    def __init__(self, layout, num_clients, num_batches, budget):
        super().__init__()
        self.register_buffer("non_conv_index", layout.index_of(lambda name, shape: len(shape) < 4))
        self.register_buffer("classifier_index", layout.classifier_index.clone())
        self.client_offsets = nn.Parameter(torch.zeros(num_clients, len(self.non_conv_index)))
        self.client_classifiers = nn.Parameter(torch.zeros(num_clients, len(self.classifier_index)))
        reserved = math.ceil(num_clients / num_batches) * self.client_offsets.shape[1]     # as HyperNetwork counts
        self.adapters = BatchAdapters(layout, num_batches, budget, reserved=reserved)

    def forward(self, body, client_ids, batch_of_client):
        """Flat weights, (len(client_ids), num_weights): the body plus what is the batch's and the client's,
        added in HyperNetwork.forward's order."""
        ids = torch.as_tensor(client_ids, device=body.device)
        weights = body + self.adapters(torch.as_tensor(batch_of_client, device=body.device))
        weights = weights.index_add(1, self.classifier_index, self.client_classifiers[ids])
        return weights.index_add(1, self.non_conv_index, self.client_offsets[ids])


class FrozenAdapters(FedAvg):  # ours
    """An ablation of pFedDSH: how far parameter-efficient fine-tuning on a frozen body goes without the
    sub-hypernetwork and its masks. Batch 0 trains FedAvg's global model, bit for bit as fedavg does (so
    batch 0 is every weight baseline's batch 0), and keeps it. After batch 0 that body and its BN statistics
    never change; each later client's model is body + its batch's low-rank adapter + its own offsets
    (ClientAdapters: pFedDSH's, LoRA-style: Hu et al., ICLR 2022), written only in its batch's stage.

    How they learn: the clients train as in every method (K SGD steps on the whole model they are sent, a
    delta back), and the server moves the adapter and the offsets by pFedDSH's own step
    (federated.Server.update): pFedHN's vector-Jacobian product of the deltas, the clip at 50, Adam at
    `--adapter-lr`, reset each stage. Clients training the adapter directly would also work; this way what
    a client computes and sends is pfeddsh's, and the one difference left is what generates the rest of
    the model (a frozen FedAvg body here, the hypernetwork with batch masks there). As in pfeddsh, a new
    client starts with a blank classifier (its classifier offset cancels the body's) and with its own BN
    statistics (here the body's), which it then keeps.

    Adaptation budget: the same rounds and local steps as every method. What a batch learns after batch 0
    is pfeddsh's: an adapter of the rank `--adapter-budget` allows once the batch's client offsets are
    counted (the same rank as pfeddsh's), the offsets, and each client's classifier offset (outside the
    budget, as in pfeddsh). Batch 0's clients have no offsets of their own (FedAvg's batch 0).
    """

    def __init__(self, model, layout, batches, *, adapter_budget=0.05, adapter_lr=1e-2, grad_clip=50.0, **kwargs):
        super().__init__(model, layout, batches, **kwargs)
        self.batches = batches
        self.batch_of = {cid: t for t, ids in enumerate(batches) for cid in ids}
        self.adapted = ClientAdapters(layout, len(self.batch_of), len(batches), adapter_budget).to(self.weights.device)
        self.params = dict(self.adapted.named_parameters())
        self.optimizer = masks.ServerOptimizer(self.params, lr=adapter_lr)
        self.grad_clip = grad_clip
        self.bn_stats = {}          # cid -> its own BN statistics, for the clients of batch 1 on

    def begin_stage(self, t):
        super().begin_stage(t)
        self.optimizer.reset()
        if t > 0:
            self.start_batch(t)

    @torch.no_grad()
    def start_batch(self, t):
        """Batch t's clients start with the body's BN statistics and a blank classifier (as pfeddsh's new
        clients do, Server.blank_classifier): equal logits, on the body's features."""
        ids, adapted = self.batches[t], self.adapted
        for cid in ids:
            self.bn_stats[cid] = {n: b.clone() for n, b in self.bn.items()}
        adapted.client_classifiers[ids] = 0.0
        adapted.client_classifiers[ids] = -adapted(self.weights, ids, [t] * len(ids))[:, adapted.classifier_index]

    def generated(self, client_ids):
        return self.adapted(self.weights, client_ids, [self.batch_of[c] for c in client_ids])

    @torch.no_grad()
    def generate(self, cid):
        return self.generated([cid])[0]

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        if self.stage == 0:
            return super().train_round(client_ids, clients, stage_fraction, steps, minibatch_size, lr)
        generated = self.generated(client_ids)
        updates = [clients[c].local_train(generated[k], self.bn_stats[c], steps, minibatch_size, lr)
                   for k, c in enumerate(client_ids)]
        return self.update(client_ids, generated, updates)

    def update(self, client_ids, generated, updates):
        """federated.Server.update on these parameters alone: the VJP pulls each generated model toward the
        one its client trained, clipped; the step writes batch t's adapter and the kept clients' rows only."""
        kept = keep_finite(updates, self.faults)
        if not kept:
            return float("nan")
        deltas = torch.stack([updates[k].delta for k in kept])
        grads = fl.clipped(fl.pull_toward(generated[kept], deltas, self.params), self.grad_clip)
        rows = torch.zeros(len(self.batch_of), 1, dtype=torch.bool, device=self.weights.device)
        rows[[client_ids[k] for k in kept]] = True
        free = {}
        for name, p in self.params.items():
            if name.startswith("adapters."):
                free[name] = torch.zeros_like(p, dtype=torch.bool)
                free[name][self.stage] = True
            else:
                free[name] = rows.expand_as(p)
        self.optimizer.step(grads, free)
        for k in kept:
            self.bn_stats[client_ids[k]] = updates[k].bn_stats
        return float(np.mean([updates[k].loss for k in kept]))

    def evaluate(self, client):
        if self.batch_of[client.cid] == 0:      # batch 0 keeps FedAvg's model: the body
            return super().evaluate(client)
        return accuracy(client, self.generate(client.cid), self.bn_stats[client.cid])

    def state_dict(self):
        return dict(super().state_dict(), adapted=self.adapted.state_dict(),
                    optimizer=(self.optimizer.state, self.optimizer.steps),
                    bn_stats=self.bn_stats)

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.adapted.load_state_dict(sd["adapted"])
        self.optimizer.state, self.optimizer.steps = sd["optimizer"]
        self.bn_stats = sd["bn_stats"]


class FedTarget(FedAvg):
    """TARGET-style federated continual learning: FedAvg continued on each new batch; when stage t >= 1
    begins, the server dreams images from the global model as it ended stage t - 1 (DeepInversion from its
    weights and averaged BN statistics, labels in proportion to the label counts its clients uploaded: no
    client's data) and keeps them with that model's logits. They are sent to the clients, and each local
    step adds kd_weight * T^2 * KL(teacher_T || student_T) on a minibatch of them (as many dreams as the
    client's own minibatch, drawn by the client's own generator).

    How it differs from TARGET (Zhang et al., ICCV 2023): TARGET trains a generator on the server (BN
    statistics, cross-entropy, and an adversarial term against a student it distils along the way) and
    keeps 8000 of its images at CIFAR scale; we optimise the pixels directly (deepinversion.synthesize:
    BN statistics, cross-entropy, image priors) at replay's budget: --replay-images x --clients-per-batch
    images in --replay-iterations steps, as many as pfeddsh dreams from a new batch. Its clients learn the
    new classes on their own logits only (class-incremental heads) and distil only the old classes'
    logits, with weight 25 at T = 2 and no T^2 in the public code (about 6 on our scale); here, as in
    fedlwf, the cross-entropy and the KD cover every class of the shared classifier, at --lwf-weight and
    --lwf-temperature (fedlwf's, not tuned for this method, so that the two differ only in what is
    distilled on: the clients' data there, the server's dreams here). TARGET augments the dreams and runs
    the teacher on every step; ours are distilled as dreamed, on the logits the server computed once (it
    sends images and logits, never the teacher). A student's forward on the dreams runs in train mode
    (batch statistics) on a copy of the BN statistics, so the client's running statistics stay those of
    its own data.

    Adaptation budget: the same rounds and local steps as FedAvg; each step also runs the student forward
    and backward on a minibatch of dreams (about twice a step's computation), and each stage from 1 on
    starts with one DeepInversion run on the server.
    """

    def __init__(self, model, layout, batches, *, kd_weight=1.0, temperature=2.0, num_images=64, iterations=200,
                 bn_weight=0.1, image_size=32, **kwargs):
        super().__init__(model, layout, batches, **kwargs)
        self.model, self.layout = model, layout
        self.kd_weight, self.temperature = kd_weight, temperature
        self.synthesis = dict(num_images=num_images, iterations=iterations, bn_weight=bn_weight, image_size=image_size)
        self.label_counts = {}      # cid -> the label counts it uploads (every client does, in every method)
        self.dreams = None          # (images, the previous global model's logits on them): what the clients receive

    def begin_stage(self, t):
        super().begin_stage(t)
        if t > 0 and self.kd_weight > 0:
            self.dreams = self.dream(t)

    def dream(self, t):
        """(images, logits) dreamed from the global model alone, as it is now: the end of stage t - 1."""
        weights = self.layout.unflatten(self.weights)
        images, _, _, _ = deepinversion.synthesize(self.model, [(weights, self.bn, sum(self.label_counts.values()))],
                                                   seed=self.seed + t, **self.synthesis)
        self.model.eval()           # the teacher answers with its own running statistics
        with torch.no_grad():
            logits = hn.run_model(self.model, weights, self.bn, images[0])
        return images[0], logits

    def distillation(self, client):
        """The extra loss of `client`'s local steps: KD toward the previous model's logits on its dreams."""
        images, teacher_logits = self.dreams

        def extra_loss(student_weights, x, logits):
            # ours: the client draws its dreams as it draws its own minibatches, with its own generator
            pick = torch.randint(len(images), (len(x),), generator=client.generator,
                                 device=client.generator.device).to(images.device)
            # ours: a copy of BN statistics to run on (train mode reads only the batch's statistics), so the
            # dreams never enter the client's running statistics
            scratch = {n: b.clone() for n, b in self.bn.items()}
            student = hn.run_model(self.model, student_weights, scratch, images[pick])
            return self.kd_weight * deepinversion.distillation_loss(student.float(), teacher_logits[pick],
                                                                    self.temperature)
        return extra_loss

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        updates = []
        for cid in client_ids:
            kd = None if self.dreams is None else self.distillation(clients[cid])
            updates.append(clients[cid].local_train(self.weights, self.bn, steps, minibatch_size, lr, extra_loss=kd))
            self.label_counts[cid] = updates[-1].label_counts
        return self.average(client_ids, clients, updates)

    def state_dict(self):
        return dict(super().state_dict(), label_counts=self.label_counts, dreams=self.dreams)

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.label_counts, self.dreams = sd["label_counts"], sd["dreams"]


# ------------------------------------------------------------------------------------------------------
# The registry the shell hands the core: train.build_server(..., servers=SERVERS) builds a baseline with
# SERVERS[method](config, device, model, batches, image_size) -> (server, weight layout)
# ------------------------------------------------------------------------------------------------------

def weight_server(config, device, model, batches, image_size):
    """The baselines that train the target model's weights themselves, without a hypernetwork."""
    method, layout = config["method"], hn.WeightLayout(model)
    if method == "local":
        return Local(model, layout, batches), layout
    common = dict(batch_size=config["batch_size"], lr=config["lr"], seed=config["seed"])
    if method in ("fedrep", "fedrep-frozen"):
        server = FedRep(model, layout, batches, frozen=method == "fedrep-frozen", **common)
    elif method == "ditto":
        server = Ditto(model, layout, batches, lam=config["ditto_lambda"], **common)
    elif method == "fedlwf":
        server = FedLwF(model, layout, batches, kd_weight=config["lwf_weight"], temperature=config["lwf_temperature"],
                        **common)
    elif method == "fedtarget":
        server = FedTarget(model, layout, batches, kd_weight=config["lwf_weight"],
                           temperature=config["lwf_temperature"],
                           num_images=config["replay_images"] * config["clients_per_batch"],
                           iterations=config["replay_iterations"], bn_weight=config["replay_bn_weight"],
                           image_size=image_size, **common)
    elif method == "frozen-adapters":
        server = FrozenAdapters(model, layout, batches, adapter_budget=config["adapter_budget"],
                                adapter_lr=config["adapter_lr"], **common)
    else:
        finetune_steps = config["local_steps"] if method == "fedavg-ft" else 0
        server = FedAvg(model, layout, batches, finetune_steps=finetune_steps, **common)
    return server, layout


def hypernet_server(config, device, model, batches, image_size):
    """pFedHN's two baselines: the core's hypernetwork without masks (pfedhn's), under another server."""
    num_clients = config["batches"] * config["clients_per_batch"]
    hypernet = hn.HyperNetwork(model, num_clients, embed_dim=config["embed_dim"], hidden=config["hidden"],
                               num_layers=config["hyper_layers"], chunk_size=config["chunk_size"]).to(device)
    settings = dict(server_lr=config["server_lr"], image_size=image_size)
    if config["method"] == "pfedhn-frozen":
        server = FrozenPFedHN(hypernet, model, batches, embed_lr=config["embed_lr"], **settings)
    else:
        server = PFedHNPC(hypernet, model, batches, **settings)
    return server, hypernet.layout


SERVERS = {**{method: weight_server for method in ("local", "fedavg", "fedavg-ft", "fedrep", "fedrep-frozen",
                                                   "ditto", "fedlwf", "fedtarget", "frozen-adapters")},
           "pfedhn-frozen": hypernet_server, "pfedhn-pc": hypernet_server}
