"""The baselines (baselines.py) do what their names say, and the comparison report (compare.py) adds up."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import federated as fl
import hypernet as hn
import masks
import train
from shell import baselines, cli, compare, runner
from shell.settings import DEFAULTS
from test_train import REPLAY_TINY, TINY


def build(tiny_data_dir, method):
    config, _ = cli.resolve_config(TINY + REPLAY_TINY + ["--data-dir", str(tiny_data_dir), "--method", method])
    dataset, clients, server, batches, model = train.build(config, torch.device("cpu"), servers=runner.SERVERS)
    return config, clients, server, batches


def onboard(config, clients, server, batches):
    return train.onboard(server, clients, batches, config, pa_reference=False)


def refuse(*args, **kwargs):
    raise AssertionError("a server update happened")


def test_local_never_communicates(tiny_data_dir, tmp_path, monkeypatch):
    # No pFedHN gradient, no server optimizer step, no FedAvg averaging may run for `local`...
    monkeypatch.setattr(fl.Server, "update", refuse)
    monkeypatch.setattr(masks.ServerOptimizer, "step", refuse)
    monkeypatch.setattr(baselines.FedAvg, "train_round", refuse)
    results = cli.main(TINY + ["--data-dir", str(tiny_data_dir), "--method", "local", "--out", str(tmp_path)])
    assert all(a is not None for a in results["accuracy"][1])
    # ...and what a client ends with depends on its own data only: scramble everybody else's training
    # images and its weights stay bitwise the same.
    config, clients, server, batches = build(tiny_data_dir, "local")
    onboard(config, clients, server, batches)
    _, clients2, server2, _ = build(tiny_data_dir, "local")
    for other in clients2[1:]:
        other.x_train = other.x_train.flip(0)
    onboard(config, clients2, server2, batches)
    assert torch.equal(server.weights[0], server2.weights[0])
    assert all(torch.equal(server.bn_stats[0][n], server2.bn_stats[0][n]) for n in server.bn_stats[0])
    assert not torch.equal(server.weights[1], server2.weights[1])      # the control: the scramble mattered


class SizedClient:
    """Returns a fixed delta and BN statistics; holds `n` training images."""

    def __init__(self, n, delta, bn_value):
        self.y_train, self.delta, self.bn_value = torch.zeros(n), delta, bn_value

    def local_train(self, flat_weights, bn_stats, steps, minibatch_size, lr):
        bn = {name: torch.full_like(b, self.bn_value) for name, b in bn_stats.items()}
        return fl.ClientUpdate(delta=self.delta, bn_stats=bn, label_counts=torch.ones(10), loss=0.0)


def test_fedavg_moves_to_the_size_weighted_average_of_the_clients_models():
    model = hn.ResNet18(10, 4)
    layout = hn.WeightLayout(model)
    server = baselines.FedAvg(model, layout, [[0, 1]])
    start = server.weights.clone()
    d0, d1 = torch.randn_like(start), torch.randn_like(start)
    clients = [SizedClient(30, d0, 1.0), SizedClient(10, d1, 5.0)]
    server.train_round([0, 1], clients, 0.0, steps=1, minibatch_size=1, lr=0.0)
    torch.testing.assert_close(server.weights, start + 0.75 * d0 + 0.25 * d1)
    torch.testing.assert_close(server.bn["bn1.running_mean"], torch.full_like(server.bn["bn1.running_mean"], 2.0))


def test_fedavg_ft_trains_exactly_like_fedavg_and_finetunes_only_at_evaluation(tiny_data_dir):
    config, clients, plain, batches = build(tiny_data_dir, "fedavg")
    accuracy_plain = onboard(config, clients, plain, batches).accuracy
    config, clients, tuned, batches = build(tiny_data_dir, "fedavg-ft")
    before = [c.generator.get_state() for c in clients]
    tuned.begin_stage(0)
    tuned.evaluate(clients[0])
    assert all(torch.equal(b, c.generator.get_state()) for b, c in zip(before, clients))   # eval draws nothing
    accuracy_tuned = onboard(config, clients, tuned, batches).accuracy
    assert torch.equal(plain.weights, tuned.weights)              # the same global model...
    assert accuracy_plain != accuracy_tuned                       # ...evaluated after fine-tuning


def test_frozen_pfedhn_moves_only_the_new_clients_embeddings_after_batch_0(tiny_data_dir):
    config, clients, server, batches = build(tiny_data_dir, "pfedhn-frozen")
    config["rounds"] = 2
    server.begin_stage(0)
    for r in range(2):
        server.train_round(batches[0], clients, r, config["local_steps"], config["batch_size"], config["lr"])
    after_0 = {n: p.detach().clone() for n, p in server.hypernet.named_parameters()}
    generated_0 = {c: server.generate(c) for c in batches[0]}
    server.begin_stage(1)
    for r in range(2):
        server.train_round(batches[1], clients, r, config["local_steps"], config["batch_size"], config["lr"])
    for name, p in server.hypernet.named_parameters():
        if name != "client_embeddings":
            assert torch.equal(p, after_0[name]), name
    emb = server.hypernet.client_embeddings
    assert torch.equal(emb[batches[0]], after_0["client_embeddings"][batches[0]])
    assert not torch.equal(emb[batches[1]], after_0["client_embeddings"][batches[1]])
    assert all(torch.equal(server.generate(c), generated_0[c]) for c in batches[0])


def test_pa_is_new_clients_accuracy_minus_local_on_the_same_clients():
    run = {"batches": [[0, 1], [2, 3]], "accuracy": [[0.5, 0.5, None, None], [0.4, 0.6, 0.9, 0.7]]}
    local = {"batches": [[0, 1], [2, 3]], "accuracy": [[0.6, 0.6, None, None], [0.6, 0.6, 0.8, 0.9]]}
    assert compare.plasticity(run, local) == [pytest.approx((0.1 - 0.2) / 2)]


def test_comparison_command_writes_report_and_plots_and_reuses_finished_runs(tiny_data_dir, tmp_path, capsys):
    argv = TINY + ["--data-dir", str(tiny_data_dir), "--methods", "fedavg,pfeddsh-no-replay", "--seeds", "0,1",
                   "--out", str(tmp_path)]
    runs = cli.main(argv)
    assert list(runs) == ["local", "fedavg", "pfeddsh-no-replay"]       # local added: PA needs it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["comparison.md", "comparison.json", "batch_accuracy.png"] + [f"{n}-s{s}" for n in runs for s in (0, 1)])
    summary = json.loads((tmp_path / "comparison.json").read_text())
    for seed in (0, 1):
        fedavg, local = runs["fedavg"][seed], runs["local"][seed]
        assert fedavg["batches"] == local["batches"]                        # the same split per seed
        expected = 100 * compare.plasticity(fedavg, local)[0]
        assert summary["fedavg"]["pa"][seed] == pytest.approx(expected)
    assert summary["local"]["pa"] == [0.0, 0.0]
    report = (tmp_path / "comparison.md").read_text()
    # a row in the summary, in the per-batch accuracy table and in the per-batch transfer table
    assert report.count("| fedavg |") == 3 and "| pfeddsh-no-replay |" in report
    assert "Replay's share" not in report            # needs both pfeddsh and pfeddsh-no-replay
    capsys.readouterr()
    assert cli.main(argv)["fedavg"][1] == runs["fedavg"][1]               # finished runs are reused...
    assert capsys.readouterr().out.count("reusing") == 6
    with pytest.raises(cli.CliError, match="other settings"):            # ...but only for the same settings
        cli.main(argv + ["--lr", "0.01"])
    # A run that stopped before writing results.json is resumed from its checkpoint, not restarted.
    (tmp_path / "fedavg-s1" / "results.json").unlink()
    capsys.readouterr()
    resumed = cli.main(argv)["fedavg"][1]
    assert "fedavg, seed 1: resuming" in capsys.readouterr().out
    assert resumed["accuracy"] == runs["fedavg"][1]["accuracy"]


def test_interrupted_comparison_says_how_to_continue_and_the_same_command_finishes(tiny_data_dir, tmp_path):
    argv = [sys.executable, str(Path(train.__file__)), *TINY, "--data-dir", str(tiny_data_dir), "--batches", "1",
            "--rounds", "40", "--methods", "fedavg", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert "protocol cpu-demo" in proc.stdout.readline()
    assert proc.stdout.readline().startswith("== local, seed 0")
    assert "local on cifar10" in proc.stdout.readline()               # the signal handlers are installed
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert "checkpoint saved" in last and "rerun the same command" in last and "Traceback" not in stderr
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "== local, seed 0: resuming" in done.stdout and (tmp_path / "comparison.md").exists()


def test_comparison_gives_pfeddsh_minus_each_method_paired_by_seed():
    def run(seed, acc):
        return {"config": {"seed": seed}, "metrics": {"mean_acc": acc}}
    runs = {"pfeddsh": [run(1, 0.80), run(2, 0.70), run(3, 0.75)],
            "fedavg": [run(1, 0.70), run(2, 0.62), run(3, 0.64)],     # differences 10, 8, 11 points
            "ditto": [run(2, 0.71)]}                                   # one seed: no interval
    lines = compare.versus(runs)
    row, = [line for line in lines if line.startswith("| fedavg |")]
    mean, low, high = compare.paired_interval([80, 70, 75], [70, 62, 64])
    p = compare.t_pvalue([10, 8, 11])
    assert row == f"| fedavg | 3 | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {p:.3f} | pfeddsh above |"
    assert abs(mean - 29 / 3) < 1e-9 and p < 0.05
    assert not any(line.startswith("| ditto |") or line.startswith("| pfeddsh |") for line in lines)
    assert compare.versus({"fedavg": runs["fedavg"]}) == []


def test_paired_interval_is_students_t_over_seeds():
    mean, low, high = compare.paired_interval([3.0, 4.0, 5.0], [2.0, 2.0, 2.0])    # differences 1, 2, 3
    half = 4.303 * 1.0 / 3 ** 0.5                                                   # t(2) x sd / sqrt(n)
    assert mean == pytest.approx(2.0) and low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)
    assert compare.paired_interval([1.0], [0.0]) is None


def test_a_tuning_grid_grows_past_the_end_its_best_value_sits_at():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_baselines
    grid = [0.003, 0.01, 0.03]
    assert tune_baselines.extend(grid, {0.003: 70.0, 0.01: 69.0, 0.03: 60.0}, 3.0) == [0.001, 0.003, 0.01, 0.03]
    assert tune_baselines.extend(grid, {0.003: 60.0, 0.01: 69.0, 0.03: 70.0}, 3.0) == [0.003, 0.01, 0.03, 0.09]
    assert tune_baselines.extend(grid, {0.003: 60.0, 0.01: 71.0, 0.03: 70.0}, 3.0) == grid
    for method, (flag, values, _) in tune_baselines.KNOBS.items():   # every grid is centred on the run's default
        assert sorted(values)[len(values) // 2] == DEFAULTS[flag.lstrip("-").replace("-", "_")], method


def test_tuning_runs_every_value_it_scores_and_stops_after_the_last_extension(monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import argparse
    import tune_baselines
    ran = []

    def fake_run(method, flag, value, seed, args):      # the smaller the rate, the better: never inside
        ran.append(value)
        return -value
    monkeypatch.setattr(tune_baselines, "run", fake_run)
    args = argparse.Namespace(seeds=[600, 601], max_extensions=2, dry_run=False)
    choice = tune_baselines.tune("fedrep", args)
    assert sorted(set(ran)) == [0.00625, 0.0125, 0.025, 0.05, 0.1] and len(ran) == 10
    assert choice["chosen"] == 0.00625 and "still at an end" in capsys.readouterr().out


def test_per_method_sets_one_methods_setting_and_keeps_the_others_runs(tiny_data_dir, tmp_path):
    argv = TINY + ["--data-dir", str(tiny_data_dir), "--methods", "fedavg,ditto", "--seeds", "0",
                   "--local-steps", "5", "--out", str(tmp_path)]
    runs = cli.main(argv + ["--per-method", "ditto:ditto-lambda=5"])
    assert runs["ditto"][0]["config"]["ditto_lambda"] == 5
    default = DEFAULTS["ditto_lambda"]
    assert runs["fedavg"][0]["config"]["ditto_lambda"] == runs["local"][0]["config"]["ditto_lambda"] == default
    # Another value for ditto alone: local's and fedavg's runs are still the same runs, reused; ditto's is not.
    with pytest.raises(cli.CliError, match="ditto-s0/results.json was made with other settings"):
        cli.main(argv + ["--per-method", "ditto:ditto-lambda=0.25"])
    # The value changes what ditto trains (its proximal weight), so the two runs differ.
    (tmp_path / "ditto-s0" / "results.json").unlink()
    (tmp_path / "ditto-s0" / "checkpoint.pt").unlink(missing_ok=True)
    other = cli.main(argv + ["--per-method", "ditto:ditto-lambda=0.001"])
    assert other["fedavg"][0] == runs["fedavg"][0] and other["ditto"][0]["accuracy"] != runs["ditto"][0]["accuracy"]


def test_frozen_adapters_header_shows_the_extensions_adapter_budget_and_fedtargets_estimate_counts_its_dreams(
        tiny_data_dir):
    ends = {}
    for method in ("pfeddsh-ext", "frozen-adapters", "pfeddsh"):
        config, clients, server, batches = build(tiny_data_dir, method)
        model = train.build(config, torch.device("cpu"), servers=runner.SERVERS)[-1]
        ends[method] = runner.header(config, "cpu", server, batches, model, None).split("adapters of rank")[1:]
    assert ends["pfeddsh-ext"] == ends["frozen-adapters"] and len(ends["pfeddsh-ext"]) == 1
    assert ends["pfeddsh"] == []                                  # the paper's method has no adapters
    config, *_ = build(tiny_data_dir, "fedtarget")
    rounds_only = runner.estimate_seconds(config, 1.0, 10, [])
    assert runner.estimate_seconds(config, 1.0, 10, [], dream_stages=[1]) > rounds_only == 10
