"""train.py, the experiment: what build makes of a config, onboarding (an earlier batch bitwise unchanged by every
later stage without replay), replay's settings and progress reaching deepinversion, and the paper's two effects
(train.metrics against a hand-made accuracy matrix). The command line around it is tests/test_cli.py's."""
from pathlib import Path

import numpy as np
import pytest
import torch

import deepinversion as di
import train
from shell import cli

REPO = Path(__file__).resolve().parents[1]

# The command line's tiny run (test_cli, test_checkpoint, test_baselines, ... use it). Width 8: at width 4 the
# CPU convolutions of torch 2.14 corrupt the heap on the channels-last batches data.augment makes.
TINY = ["--dataset", "cifar10", "--batches", "2", "--clients-per-batch", "2", "--rounds", "3",
        "--clients-per-round", "2", "--local-steps", "2", "--batch-size", "16", "--width", "8",
        "--hidden", "16", "--chunk-size", "1024", "--embed-dim", "4", "--device", "cpu"]
REPLAY_TINY = ["--replay-images", "4", "--replay-iterations", "2", "--replay-steps", "2"]


def run_tiny(tiny_data_dir, out, *extra):
    return cli.main(TINY + ["--data-dir", str(tiny_data_dir), "--out", str(out), *extra])


def tiny_config(tiny_data_dir, **overrides):
    config = dict(train.DEFAULTS, data_dir=str(tiny_data_dir), batches=2, clients_per_batch=2, rounds=2,
                  clients_per_round=2, local_steps=1, batch_size=8, width=8, hidden=16, embed_dim=4, chunk_size=1024,
                  replay_images=4, replay_iterations=2, replay_steps=2, seed=0)
    return dict(config, **overrides)


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,switch", [("pfeddsh", None), ("pfeddsh", "no_replay"), ("pfeddsh", "no_masks"),
                                           ("pfedhn", None)])
def test_build_server_makes_the_method_the_config_names(method, switch):
    config = dict(train.DEFAULTS, method=method, batches=2, clients_per_batch=2, width=8, hidden=16, chunk_size=1024,
                  **({switch: True} if switch else {}))
    server, batches, model, layout = train.build_server(config, torch.device("cpu"), 10, 32)
    assert sorted(c for b in batches for c in b) == [0, 1, 2, 3] and len(batches) == 2
    has_masks = method == "pfeddsh" and switch != "no_masks"
    replays = method == "pfeddsh" and switch != "no_replay"
    assert (server.hypernet.gates is not None) == has_masks
    assert (server.replay_settings is not None) == replays
    if replays:
        assert server.replay_settings == train.replay_settings(config)
    assert layout.num_weights == sum(p.numel() for p in model.parameters())


def test_a_method_that_is_not_the_cores_comes_from_the_registry_handed_in():
    config = dict(train.DEFAULTS, method="mine", batches=2, clients_per_batch=2, width=8)
    made = []

    def build(config, device, model, batches, image_size):
        made.append((config["method"], batches, image_size))
        return "a server", "a layout"

    server, batches, _, layout = train.build_server(config, torch.device("cpu"), 10, 32, servers={"mine": build})
    assert (server, layout) == ("a server", "a layout") and made == [("mine", batches, 32)]


# --------------------------------------------------------------------------------------------------
# Onboarding
# --------------------------------------------------------------------------------------------------

class Watch(train.Hooks):
    """Hooks that record every client's generated weights after every stage."""

    def __init__(self):
        self.after_stage = []

    def begin(self, server, clients, batches, model, dataset):
        self.server, self.batches = server, batches
        self.at_start = {c: server.generate(c).clone() for b in batches for c in b}
        return None, None

    def after_round(self, state, rng, stage_done, loss=None):
        if stage_done:
            self.after_stage.append({c: self.server.generate(c).clone() for b in self.batches for c in b})


def test_without_replay_an_earlier_batch_is_bitwise_unchanged_by_every_later_stage(tiny_data_dir):
    """pfeddsh --no-replay, three batches, real clients: after its stage a client's generated weights never
    change again, while every later batch's own clients do train (so nothing was merely idle)."""
    config = tiny_config(tiny_data_dir, batches=3, no_replay=True)
    watch = Watch()
    results = train.run(config, torch.device("cpu"), hooks=watch, pa_reference=False)
    batches = results["batches"]
    for t, batch in enumerate(batches):
        for c in batch:
            assert not torch.equal(watch.after_stage[t][c], watch.at_start[c]), f"client {c} did not train"
            for later in range(t + 1, len(batches)):
                assert torch.equal(watch.after_stage[later][c], watch.after_stage[t][c]), (c, later)
                assert results["accuracy"][later][c] == results["accuracy"][t][c]
    assert results["metrics"]["ri"] == 0.0 and results["replay"] == []


