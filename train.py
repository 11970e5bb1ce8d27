"""pFedDSH, the experiment: batches of clients join one after another, and nobody forgets.

    python train.py --dataset cifar10 --batches 2 --data-dir ../shared/data

Paper: "pFedDSH: Enabling Knowledge Transfer in Personalized Federated Learning through Data-free
Sub-Hypernetwork" (arXiv 2508.05157); our reconstruction of it is docs/design.md. Read top to bottom:
the configuration; build the data, the clients and the server; onboard the batches, one stage each
(begin the stage -> rounds of generate, local training, server update -> end the stage, freezing the
batch's mask -> replay -> evaluate everyone seen so far); then RI and PA, the paper's two effects.
The machinery real use needs (flags and checks, resume, progress bars, results.json and plots,
comparisons, the baselines, Flower) is the shell, shell/: it hands this file `Hooks` to listen in, and the
baselines' registry (build_server's `servers`). Nothing here imports the shell but the entry point at the end.
"""
import sys

if sys.version_info < (3, 10):          # before the imports below: they use zip(strict=True) and `X | None`
    print(f"error: pFedDSH needs Python >= 3.10, this is Python {sys.version.split()[0]}", file=sys.stderr)
    sys.exit(2)
# (the imports come after the check, on purpose)
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import data
import federated as fl
import hypernet as hn
import masks
import replay

# ------------------------------------------------------------------------------------------------------
# Configuration: every setting and its default (`python train.py --help` explains each one)
# ------------------------------------------------------------------------------------------------------
DEFAULTS = dict(
    # the setting: which data, how many batches of clients, how each client's data is drawn
    dataset="cifar10", data_dir="data", batches=2, clients_per_batch=10, classes_per_client=None,
    partition="pathological", alpha=0.5, val_fraction=0.1, seed=0,
    # federated training: rounds per stage, clients per round, local SGD (batch_size is the SGD minibatch)
    rounds=300, clients_per_round=5, local_steps=50, batch_size=64, lr=0.05, width=64, method="pfeddsh",
    # the hypernetwork (pFedHN) and its server optimizer
    server_lr=3e-3, server_optimizer="adam", hidden=128, hyper_layers=3, chunk_size=4096, embed_dim=32,
    # baselines (shell/baselines.py): pfedhn-frozen's embedding rate, Ditto's pull, FedLwF's distillation; lambda
    # and the LwF weight chosen on validation, development seeds 100-101 (docs/results.md)
    embed_lr=0.1, ditto_lambda=0.01, lwf_weight=1.0, lwf_temperature=2.0,
    # the batch masks (HAT); gate_start, and the adapters and client offsets, are ours
    sparsity=0.5, s_max=400.0, gate_lr=0.05, gate_start=0.0, no_masks=False, adapter_budget=0.05, adapter_lr=1e-2,
    # data-free replay (DeepInversion, then fine-tuning); replay "paper" asks no client, "ours" adds the
    # clients' validation and confirmation test; the controls (replay_control noise / own) are ours
    no_replay=False, replay="ours", replay_control="none", replay_images=64, replay_iterations=200, replay_bn_weight=0.1, replay_steps=30,
    replay_lr=1e-2, replay_kd=1.0, replay_anchor=1.0, replay_temperature=2.0, replay_validate_every=3,
    replay_confirm_alpha=0.05,
    # ours, the shell's: privacy of replay, where the run goes, how it runs
    bn_noise=0.0, privacy_audit=False, device="auto", out=None, checkpoint_every=10, engine="local",
    node_timeout=600.0, amp=False, threads=None, deterministic=False)
PRESETS = {
    "full": {},     # the defaults: the full-scale protocol (ResNet-18 width 64), for a GPU
    # the same pipeline on one CPU core in minutes: narrow ResNet-18, 5 clients per batch, short stages
    "cpu-demo": dict(width=16, clients_per_batch=5, rounds=20, clients_per_round=5, local_steps=5, batch_size=32,
                     replay_images=16, replay_iterations=50, replay_steps=30),
}


