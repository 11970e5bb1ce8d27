"""pFedDSH, the experiment: batches of clients join one after another, and nobody forgets.

    python train.py --dataset cifar10 --batches 2 --data-dir ../shared/data

Paper: "pFedDSH: Enabling Knowledge Transfer in Personalized Federated Learning through Data-free
Sub-Hypernetwork" (arXiv 2508.05157); our reconstruction of it is docs/design.md. Read top to bottom: the
configuration; build the data, the clients and the server; onboard the batches, one stage each (begin the
stage -> rounds of generate, local training, server update -> end the stage, freezing the batch's mask ->
replay -> evaluate everyone seen so far); then RI and PA, the paper's two effects. What real use needs
(flags, checks, resume, progress bars, results.json, the baselines, our extensions) is the shell, shell/:
nothing here imports it but the entry point at the end.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

import data
import federated as fl
import hypernet as hn
import masks

DEFAULTS = dict(
    # the setting: which data, how many batches of clients, how each client's data is drawn
    dataset="cifar10", data_dir="data", batches=2, clients_per_batch=10, classes_per_client=None,
    partition="pathological", alpha=0.5, val_fraction=0.1, seed=0, method="pfeddsh",
    # federated training: rounds per stage, clients per round, local SGD (batch_size is the SGD minibatch)
    rounds=300, clients_per_round=5, local_steps=50, batch_size=64, lr=0.05, width=64,
    # the hypernetwork (pFedHN) and its server optimizer
    server_lr=3e-3, hidden=128, hyper_layers=3, chunk_size=4096, embed_dim=32,
    # the batch masks (HAT)
    sparsity=0.5, s_max=400.0, gate_lr=0.05, classifier_lr=1e-2, no_masks=False,
    # data-free replay: DeepInversion, then fine-tuning each earlier client's embedding
    no_replay=False, replay_images=64, replay_iterations=200, replay_bn_weight=0.1, replay_steps=30,
    replay_lr=1e-2, replay_kd=1.0, replay_anchor=1.0, replay_temperature=2.0, replay_keep="own")
METHODS = ("pfeddsh", "pfedhn")     # the core's own; the shell registers the baselines and our extensions


class Hooks:
    """Where the shell listens in; these defaults do nothing, so the experiment runs bare."""

    def begin(self, server, clients, batches, model, dataset):
        """Before training: (OnboardingState, round rng) to resume from, or (None, None) to start afresh."""
        return None, None

    def after_round(self, state, rng, stage_done, loss=None):
        """After every round and every stage."""

    def replay_progress(self, phase, done, total):
        """Replay's progress: ("synthesis", iteration, iterations), then ("fine-tune", clients done, clients)."""


# ------------------------------------------------------------------------------------------------------
# Build: data, clients, the server (or one the shell's registry builds in its place)
# ------------------------------------------------------------------------------------------------------

def client_splits(config, dataset):
    """Every client's train/val/test indices and classes."""
    classes_per_client = config["classes_per_client"] or data.DEFAULT_CLASSES_PER_CLIENT[config["dataset"]]
    return data.partition(dataset.y_train, dataset.y_test, config["batches"] * config["clients_per_batch"],
                          dataset.num_classes, scheme=config["partition"], classes_per_client=classes_per_client,
                          alpha=config["alpha"], val_fraction=config["val_fraction"], seed=config["seed"])


def replay_settings(config):
    """deepinversion.replay's keyword arguments, from the config."""
    return dict(num_images=config["replay_images"], iterations=config["replay_iterations"],
                bn_weight=config["replay_bn_weight"], steps=config["replay_steps"], lr=config["replay_lr"],
                kd_weight=config["replay_kd"], anchor_weight=config["replay_anchor"],
                temperature=config["replay_temperature"], keep=config["replay_keep"])


