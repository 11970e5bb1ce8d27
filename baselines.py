"""The methods pFedDSH is compared with (docs/design.md §6): same clients, split, budget and evaluation.

Each class stands in for federated.Server: the onboarding loop (train.onboard) calls begin_stage,
train_round, end_stage and evaluate; checkpoints call state_dict and load_state_dict. So every method
trains the same clients for the same rounds and local steps, drawing the same minibatches.

  * Local         each client trains alone from the same initial weights; nothing is ever sent.
  * FedAvg        one global model for everyone, continued on each new batch (McMahan et al., 2017,
                  "Communication-Efficient Learning of Deep Networks from Decentralized Data").
                  With finetune_steps > 0 it is FedAvg-FT: before it is evaluated, each client
                  fine-tunes the global model for that many local steps on its own training data.
  * FrozenPFedHN  pFedHN whose hypernetwork is frozen after batch 0: later batches learn only their
                  own embeddings, so earlier clients cannot forget, and new ones have little to adapt.

pFedHN itself is federated.Server without masks; the ablation "pFedDSH without masks" is that server
plus replay (train.py wires both).
"""
import numpy as np
import torch

import federated as fl
import hypernet as hn


class Local:
    """Every client's own model. The weights live here only so that onboard() and checkpoints handle
    every method alike: no client ever reads another's entry, and there is no server step."""

    def __init__(self, model, layout, batches):
        start = layout.flatten(dict(model.named_parameters())).detach().clone()
        self.weights = {cid: start.clone() for ids in batches for cid in ids}
        self.bn_stats = {cid: hn.bn_stats_init(model) for ids in batches for cid in ids}
        self.stage, self.faults = 0, fl.no_faults()

    def begin_stage(self, t):
        self.stage = t

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        losses = []
        for cid in client_ids:
            update = clients[cid].local_train(self.weights[cid], self.bn_stats[cid], steps, minibatch_size, lr)
            if not fl.is_finite_update(update):     # a diverged step is dropped, as the server would
                self.faults["dropped_updates"] += 1
                continue
            self.weights[cid] = self.weights[cid] + update.delta
            self.bn_stats[cid] = update.bn_stats
            losses.append(update.loss)
        return float(np.mean(losses)) if losses else float("nan")

    def end_stage(self, t):
        return None

    def evaluate(self, client):
        return client.accuracy(self.weights[client.cid], self.bn_stats[client.cid])

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
        self.stage, self.faults = 0, fl.no_faults()

    def begin_stage(self, t):
        self.stage = t

    def train_round(self, client_ids, clients, stage_fraction, steps, minibatch_size, lr):
        updates = [clients[cid].local_train(self.weights, self.bn, steps, minibatch_size, lr) for cid in client_ids]
        kept = [(cid, u) for cid, u in zip(client_ids, updates) if fl.is_finite_update(u)]
        self.faults["dropped_updates"] += len(updates) - len(kept)
        if not kept:
            self.faults["skipped_rounds"] += 1
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
            return client.accuracy(self.weights, self.bn)
        # FedAvg-FT: the client fine-tunes a copy with a generator of its own for this (stage, client),
        # so evaluating never changes what later rounds draw, and FedAvg and FedAvg-FT train identically.
        generator = torch.Generator(device=client.y_train.device)
        generator.manual_seed(1_000_003 * self.seed + 10_007 * self.stage + client.cid)
        update = client.local_train(self.weights, self.bn, self.finetune_steps, self.batch_size, self.lr,
                                    generator=generator)
        return client.accuracy(self.weights + update.delta, update.bn_stats)

    def state_dict(self):
        return {"weights": self.weights, "bn": self.bn, "stage": self.stage, "faults": dict(self.faults)}

    def load_state_dict(self, sd):
        self.weights, self.bn, self.stage = sd["weights"], sd["bn"], sd["stage"]
        self.faults = dict(sd["faults"])


class FrozenPFedHN(fl.Server):
    """pFedHN, except that from batch 1 on only the client embeddings may move."""

    def free_masks(self, t):
        if t == 0:
            return super().free_masks(t)
        # train_round then frees the embedding rows of the round's clients, and nothing else.
        return {name: torch.zeros_like(p) for name, p in self.params.items() if name != "client_embeddings"}