class Hooks:
    """Where the shell (shell/runner.py) listens in; these defaults do nothing, so the experiment runs bare."""
    uploads = None      # replay's view of the clients' statistics (privacy.uploads under --bn-noise; ours)
    audit = None        # the privacy audit after each replay (ours)

    def begin(self, server, clients, batches, model, dataset=None):
        """Before training: (OnboardingState, round rng) to resume from, or (None, None) to start afresh."""
        return None, None

    def after_round(self, state, rng, stage_done, loss=None):
        """After every round and every stage: where the shell shows progress, checkpoints and stops."""

    def replay_progress(self, phase, done, total):
        """Replay's progress: ("synthesis", iteration, iterations), then ("fine-tune", clients done, clients)."""


# ------------------------------------------------------------------------------------------------------
# Build: data, clients, the server (or a baseline standing in for it)
# ------------------------------------------------------------------------------------------------------

def client_splits(config, dataset):
    """Every client's train/val/test indices and classes (a Flower node makes the same call for its own)."""
    classes_per_client = config["classes_per_client"] or data.DEFAULT_CLASSES_PER_CLIENT[config["dataset"]]
    return data.partition(dataset.y_train, dataset.y_test, config["batches"] * config["clients_per_batch"],
                          dataset.num_classes, scheme=config["partition"], classes_per_client=classes_per_client,
                          alpha=config["alpha"], val_fraction=config["val_fraction"], seed=config["seed"])


METHODS = ("pfeddsh", "pfedhn")     # the core's own; the baselines are the shell's (shell/baselines.py)


def hypernetwork(config, model, device, gates=None):
    """pFedHN's hypernetwork over every client's embedding; with `gates` (pFedDSH's batch masks), its adapters."""
    num_clients = config["batches"] * config["clients_per_batch"]
    return hn.HyperNetwork(model, num_clients, embed_dim=config["embed_dim"], hidden=config["hidden"],
                           num_layers=config["hyper_layers"], chunk_size=config["chunk_size"], gates=gates,
                           adapter_budget=config["adapter_budget"] if gates is not None else 0.0).to(device)


def server_settings(config, image_size):
    """federated.Server's keyword arguments (and those of the baselines built on it)."""
    return dict(optimizer=config["server_optimizer"], server_lr=config["server_lr"], sparsity=config["sparsity"],
                adapter_lr=config["adapter_lr"], image_size=image_size)


def build_server(config, device, num_classes, image_size, servers=None):
    """(server, batches, target model, weight layout): no data needed. Called right after
    torch.manual_seed(seed): the initial weights come from torch's global generator. A method other than
    the core's own (METHODS) is built by `servers[method](config, device, model, batches, image_size)` ->
    (server, layout): the registry the shell hands in (shell.baselines.SERVERS)."""
    num_clients = config["batches"] * config["clients_per_batch"]
    batches = data.assign_batches(num_clients, config["batches"], config["seed"])
    model = hn.ResNet18(num_classes, config["width"]).to(device)
    method = config["method"]
    if method not in METHODS:
        if method not in (servers or {}):
            raise ValueError(f"method '{method}' is not the core's ({', '.join(METHODS)}): a baseline needs the "
                             "shell's registry, servers=shell.baselines.SERVERS (python train.py passes it)")
        server, layout = servers[method](config, device, model, batches, image_size)
        return server, batches, model, layout
    gates = None
    if method == "pfeddsh" and not config["no_masks"]:      # pfedhn is the same server without masks
        gates = masks.BatchGates(config["batches"], config["hyper_layers"], config["hidden"], num_clients,
                                 s_max=config["s_max"], lr=config["gate_lr"], free_start=config["gate_start"])
    hypernet = hypernetwork(config, model, device, gates)
    server = fl.Server(hypernet, model, batches, **server_settings(config, image_size))
    return server, batches, model, hypernet.layout