def build_server(config, device, num_classes, image_size, servers=None):
    """(server, batches, target model, weight layout). The initial weights come from torch's global generator
    (seeded by `build`). A method that is not the core's is built by the registry the shell hands in:
    servers[method](config, device, model, batches, image_size) -> (server, layout)."""
    num_clients = config["batches"] * config["clients_per_batch"]
    batches = data.assign_batches(num_clients, config["batches"], config["seed"])
    model = hn.ResNet18(num_classes, config["width"]).to(device)
    if config["method"] not in METHODS:
        server, layout = (servers or {})[config["method"]](config, device, model, batches, image_size)
        return server, batches, model, layout
    gates = None
    if config["method"] == "pfeddsh" and not config["no_masks"]:      # pfedhn: the same server without masks
        gates = masks.BatchGates(config["batches"], config["hyper_layers"], config["hidden"], s_max=config["s_max"],
                                 lr=config["gate_lr"])
    hypernet = hn.HyperNetwork(model, num_clients, embed_dim=config["embed_dim"], hidden=config["hidden"],
                               num_layers=config["hyper_layers"], chunk_size=config["chunk_size"], gates=gates)
    replay = replay_settings(config) if config["method"] == "pfeddsh" and not config["no_replay"] else None
    server = fl.Server(hypernet.to(device), model, batches, server_lr=config["server_lr"], sparsity=config["sparsity"],
                       classifier_lr=config["classifier_lr"], image_size=image_size, replay=replay)
    return server, batches, model, hypernet.layout


def build(config, device, dataset=None, servers=None):
    """(dataset, clients, server, batches, model); `dataset` replaces the one the config names."""
    torch.manual_seed(config["seed"])
    dataset = dataset or data.load_dataset(config["dataset"], config["data_dir"], device=device)
    splits = client_splits(config, dataset)
    server, batches, model, layout = build_server(config, device, dataset.num_classes, dataset.image_size, servers)
    clients = [fl.Client(cid, dataset, split, model, layout, config["seed"]) for cid, split in enumerate(splits)]
    return dataset, clients, server, batches, model


# ------------------------------------------------------------------------------------------------------
# Onboarding: one stage per batch of clients
# ------------------------------------------------------------------------------------------------------

@dataclass
class OnboardingState:
    """Where onboarding stands: `stage` is the stage running, `round` how many of its rounds are done."""
    stage: int = 0
    round: int = 0
    accuracy: list = field(default_factory=list)        # A[t][i]: client i's test accuracy after stage t
    val_accuracy: list = field(default_factory=list)    # the same on validation: what settings are chosen on
    neurons: list = field(default_factory=list)
    replays: list = field(default_factory=list)
    round_clients: list = field(default_factory=list)   # this stage's rounds so far: PA's reference replays them
    local_accuracy: list = field(default_factory=list)  # L[t][i]: PA's reference (batch t's clients alone)


def onboard(server, clients, batches, config, state=None, rng=None, hooks=None, pa_reference=True):
    """Every stage, from where `state` stands; returns the final OnboardingState."""
    state, hooks = state or OnboardingState(), hooks or Hooks()
    rng = rng if rng is not None else np.random.default_rng(config["seed"])
    rounds, num_clients = config["rounds"], sum(len(b) for b in batches)
    for t in range(state.stage, len(batches)):
        if state.round == 0:
            server.begin_stage(t)                   # batch t joins; its gate starts (masks.py)
            state.round_clients = []
        for r in range(state.round, rounds):        # a round: generate -> local training -> server update
            round_clients = sorted(rng.choice(batches[t], size=min(config["clients_per_round"], len(batches[t])),
                                              replace=False).tolist())
            loss = server.train_round(round_clients, clients, r / max(rounds - 1, 1), config["local_steps"],
                                      config["batch_size"], config["lr"])
            state.round_clients.append(round_clients)
            state.round = r + 1
            hooks.after_round(state, rng, stage_done=False, loss=loss)
        state.neurons.append(server.end_stage(t))   # the batch's mask is binarised and frozen
        if t > 0 and getattr(server, "replay_settings", None) is not None:    # the baselines do not replay
            state.replays.append(server.replay(clients, t, config["seed"], hooks.replay_progress))
        scores = {cid: server.evaluate(clients[cid]) for b in batches[:t + 1] for cid in b}
        state.accuracy.append([scores[cid][0] if cid in scores else None for cid in range(num_clients)])
        state.val_accuracy.append([scores[cid][1] if cid in scores else None for cid in range(num_clients)])
        if pa_reference:
            state.local_accuracy.append(local_reference(clients, batches, t, state, config))
        state.stage, state.round = t + 1, 0
        hooks.after_round(state, rng, stage_done=True)
    return state


