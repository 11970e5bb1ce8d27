"""Checkpoints: stop a run (crash, kill, Ctrl-C) and continue it later with the same results.

One file, <out>/checkpoint.pt, replaced atomically (written to a temporary file, then os.replace), so a
kill during a write leaves the previous checkpoint intact. It holds everything training changes and
everything random, so on the CPU a resumed run gives the same results.json as an uninterrupted one:

  * the server: hypernetwork (with the gates' buffers: binary, owned, finished), ServerOptimizer state,
    stage and s, every client's BN statistics and label counts, the fault counters;
  * the random state: the numpy Generator that samples each round's clients, every client's torch
    Generator (minibatches and augmentation), the torch global RNG (DeepInversion seeds its own);
  * every client's count of the local steps it took (results.json's local_steps);
  * federated.OnboardingState: stage and round, accuracy matrix so far, neurons, stage times, replay reports
    (without the images, which are written to synthetic_batch{t}.png when replay runs);
  * the configuration and the device, to refuse resuming a different run.
"""
import os
from dataclasses import asdict

import numpy as np
import torch

FORMAT = 4          # 4: the core without our extensions (3: the hypernetwork held them; 2: no client classifiers)
FILENAME = "checkpoint.pt"
# Settings that say how to run, not what to compute: they may differ between a run and its resume.
RUN_ONLY_KEYS = {"out", "overwrite", "resume", "checkpoint_every", "device", "stop_after_rounds",
                 "preset", "preset_auto",    # a preset only sets other keys, which are compared themselves
                 "engine", "node_timeout",   # where the clients run: the same numbers (tests/test_flower.py)
                 "threads", "deterministic"}  # how the kernels run, not what the run is


class CheckpointError(Exception):
    """A checkpoint that cannot be used: unreadable, or made by another configuration."""


def capture(config, device, server, clients, rng, onboarding):
    return {"format": FORMAT, "config": dict(config), "device": str(device), "server": server_state(server),
            "rng": {"rounds": rng.bit_generator.state, "clients": [c.generator.get_state() for c in clients],
                    "torch": torch.get_rng_state()},
            "steps_trained": [c.steps_trained for c in clients],
            "onboarding": asdict(onboarding)}


def save(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path, config, device, defaults=None):
    """The checkpoint at path, checked against this run's config and device; CheckpointError if unusable.

    `defaults` (train.DEFAULTS): a setting missing from an older checkpoint did not exist then, so the run
    had that setting's default (every new flag keeps the old behaviour by default)."""
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')}, expected {FORMAT}")
        for key in ["config", "device", "server", "rng", "onboarding"]:
            state[key]                      # noqa: B018 (a missing part is a corrupt checkpoint)
    except Exception as e:              # truncated zip, bad pickle, wrong type: all mean "unreadable"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason}); delete it to start over") from None
    theirs = dict(defaults or {}, **state["config"])
    differing = differing_settings(config, theirs)
    if differing:
        diffs = ", ".join(f"{k}: {theirs.get(k)!r} there, {config.get(k)!r} here" for k in differing)
        raise CheckpointError(f"checkpoint {path} was made with a different configuration ({diffs}); "
                              f"rerun with its arguments or use another --out")
    if state["device"] != str(device):
        raise CheckpointError(f"checkpoint {path} was made on {state['device']}, this run is on {device}; "
                              f"pass --device {torch.device(state['device']).type}")
    return state


def differing_settings(config, other):
    """The settings (run-only keys aside) in which two configurations differ: they are different runs."""
    return sorted(k for k in set(config) | set(other) if k not in RUN_ONLY_KEYS and config.get(k) != other.get(k))


def restore(state, server, clients, onboarding_cls):
    """Put the checkpoint back into server and clients; returns (onboarding state, round-sampling rng)."""
    load_server_state(server, state["server"])
    for client, g in zip(clients, state["rng"]["clients"], strict=True):
        client.generator.set_state(g.cpu())
    for client, steps in zip(clients, state.get("steps_trained", [0] * len(clients))):   # none before it was kept
        client.steps_trained = steps
    torch.set_rng_state(state["rng"]["torch"].cpu())
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]["rounds"]
    return onboarding_cls(**state["onboarding"]), rng


# federated.Server's state lives here, not in the core: the baselines carry theirs (state_dict, load_state_dict).

def server_state(server):
    """Everything a server holds that training changes."""
    return server.state_dict() if hasattr(server, "state_dict") else hypernet_server_state(server)


def load_server_state(server, sd):
    if hasattr(server, "load_state_dict"):
        server.load_state_dict(sd)
    else:
        load_hypernet_server_state(server, sd)


def hypernet_server_state(server):
    """A federated.Server's (the hypernetwork includes the gates' buffers)."""
    optimizer = server.optimizer
    return {"hypernet": server.hypernet.state_dict(), "optimizer": {"state": optimizer.state, "steps": optimizer.steps},
            "stage": server.stage, "s": server.gate_scale, "bn_stats": server.bn_stats,
            "label_counts": server.label_counts, "dreams": server.dreams, "faults": dict(server.faults)}


def load_hypernet_server_state(server, sd):
    """Continue where hypernet_server_state left off, mid-stage included: unlike Server.begin_stage this neither
    resets the optimizer nor re-prepares the gates (that would zero head columns and rewrite gate embeddings)."""
    server.hypernet.load_state_dict(sd["hypernet"])
    server.optimizer.state, server.optimizer.steps = sd["optimizer"]["state"], sd["optimizer"]["steps"]
    server.stage, server.gate_scale = sd["stage"], sd["s"]
    server.bn_stats, server.label_counts = sd["bn_stats"], sd["label_counts"]
    server.dreams, server.faults = sd["dreams"], dict(sd["faults"])
    # The free masks depend only on the ownership buffers, which do not change within a stage.
    server.free = server.free_masks()