def build(config, device, dataset=None, servers=None):
    """(dataset, clients, server, batches, model). `dataset` replaces the one the config names; `servers`:
    the baselines' registry (build_server)."""
    torch.manual_seed(config["seed"])
    if dataset is None:
        dataset = data.load_dataset(config["dataset"], config["data_dir"], device=device)
    splits = client_splits(config, dataset)
    server, batches, model, layout = build_server(config, device, dataset.num_classes, dataset.image_size, servers)
    clients = [fl.Client(cid, dataset, split, model, layout.unflatten, layout.flatten, config["seed"],
                         amp=config["amp"]) for cid, split in enumerate(splits)]
    return dataset, clients, server, batches, model


def replay_settings(config):
    """replay.backward_transfer's keyword arguments, from the config."""
    return dict(num_images=config["replay_images"], iterations=config["replay_iterations"],
                bn_weight=config["replay_bn_weight"], steps=config["replay_steps"], lr=config["replay_lr"],
                kd_weight=config["replay_kd"], anchor_weight=config["replay_anchor"],
                temperature=config["replay_temperature"], validate_every=config["replay_validate_every"],
                confirm_alpha=config["replay_confirm_alpha"], mode=config["replay"],
                control=config["replay_control"])


# ------------------------------------------------------------------------------------------------------
# Onboarding: one stage per batch of clients
# ------------------------------------------------------------------------------------------------------

@dataclass
class OnboardingState:
    """Where onboarding stands (what a checkpoint needs besides the server and the clients). `stage` is the
    stage running, `round` how many of its rounds are done (0: the stage has not begun)."""
    stage: int = 0
    round: int = 0
    stage_elapsed: float = 0.0      # seconds the current stage had taken before a resume
    accuracy: list = field(default_factory=list)        # A[t][i]: client i's test accuracy after stage t
    val_accuracy: list = field(default_factory=list)    # the same on validation: what settings are chosen on
    neurons: list = field(default_factory=list)
    stage_seconds: list = field(default_factory=list)
    replays: list = field(default_factory=list)
    round_clients: list = field(default_factory=list)   # this stage's rounds so far: PA's reference replays them
    local_accuracy: list = field(default_factory=list)  # L[t][i]: PA's reference (batch t's clients alone)
    local_seconds: list = field(default_factory=list)


def onboard(server, clients, batches, config, state=None, rng=None, hooks=None, pa_reference=True):
    """Every stage, from where `state` stands; returns the final OnboardingState."""
    state, hooks = state or OnboardingState(), hooks or Hooks()
    rng = rng if rng is not None else np.random.default_rng(config["seed"])
    rounds, num_clients = config["rounds"], sum(len(b) for b in batches)
    for t in range(state.stage, len(batches)):
        start = time.time() - state.stage_elapsed
        if state.round == 0:
            server.begin_stage(t)                   # batch t joins; its gate starts (masks.py)
            state.round_clients = []
        for r in range(state.round, rounds):        # a round: generate -> local training -> server update
            size = min(config["clients_per_round"], len(batches[t]))
            round_clients = sorted(rng.choice(batches[t], size=size, replace=False).tolist())
            loss = server.train_round(round_clients, clients, r / max(rounds - 1, 1), config["local_steps"],
                                      config["batch_size"], config["lr"])
            state.round_clients.append(round_clients)
            state.round, state.stage_elapsed = r + 1, time.time() - start
            hooks.after_round(state, rng, stage_done=False, loss=loss)
        state.neurons.append(server.end_stage(t))   # the batch's mask is binarised and frozen
        if t > 0 and config["method"] == "pfeddsh" and not config["no_replay"]:
            state.replays.append(replay.run_replay(server, clients, t, config["seed"], replay_settings(config),
                                                   progress=hooks.replay_progress, uploads=hooks.uploads,
                                                   audit=hooks.audit))
        scores = {cid: server.evaluate(clients[cid]) for b in batches[:t + 1] for cid in b}
        state.accuracy.append([scores[cid][0] if cid in scores else None for cid in range(num_clients)])
        state.val_accuracy.append([scores[cid][1] if cid in scores else None for cid in range(num_clients)])
        state.stage_seconds.append(time.time() - start)
        if pa_reference:
            reference_start = time.time()
            state.local_accuracy.append(local_reference(clients, batches, t, state, config))
            state.local_seconds.append(time.time() - reference_start)
        state.stage, state.round, state.stage_elapsed = t + 1, 0, 0.0
        hooks.after_round(state, rng, stage_done=True)
    return state