def local_reference(clients, batches, t, state, config):
    """PA's yardstick, row t: batch t's clients trained alone from the initial weights in this stage's rounds,
    with fresh generators of their own (what `--method local` gives them). None for batch 0 (PA is about
    batches that find earlier ones) and for a stage resumed from a checkpoint without its rounds' schedule."""
    if t == 0 or len(state.round_clients) != config["rounds"]:
        return None
    spent = [c.steps_trained for c in clients]         # the reference's steps are not the method's
    model = clients[0].model
    start, fresh_bn = clients[0].layout.flatten(dict(model.named_parameters())).detach(), hn.bn_stats_init(model)
    weights, bn_stats = {cid: start.clone() for cid in batches[t]}, {cid: fresh_bn for cid in batches[t]}
    generators = {cid: fl.client_generator(config["seed"], cid, start.device) for cid in batches[t]}
    for round_clients in state.round_clients:
        for cid in round_clients:
            update = clients[cid].local_train(weights[cid], bn_stats[cid], config["local_steps"],
                                              config["batch_size"], config["lr"], generator=generators[cid])
            weights[cid], bn_stats[cid] = weights[cid] + update.delta, update.bn_stats
    accuracy = {cid: clients[cid].evaluate(weights[cid], bn_stats[cid]) for cid in batches[t]}
    for client, steps in zip(clients, spent):
        client.steps_trained = steps
    return [accuracy.get(cid) for cid in range(len(clients))]


# ------------------------------------------------------------------------------------------------------
# The paper's two effects, side by side
# ------------------------------------------------------------------------------------------------------

def metrics(accuracy, batches, test_sizes, local_accuracy=None):
    """Mean accuracy after the last stage (unweighted and by test size), RI and PA.

    RI, retroactive improvement, of batch k: mean over its clients of A[T-1][i] - A[k][i], how much better
    (negative: forgetting) they are at the end than right after their own stage. Backward transfer.
    PA, plasticity, of batch t > 0: mean over its clients of A[t][i] - L[t][i], L the same client trained
    alone (local_reference). PA <= 0 is "new clients fail to outperform local training". Forward transfer.
    """
    final, ids = accuracy[-1], [cid for b in batches for cid in b]
    ri_per_batch = [float(np.mean([final[c] - accuracy[k][c] for c in b])) for k, b in enumerate(batches[:-1])]
    pa_per_batch, rows = None, local_accuracy or []
    if len(rows) == len(batches) and all(row is not None for row in rows[1:]):
        pa_per_batch = [float(np.mean([accuracy[t][c] - rows[t][c] for c in b])) for t, b in enumerate(batches[1:], 1)]
    sizes = sum(test_sizes[c] for c in ids)
    return {"mean_acc": float(np.mean([final[c] for c in ids])),
            "weighted_acc": float(sum(final[c] * test_sizes[c] for c in ids) / sizes) if sizes else float("nan"),
            "ri": float(np.mean(ri_per_batch)) if ri_per_batch else 0.0, "ri_per_batch": ri_per_batch,
            "pa": float(np.mean(pa_per_batch)) if pa_per_batch else None, "pa_per_batch": pa_per_batch,
            "batch_acc": [[None if row[b[0]] is None else float(np.mean([row[c] for c in b])) for b in batches]
                          for row in accuracy]}


def results(config, batches, state, clients):
    """Everything a run found, as results.json holds it."""
    test_sizes = [len(c.y_test) for c in clients]
    return {"config": config, "batches": batches, "accuracy": state.accuracy, "val_accuracy": state.val_accuracy,
            "metrics": metrics(state.accuracy, batches, test_sizes, state.local_accuracy),
            "val_metrics": metrics(state.val_accuracy, batches, test_sizes), "local_accuracy": state.local_accuracy,
            "neurons": state.neurons if state.neurons[-1] is not None else None, "test_sizes": test_sizes,
            "replay": state.replays, "local_steps": sum(c.steps_trained for c in clients)}


def run(config, device, hooks=None, pa_reference=True, servers=None):
    """The experiment: build, onboard every batch, measure. Bare, it runs the core's METHODS; the shell hands
    in `servers`, the registry of the baselines and our extensions (build_server)."""
    hooks = hooks or Hooks()
    dataset, clients, server, batches, model = build(config, device, servers=servers)
    state, rng = hooks.begin(server, clients, batches, model, dataset)
    return results(config, batches, onboard(server, clients, batches, config, state, rng, hooks, pa_reference), clients)


if __name__ == "__main__":
    from shell import cli      # the shell: flags, checks, resume, progress, results.json and plots
    raise SystemExit(cli.cli())
