"""Checkpoints, --resume, signals and numerical faults (shell/checkpoint.py, shell/faults.py), on tiny generated
data on the CPU."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepinversion
import federated as fl
from conftest import counts_of_test_images
from shell import checkpoint, cli, faults

REPO = Path(__file__).resolve().parents[1]
# A tiny run of 4 rounds a stage with a few replay steps, so replay's state is part of what must resume exactly.
TINY = ["--dataset", "cifar10", "--batches", "2", "--clients-per-batch", "2", "--rounds", "4",
        "--clients-per-round", "2", "--local-steps", "1", "--batch-size", "8", "--width", "8",
        "--hidden", "16", "--chunk-size", "1024", "--embed-dim", "4", "--device", "cpu",
        "--replay-images", "4", "--replay-iterations", "3", "--replay-steps", "2", "--checkpoint-every", "3"]
RUN_ONLY = {"out", "overwrite", "resume", "stop_after_rounds"}


def args(tiny_data_dir, out, *extra):
    return TINY + ["--data-dir", str(tiny_data_dir), "--out", str(out), *extra]


def train_py(*argv):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], capture_output=True, text=True,
                          timeout=120)


def comparable(results):
    """results.json without wall-clock times and the settings that only say how the run was run."""
    r = json.loads(json.dumps(results))
    r.pop("time_s"), r.pop("replay_s")
    for report in r["replay"]:
        report.pop("replay_s"), report.pop("synthesis_s")
    r["config"] = {k: v for k, v in r["config"].items() if k not in RUN_ONLY}
    return r


def final_hypernet(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)["server"]["hypernet"]


@pytest.fixture(scope="module")
def reference(tiny_data_dir, tmp_path_factory):
    """One uninterrupted run: its folder (results.json, checkpoint.pt) and results."""
    out = tmp_path_factory.mktemp("reference")
    return out, cli.main(args(tiny_data_dir, out))


def test_same_seed_gives_the_same_results(tiny_data_dir, tmp_path, reference):
    again = cli.main(args(tiny_data_dir, tmp_path))
    assert comparable(again) == comparable(reference[1])
    assert again["faults"] == {"dropped_updates": 0, "skipped_rounds": 0, "dropped_replays": 0}


@pytest.mark.parametrize("stop_after", [2, 4, 5])
def test_killed_mid_stage_then_resumed_equals_uninterrupted(stop_after, tiny_data_dir, tmp_path, reference):
    # A real SIGINT to ourselves after round 2 (mid stage 0), 4 (stage 0's rounds done, end_stage not yet)
    # or 5 (mid stage 1, after replay's stage 0) of 8; checkpoints are every 3 rounds, so 2, 4 and 5 are
    # the checkpoints the signal handler asks for.
    with pytest.raises(cli.Interrupted) as stopped:
        cli.main(args(tiny_data_dir, tmp_path, "--stop-after-rounds", str(stop_after)))
    assert stopped.value.code == 130
    stage, done = divmod(stop_after - 1, 4)
    assert str(stopped.value).startswith(f"interrupted (SIGINT): checkpoint saved at stage {stage} "
                                         f"round {done + 1} of 4")
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(cli.CliError, match="already exists"):      # without --resume: another run's folder
        cli.main(args(tiny_data_dir, tmp_path))
    resumed = cli.main(args(tiny_data_dir, tmp_path, "--resume"))
    assert comparable(resumed) == comparable(reference[1])
    ours, theirs = final_hypernet(tmp_path), final_hypernet(reference[0])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)     # bitwise, gates' buffers included


def test_resumed_after_a_replay_equals_uninterrupted_with_the_dreams_the_server_kept(tiny_data_dir, tmp_path):
    """Three batches: replay after stage 1 dreams and keeps the earlier clients' own dreams (server.dreams),
    which replay after stage 2 reads again. A run stopped mid stage 2 must resume with them, bitwise."""
    three = ["--batches", "3", "--clients-per-batch", "3", "--classes-per-client", "4"]
    reference = cli.main(args(tiny_data_dir, tmp_path / "ref", *three))
    kept = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["server"]["dreams"]
    assert kept and all(images.shape[1:] == (3, 32, 32) for images, _, _ in kept.values())
    assert any(r["tried"] for r in reference["replay"])
    with pytest.raises(cli.Interrupted):
        cli.main(args(tiny_data_dir, tmp_path / "cut", *three, "--stop-after-rounds", "10"))
    resumed = cli.main(args(tiny_data_dir, tmp_path / "cut", *three, "--resume"))
    assert comparable(resumed) == comparable(reference)
    ours, theirs = final_hypernet(tmp_path / "cut"), final_hypernet(tmp_path / "ref")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sigterm_saves_a_checkpoint_and_exits_143_with_one_line(tiny_data_dir, tmp_path):
    # One thread: this process shares the CPU with pytest; timing is irrelevant to what is checked.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                             *args(tiny_data_dir, tmp_path, "--batches", "1", "--rounds", "50", "--no-replay")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline()
    assert first.startswith("pfeddsh (the paper's method") and "protocol cpu-demo" in first
    assert "pfeddsh-no-replay on cifar10" in proc.stdout.readline()     # printed after the handlers are installed
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM): checkpoint saved at stage 0 round ") and "--resume" in last
    assert "Traceback" not in stderr and (tmp_path / "checkpoint.pt").exists()


def test_truncated_checkpoint_is_refused_and_left_alone(tiny_data_dir, tmp_path, reference):
    shutil.copy(reference[0] / "results.json", tmp_path / "results.json")
    blob = (reference[0] / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    done = train_py(*args(tiny_data_dir, tmp_path, "--resume"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreadable" in lines[0], done.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == blob[: len(blob) // 2]
    assert (tmp_path / "results.json").read_bytes() == (reference[0] / "results.json").read_bytes()


def test_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tiny_data_dir, tmp_path, reference):
    # A checkpoint written before --bn-noise, --privacy-audit and --amp existed has no such keys: it ran
    # with their defaults, so it is the same configuration, not another one.
    state = torch.load(reference[0] / "checkpoint.pt", weights_only=True)
    for key in ("bn_noise", "privacy_audit", "amp"):
        del state["config"][key]
    torch.save(state, tmp_path / "checkpoint.pt")
    older = dict(state, format=checkpoint.FORMAT - 1)                # another format: refused, not misread
    torch.save(older, tmp_path / "older.pt")
    with pytest.raises(checkpoint.CheckpointError, match=f"format {checkpoint.FORMAT - 1}, expected"):
        checkpoint.load(str(tmp_path / "older.pt"), reference[1]["config"], torch.device("cpu"))
    resumed = cli.main(args(tiny_data_dir, tmp_path, "--resume"))
    assert comparable(resumed) == comparable(reference[1])
    done = train_py(*args(tiny_data_dir, tmp_path, "--resume", "--bn-noise", "0.5"))     # but not another value
    assert done.returncode == 2 and "bn_noise: 0.0 there, 0.5 here" in done.stderr, done.stderr


@pytest.mark.parametrize("case", ["different config", "no checkpoint"])
def test_resume_refuses_with_one_line(case, tiny_data_dir, tmp_path, reference):
    if case == "different config":
        shutil.copy(reference[0] / "checkpoint.pt", tmp_path / "checkpoint.pt")
        done, expected = train_py(*args(tiny_data_dir, tmp_path, "--resume", "--rounds", "5")), "different configuration"
    else:
        done, expected = train_py(*args(tiny_data_dir, tmp_path, "--resume")), "no checkpoint"
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_nan_updates_are_dropped_and_counted(tiny_data_dir, tmp_path, monkeypatch):
    real = fl.Client.local_train
    calls = []

    def sometimes_nan(self, *a, **k):
        update = real(self, *a, **k)
        calls.append(self.cid)
        if len(calls) <= 3:         # round 1: both clients diverge (no server step); round 2: one does
            update.delta = torch.full_like(update.delta, float("nan"))
        return update

    monkeypatch.setattr(fl.Client, "local_train", sometimes_nan)
    results = cli.main(args(tiny_data_dir, tmp_path, "--no-replay"))
    assert results["faults"] == {"dropped_updates": 3, "skipped_rounds": 1, "dropped_replays": 0}
    assert None not in results["accuracy"][-1]
    assert counts_of_test_images(results["accuracy"][-1], results["test_sizes"])
    hypernet = final_hypernet(tmp_path)
    assert all(torch.isfinite(v.float()).all() for v in hypernet.values())


def test_diverged_replay_is_undone_and_counted(tiny_data_dir, tmp_path, monkeypatch):
    real = deepinversion.replay

    def diverging(server, *a, **k):
        report = real(server, *a, **k)
        report["images"][0] = float("nan")
        with torch.no_grad():       # and the fine-tuning blew up the earlier clients' embeddings
            server.hypernet.client_embeddings.fill_(float("inf"))
        return report

    monkeypatch.setattr(deepinversion, "replay", diverging)
    # 5 classes a client, so that the new batch shares a class with an earlier client: replay dreams (with
    # the default 2 of cifar10's 10, the two batches of TINY may share none, and there is nothing to dream)
    results = cli.main(args(tiny_data_dir, tmp_path, "--classes-per-client", "5"))
    assert results["faults"]["dropped_replays"] == 1 and results["replay"][0]["dropped"]
    batch0 = results["batches"][0]
    # Masks keep batch 0 exactly where stage 0 left it, and the undone replay changed nothing either.
    assert [results["accuracy"][1][c] for c in batch0] == [results["accuracy"][0][c] for c in batch0]



class Recorder:
    """A server as faults.screen wraps it: records what its update and replay were given."""

    def __init__(self, embeddings):
        self.hypernet = torch.nn.Module()
        self.hypernet.client_embeddings = torch.nn.Parameter(embeddings)
        self.hypernet.head = torch.nn.Parameter(torch.zeros(3))      # any other weight a replay might move
        self.updates, self.replays = [], []

    def update(self, client_ids, generated, updates):
        self.updates.append((list(client_ids), generated.clone(), updates))
        return 0.5

    def replay(self, clients, t, seed, progress=None):
        self.replays.append(t)
        with torch.no_grad():
            self.hypernet.client_embeddings.add_(self.step)
            self.hypernet.head.add_(self.step)
        return {"images": torch.zeros(2, 3, 4, 4), "bn_loss_end": [1.0]}


def test_screen_passes_only_finite_updates_and_undoes_a_diverged_replay():
    def update(delta, bn=0.0):
        return fl.ClientUpdate(torch.full((3,), delta), {"running_mean": torch.full((2,), bn),
                                                          "num_batches_tracked": torch.tensor(1)}, None, 0.1)

    assert faults.is_finite_update(update(1.0)) and not faults.is_finite_update(update(float("nan")))
    assert not faults.is_finite_update(update(1.0, float("-inf")))
    server = faults.screen(Recorder(torch.zeros(4, 2)))
    generated = torch.arange(9.0).view(3, 3)
    assert server.update([4, 5, 6], generated, [update(1.0), update(float("inf")), update(2.0)]) == 0.5
    (ids, kept, updates), = server.updates
    assert ids == [4, 6] and torch.equal(kept, generated[[0, 2]]) and len(updates) == 2
    loss = server.update([4, 5], generated[:2], [update(float("nan")), update(1.0, float("nan"))])
    assert loss != loss and len(server.updates) == 1            # a round of nothing but faults: no server step
    assert server.faults == {"dropped_updates": 3, "skipped_rounds": 1, "dropped_replays": 0}
    server.step = 1.0                                           # a replay that moved the rows, finitely: kept
    report = server.replay([], 1, 0)
    assert not report["dropped"] and report["replay_s"] >= 0 and report["synthesis_s"] >= 0
    assert (server.hypernet.client_embeddings == 1.0).all()
    server.step = float("nan")                                  # ... and one that diverged: undone, bitwise
    report = server.replay([], 2, 0)
    assert report["dropped"] and server.faults["dropped_replays"] == 1
    assert (server.hypernet.client_embeddings == 1.0).all() and server.replays == [1, 2]
    assert (server.hypernet.head == 1.0).all()                  # undone too, whatever its name