def local_reference(clients, batches, t, state, config):  # ours
    """PA's yardstick, row t: batch t's clients trained alone from the initial weights in this stage's
    rounds, with their own fresh generators: exactly what `--method local` gives them. None for batch 0
    (PA is about batches that find earlier ones), and for a stage resumed from a checkpoint that lacks its
    rounds' schedule."""
    if t == 0 or len(state.round_clients) != config["rounds"]:
        return None
    if config["method"] == "local":         # the run is its own reference
        return [a if cid in batches[t] else None for cid, a in enumerate(state.accuracy[t])]
    spent = [c.steps_trained for c in clients]         # the reference's steps are not the method's
    model = clients[0].model
    start, fresh_bn = clients[0].flatten(dict(model.named_parameters())).detach(), hn.bn_stats_init(model)
    weights, bn_stats = {cid: start.clone() for cid in batches[t]}, {cid: fresh_bn for cid in batches[t]}
    generators = {cid: fl.client_generator(config["seed"], cid, start.device) for cid in batches[t]}
    for round_clients in state.round_clients:
        for cid in round_clients:
            update = clients[cid].local_train(weights[cid], bn_stats[cid], config["local_steps"],
                                              config["batch_size"], config["lr"], generator=generators[cid])
            if fl.is_finite_update(update):     # a diverged step is dropped, as `local` drops it
                weights[cid], bn_stats[cid] = weights[cid] + update.delta, update.bn_stats
    accuracy = {cid: clients[cid].evaluate(weights[cid], bn_stats[cid], "test")[0] for cid in batches[t]}
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
    return {"mean_acc": float(np.mean([final[c] for c in ids])),
            "weighted_acc": weighted_mean([final[c] for c in ids], [test_sizes[c] for c in ids]),
            "ri": float(np.mean(ri_per_batch)) if ri_per_batch else 0.0, "ri_per_batch": ri_per_batch,
            "pa": float(np.mean(pa_per_batch)) if pa_per_batch else None, "pa_per_batch": pa_per_batch,
            "batch_acc": [[None if row[b[0]] is None else float(np.mean([row[c] for c in b])) for b in batches]
                          for row in accuracy]}


def weighted_mean(values, weights):
    """NaN, not a crash, when every weight is 0 (no Flower node answered with its test size)."""
    total = sum(weights)
    return float(sum(v * w for v, w in zip(values, weights)) / total) if total else float("nan")


def results(config, batches, state, clients, device, faults):
    """Everything a run found, as results.json holds it."""
    test_sizes = [len(c.y_test) for c in clients]
    return {"config": config, "batches": batches, "accuracy": state.accuracy,
            "metrics": metrics(state.accuracy, batches, test_sizes, state.local_accuracy),
            "val_accuracy": state.val_accuracy, "val_metrics": metrics(state.val_accuracy, batches, test_sizes),
            "local_accuracy": state.local_accuracy, "local_s": state.local_seconds,
            "neurons": state.neurons if state.neurons[-1] is not None else None, "test_sizes": test_sizes,
            "time_s": state.stage_seconds, "device": str(device), "replay_s": [r["replay_s"] for r in state.replays],
            "replay": state.replays, "faults": faults,
            "local_steps": sum(c.steps_trained for c in clients)}


def run(config, device, hooks=None, pa_reference=True, servers=None):
    """The experiment: build, onboard every batch, measure. Bare, it runs the core's METHODS; the shell
    hands in `servers`, the baselines' registry (build_server)."""
    hooks = hooks or Hooks()
    dataset, clients, server, batches, model = build(config, device, servers=servers)
    state, rng = hooks.begin(server, clients, batches, model, dataset)
    state = onboard(server, clients, batches, config, state, rng, hooks, pa_reference)
    return results(config, batches, state, clients, device, dict(server.faults))


if __name__ == "__main__":
    from shell import cli      # the shell: flags, checks, resume, progress, results.json and plots
    sys.exit(cli.cli())
