"""train.py, the experiment: masks keep batch 0 and let batch 1 learn, replay's settings and progress reach
it, AMP. The command line around it (presets, flags, bad input, results.json) is tests/test_cli.py's."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402
from conftest import counts_of_test_images  # noqa: E402
from shell import cli  # noqa: E402
import replay  # noqa: E402

TINY = ["--dataset", "cifar10", "--batches", "2", "--clients-per-batch", "2", "--rounds", "4",
        "--clients-per-round", "2", "--local-steps", "3", "--batch-size", "16", "--width", "4",
        "--hidden", "16", "--chunk-size", "256", "--embed-dim", "4", "--device", "cpu"]


def run_tiny(tiny_data_dir, out, *extra):
    return cli.main(TINY + ["--data-dir", str(tiny_data_dir), "--out", str(out), *extra])


REPLAY_TINY = ["--replay-images", "4", "--replay-iterations", "3", "--replay-steps", "3"]


def test_masks_keep_batch0_accuracy_identical_and_new_batch_learns(tiny_data_dir, tmp_path):
    results = run_tiny(tiny_data_dir, tmp_path, "--method", "pfeddsh", "--no-replay", "--rounds", "40", "--local-steps", "2",
                       "--lr", "0.02", "--server-lr", "1e-2", "--width", "8", "--hidden", "64")
    batch0, batch1 = results["batches"]
    assert [results["accuracy"][0][c] for c in batch0] == [results["accuracy"][1][c] for c in batch0]
    # Each tiny client holds 2 classes, so chance is about 0.5; batch 1 learns on top of batch 0's units.
    assert min(results["accuracy"][1][c] for c in batch1) > 0.7, results["accuracy"]
    assert results["neurons"][1]["reuse"] > 0


def test_replay_bn_weight_reaches_deepinversion(monkeypatch):
    from test_replay import confirm_no, two_stage_server
    import deepinversion
    weights, synthesize = [], deepinversion.synthesize

    def recording(*args, **kwargs):
        weights.append(kwargs["bn_weight"])
        return synthesize(*args, **kwargs)

    monkeypatch.setattr(deepinversion, "synthesize", recording)
    config = dict(train.DEFAULTS, replay_bn_weight=0.25, replay_images=4, replay_iterations=2, replay_steps=1)
    replay.backward_transfer(two_stage_server(), 1, lambda cid, flat: (0.0, 1.0), confirm_no, seed=0,
                                    **train.replay_settings(config))
    assert weights == [0.25]


def test_replay_reports_its_progress():
    from test_replay import REPLAY, confirm_no, two_stage_server
    calls = []
    replay.backward_transfer(two_stage_server(), 1, lambda cid, flat: (0.0, 1.0), confirm_no,
                                    **dict(REPLAY, steps=1), progress=lambda *a: calls.append(a))
    assert calls[:3] == [("synthesis", 1, 3), ("synthesis", 2, 3), ("synthesis", 3, 3)]
    assert calls[3:] == [("fine-tune", 0, 1), ("fine-tune", 1, 1)]     # client 1 is tried: it shares class 2


def test_without_amp_no_autocast_context_is_ever_opened(tiny_data_dir, tmp_path, monkeypatch):
    """--amp off (the default) must leave fp32 runs bitwise as they were: not even a disabled autocast."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("torch.autocast opened without --amp")
    monkeypatch.setattr(torch, "autocast", refuse)
    results = run_tiny(tiny_data_dir, tmp_path, "--method", "pfeddsh", *REPLAY_TINY)
    assert results["config"]["amp"] is False and len(results["replay"]) == 1


def test_amp_trains_in_bf16_and_a_whole_run_works_on_cpu(tiny_data_dir, tmp_path):
    import torch
    config, _ = cli.resolve_config(TINY + ["--data-dir", str(tiny_data_dir)])
    _, clients, server, batches, _ = train.build(config, torch.device("cpu"))
    client = clients[batches[0][0]]
    flat, state = server.generate(client.cid), client.generator.get_state()
    fp32 = client.local_train(flat, server.bn_stats[client.cid], 2, 8, 0.05)
    client.generator.set_state(state)
    client.amp = True
    bf16 = client.local_train(flat, server.bn_stats[client.cid], 2, 8, 0.05)
    # The same draws, so only the arithmetic differs: bf16 convolutions, fp32 weights and deltas.
    assert bf16.delta.dtype == torch.float32 and torch.isfinite(bf16.delta).all()
    assert not torch.equal(fp32.delta, bf16.delta)
    results = run_tiny(tiny_data_dir, tmp_path, "--method", "pfeddsh", "--amp", *REPLAY_TINY)
    assert results["config"]["amp"] is True and len(results["replay"]) == 1
    assert counts_of_test_images(results["accuracy"][-1], results["test_sizes"])


def test_local_steps_count_what_the_method_trained_and_not_pas_reference(tiny_data_dir, tmp_path):
    """2 batches x 4 rounds x 2 clients x 3 steps for pfeddsh (PA's reference trains as much again, uncounted);
    Ditto trains a personal model beside the global one in every round: twice that."""
    expected = 2 * 4 * 2 * 3
    assert run_tiny(tiny_data_dir, tmp_path / "a", "--no-replay")["local_steps"] == expected
    assert run_tiny(tiny_data_dir, tmp_path / "b", "--method", "ditto")["local_steps"] == 2 * expected