def test_a_run_reports_pa_against_the_clients_trained_alone(tiny_data_dir):
    """train.run's results: the accuracy matrix, batch 1's local reference (its clients alone, from the initial
    weights, with the same rounds), PA and RI from them; the reference's local steps are not the method's."""
    config = tiny_config(tiny_data_dir, no_replay=True)
    results = train.run(config, torch.device("cpu"))
    batches, accuracy, local = results["batches"], results["accuracy"], results["local_accuracy"]
    assert local[0] is None and all((local[1][c] is None) == (c not in batches[1]) for c in range(4))
    assert results["metrics"]["pa"] == pytest.approx(np.mean([accuracy[1][c] - local[1][c] for c in batches[1]]))
    assert results["local_steps"] == 2 * 2 * 2 * 1          # stages x rounds x clients x steps: the method's only
    assert {"time_s", "local_s", "faults", "device", "replay_s"}.isdisjoint(results)    # the shell adds those


# --------------------------------------------------------------------------------------------------
# Replay's settings and progress
# --------------------------------------------------------------------------------------------------

def test_replay_settings_reach_deepinversion(monkeypatch):
    from test_deepinversion import two_stage_server
    heard, synthesize = [], di.synthesize

    def recording(*args, **kwargs):
        heard.append(kwargs)
        return synthesize(*args, **kwargs)

    monkeypatch.setattr(di, "synthesize", recording)
    config = dict(train.DEFAULTS, replay_bn_weight=0.25, replay_images=4, replay_iterations=2, replay_steps=1)
    server = two_stage_server()
    server.replay_settings = train.replay_settings(config)
    server.replay([None] * 4, 1, seed=5)
    assert [(k["bn_weight"], k["num_images"], k["iterations"], k["seed"]) for k in heard] == [(0.25, 4, 2, 6)]


def test_replay_reports_its_progress():
    from test_deepinversion import two_stage_server
    calls = []
    server = two_stage_server(steps=1)
    server.replay([None] * 4, 1, seed=0, progress=lambda *a: calls.append(a))
    assert calls == [("synthesis", 1, 3), ("synthesis", 2, 3), ("synthesis", 3, 3), ("fine-tune", 1, 1)]


# --------------------------------------------------------------------------------------------------
# The paper's two effects
# --------------------------------------------------------------------------------------------------

def test_metrics_against_a_hand_made_accuracy_matrix():
    """Three batches of two clients; A[t][i] after each stage and L[t][i], the clients trained alone.
    RI of batch 0: ((0.7 - 0.5) + (0.9 - 0.7)) / 2 = 0.2; of batch 1: ((0.5 - 0.4) + (0.6 - 0.8)) / 2 = -0.05;
    RI = 0.075. PA of batch 1: ((0.4 - 0.5) + (0.8 - 0.5)) / 2 = 0.1; of batch 2: ((0.9 - 0.8) + (0.3 - 0.4)) / 2
    = 0; PA = 0.05. Mean accuracy (0.7 + 0.9 + 0.5 + 0.6 + 0.9 + 0.3) / 6 = 0.65; weighted by test sizes
    (7 + 9 + 10 + 12 + 9 + 9) / 100 = 0.56."""
    batches = [[0, 1], [2, 3], [4, 5]]
    n = None
    accuracy = [[0.5, 0.7, n, n, n, n],
                [0.6, 0.6, 0.4, 0.8, n, n],
                [0.7, 0.9, 0.5, 0.6, 0.9, 0.3]]
    local = [None, [n, n, 0.5, 0.5, n, n], [n, n, n, n, 0.8, 0.4]]
    sizes = [10, 10, 20, 20, 10, 30]
    m = train.metrics(accuracy, batches, sizes, local)
    assert m["ri_per_batch"] == pytest.approx([0.2, -0.05]) and m["ri"] == pytest.approx(0.075)
    assert m["pa_per_batch"] == pytest.approx([0.1, 0.0]) and m["pa"] == pytest.approx(0.05)
    assert m["mean_acc"] == pytest.approx(0.65) and m["weighted_acc"] == pytest.approx(0.56)
    assert len(m["batch_acc"]) == 3
    for row, expected in zip(m["batch_acc"], [[0.6, n, n], [0.6, 0.6, n], [0.8, 0.55, 0.6]]):
        assert [None if a is None else pytest.approx(a) for a in row] == expected
    # without the reference, or with a row of it missing (a resumed stage), there is no PA
    assert train.metrics(accuracy, batches, sizes)["pa"] is None
    assert train.metrics(accuracy, batches, sizes, [None, local[1], None])["pa"] is None
    # one batch: nothing earlier, RI 0
    one = train.metrics([[0.5, 0.7]], [[0, 1]], [10, 30])
    assert one["ri"] == 0.0 and one["ri_per_batch"] == [] and one["weighted_acc"] == pytest.approx(0.65)
