"""The shell's command line (shell/cli.py, shell/runner.py): every method end to end on tiny generated data and
the results.json it writes, the first line it prints, presets and flags, bad input (one line, exit 2), --amp,
threads, a late rise warned of."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import counts_of_test_images
from shell import cli, compare
from shell.settings import DEFAULTS, PRESETS
from test_train import REPLAY_TINY, REPO, TINY, run_tiny

SCHEMA = {"config", "batches", "accuracy", "val_accuracy", "metrics", "val_metrics", "neurons", "test_sizes",
          "local_accuracy", "replay", "local_steps",
          "time_s", "device", "replay_s", "faults"}          # the last four the shell adds to the core's
REPLAYING = {"pfeddsh", "pfeddsh-no-masks", "pfeddsh-noise", "pfeddsh-noise-kd", "pfeddsh-own", "pfeddsh-ext", "pfeddsh-ext-shape", "pfeddsh-ext-noise", "pfeddsh-ext-own"}
MASKED = {"pfeddsh", "pfeddsh-no-replay", "pfeddsh-noise", "pfeddsh-noise-kd", "pfeddsh-own", "pfeddsh-ext", "pfeddsh-ext-no-replay", "pfeddsh-ext-shape",
          "pfeddsh-ext-noise", "pfeddsh-ext-own"}


def variant_args(name):
    v = compare.variant_config(name)
    return (["--method", v["method"]] + ["--no-replay"] * v["no_replay"] + ["--no-masks"] * v["no_masks"]
            + (["--adapter-budget", str(v["adapter_budget"])] if "adapter_budget" in v else [])
            + (["--replay-control", v["replay_control"]] if v["replay_control"] != "none" else []) + REPLAY_TINY)


@pytest.mark.parametrize("name", sorted(compare.VARIANTS))
def test_every_method_runs_two_stages_and_writes_the_same_schema(tiny_data_dir, tmp_path, name):
    run_tiny(tiny_data_dir, tmp_path / name, *variant_args(name), "--rounds", "2", "--local-steps", "1")
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert set(results) == SCHEMA
    for plot in ("accuracy_matrix.png", "batch_accuracy.png"):    # every run draws its own plots
        assert (tmp_path / name / plot).stat().st_size > 0
    assert results["config"]["method"] == compare.variant_config(name)["method"] and results["config"]["rounds"] == 2
    batches = results["batches"]
    assert sorted(c for b in batches for c in b) == [0, 1, 2, 3] and len(batches) == 2
    accuracy = results["accuracy"]
    assert len(accuracy) == 2 and all(len(row) == 4 for row in accuracy)
    for cid in batches[1]:
        assert accuracy[0][cid] is None                 # batch 1 had not joined after stage 0
    for row in accuracy:
        assert counts_of_test_images(row, results["test_sizes"])
    assert all(a is not None for a in accuracy[1]) and counts_of_test_images(accuracy[1], results["test_sizes"])
    m = results["metrics"]
    assert set(m) == {"mean_acc", "weighted_acc", "ri", "ri_per_batch", "pa", "pa_per_batch", "batch_acc"}
    assert len(m["ri_per_batch"]) == 1 and len(m["pa_per_batch"]) == 1
    # PA: batch 1 after its stage against the same clients trained alone in the same run
    local = results["local_accuracy"][1]
    assert results["local_accuracy"][0] is None and all((local[c] is None) == (c not in batches[1]) for c in range(4))
    assert m["pa"] == pytest.approx(sum(accuracy[1][c] - local[c] for c in batches[1]) / len(batches[1]))
    expected_ri = sum(accuracy[1][c] - accuracy[0][c] for c in batches[0]) / len(batches[0])
    assert m["ri"] == pytest.approx(expected_ri)
    assert len(results["time_s"]) == 2 and all(s > 0 for s in results["time_s"])
    assert results["device"] == "cpu" and set(results["faults"]) >= {"dropped_updates", "skipped_rounds"}
    assert len(results["replay"]) == len(results["replay_s"]) == (1 if name in REPLAYING else 0)
    if compare.variant_config(name)["method"] == "pfeddsh":     # the paper's replay asks no client anything
        assert all(r["client_queries"] == 0 for r in results["replay"])
    # Batch 0 cannot change after its stage where nothing it reads is written: masks without replay,
    # a hypernetwork or a body frozen after batch 0, personal models nobody else trains, or clients alone.
    if name in ("pfeddsh-no-replay", "pfeddsh-ext-no-replay", "pfedhn-frozen", "fedrep-frozen", "frozen-adapters",
                "ditto", "local"):
        assert m["ri"] == 0.0
    assert (results["neurons"] is not None) == (name in MASKED)
    if name in MASKED:
        assert [set(n) >= {"used", "owned", "reuse"} for n in results["neurons"]] == [True, True]


def test_the_default_method_is_the_papers_and_says_so(tiny_data_dir, tmp_path):
    """`python train.py` with no --method: the first line it prints names pfeddsh as the paper's method; the run
    builds no adapter; its replay asks no client (client_queries 0 in every report of results.json) and writes
    its dreams' grid. --method pfeddsh-ext says it is ours, not the paper's."""
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, *REPLAY_TINY, "--classes-per-client", "6",
                           "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("pfeddsh (the paper's method") and "ours" not in lines[0]
    assert lines[1].startswith("pfeddsh on cifar10") and "adapters" not in lines[1]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["method"] == "pfeddsh" and not results["config"]["no_replay"]
    assert not [key for key in results["config"] if "adapter" in key]     # no setting of our extension
    report, = results["replay"]
    assert report["client_queries"] == 0 and report["tried"], "6 of 10 classes each: the two batches share a class"
    assert set(report["tried"]) <= set(results["batches"][0]) and not report["dropped"]
    assert "accepted" not in report and "kept" not in report       # no selection: the paper keeps every path's end
    assert len(report["bn_loss_end"]) == len(report["bn_loss_start"]) > 0
    assert results["replay_s"][0] > 0 and (tmp_path / "run" / "synthetic_batch1.png").stat().st_size > 0
    assert cli.describe_protocol(dict(DEFAULTS, method="pfeddsh-ext", preset="cpu-demo", preset_auto=False)) \
        .startswith("pfeddsh-ext (ours, not the paper's")
    assert "paper" not in cli.describe_protocol(dict(DEFAULTS, method="fedavg", preset="cpu-demo",
                                                     preset_auto=False)).split(";")[0]


def test_refuses_to_overwrite_another_runs_results(tiny_data_dir, tmp_path):
    run_tiny(tiny_data_dir, tmp_path, "--rounds", "1", "--local-steps", "1", "--method", "local")
    with pytest.raises(cli.CliError, match="already exists"):
        run_tiny(tiny_data_dir, tmp_path, "--rounds", "1", "--no-replay")


def train_py(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


BAD_INPUT = {
    "unknown dataset": (["--dataset", "mnist"], "unknown dataset"),
    "no data offline": (["--dataset", "cifar10", "--data-dir", "{empty}"], "not found"),
    "too many clients": (["--clients-per-batch", "400"], "more than the data supports"),
    "too many classes": (["--classes-per-client", "11"], "more than cifar10 has"),
    "non-positive count": (["--rounds", "0"], "--rounds must be a positive integer"),
    "negative lr": (["--lr", "-1"], "--lr must be positive"),
    "not a number": (["--batches", "two"], "invalid int value"),
    "unknown method": (["--method", "nope"], "unknown method"),
    "ablation of a baseline": (["--method", "fedavg", "--no-masks"], "--no-masks is an option of pfeddsh"),
    "adapter budget of a whole model": (["--adapter-budget", "1"], "--adapter-budget must be in [0, 1)"),
    "a removed flag": (["--server-optimizer", "sgd"], "unrecognized arguments: --server-optimizer"),
    "the removed preset alias": (["--preset", "paper"], "invalid choice: 'paper'"),
    "an extension's flag for the paper's method": (["--adapter-budget", "0.1"],
                                                   "--adapter-budget is a setting of our extension: use --method "
                                                   "pfeddsh-ext"),
    "an extension's replay flag": (["--replay-validate-every", "2"], "is a setting of our extension"),
    "--replay-keep unknown": (["--replay-keep", "best"], "invalid choice: 'best'"),
    "--amp on flower": (["--amp", "--engine", "flower"], "--amp runs with --engine local only"),
    "unknown method in --methods": (["--methods", "fedavg,fedprox"], "unknown method 'fedprox' in --methods"),
    "--methods with --method": (["--methods", "fedavg", "--method", "pfedhn"], "--method does not go with"),
    "bad --seeds": (["--methods", "fedavg", "--seeds", "0,x"], "--seeds must be comma-separated integers"),
    "cuda without cuda": (["--device", "cuda"], "CUDA is not available"),
    "--out is a file": (["--out", "{file}"], "is a file, not a folder"),
    "--out under a file": (["--out", "{file}/run"], "is a file, not a folder"),
    "negative seed": (["--seed", "-5"], "--seed must be an integer in 0 .. 4294967295"),
    "huge seed": (["--seed", "99999999999999999999"], "--seed must be an integer in 0 .. 4294967295"),
    "negative seed in --seeds": (["--methods", "fedavg", "--seeds", "0,-1"], "--seeds must be an integer in"),
    "model too large for memory": (["--width", "100000"], "this run needs at least"),
    "batch too large for memory": (["--batch-size", "10000000000"], "the largest part is client training"),
    "infinite lr": (["--lr", "inf"], "--lr must be positive and finite"),
    "more clients than test images": (["--batches", "100000000"], "more than the data supports"),
    "negative --bn-noise": (["--bn-noise", "-0.1"], "--bn-noise must be >= 0 and finite"),
    "--bn-noise not a number": (["--bn-noise", "nan"], "--bn-noise must be >= 0 and finite"),
    "negative --replay-bn-weight": (["--replay-bn-weight", "-1"], "--replay-bn-weight must be >= 0 and finite"),
    "--replay-confirm-alpha of 1": (["--replay-confirm-alpha", "1"], "--replay-confirm-alpha must be between 0 and 1"),
    "--replay-confirm-alpha nan": (["--replay-confirm-alpha", "nan"], "--replay-confirm-alpha must be between 0 and 1"),
    "--bn-noise without replay": (["--bn-noise", "0.1", "--no-replay"], "--bn-noise is about replay"),
    "--privacy-audit of a baseline": (["--privacy-audit", "--method", "fedavg"], "--privacy-audit is about replay"),
    "a control of a baseline": (["--replay-control", "noise", "--method", "pfedhn"], "--replay-control noise is about"),
    "an unknown control": (["--replay-control", "shuffle"], "invalid choice"),
    "an audit of noise": (["--replay-control", "noise", "--privacy-audit", "--method", "pfeddsh-ext"],
                          "a --replay-control run has none"),
    "--per-method without --methods": (["--per-method", "ditto:ditto-lambda=0.1"], "--per-method goes with --methods"),
    "--per-method of a method not compared": (["--methods", "fedavg", "--per-method", "ditto:lr=0.1"],
                                              "'ditto' is not in this comparison"),
    "--per-method of the data": (["--methods", "ditto", "--per-method", "ditto:alpha=0.1"],
                                 "--alpha is shared by every method"),
    "--per-method unknown flag": (["--methods", "ditto", "--per-method", "ditto:lamda=0.1"], "unknown setting"),
    "--per-method bad value": (["--methods", "ditto", "--per-method", "ditto:lr=-1"], "--lr must be positive"),
    "--per-method not a number": (["--methods", "ditto", "--per-method", "ditto:lr=fast"], "invalid float value"),
    "--per-method without =": (["--methods", "ditto", "--per-method", "ditto:lr"], "takes METHOD:FLAG=VALUE"),
    # issue 43, benchmarks/flag_edges.py: values that were accepted and then ended in a traceback
    "lr beyond float32": (["--lr", "1e308"], "--lr must be positive and finite, at most 3.4e+38 (float32's largest)"),
    "a temperature whose square overflows": (["--replay-temperature", "1e308"],
                                             "--replay-temperature must be positive and finite, at most 3.4e+38"),
    "a weight beyond float32": (["--replay-kd", "1e39"], "--replay-kd must be >= 0 and finite, at most 3.4e+38"),
    "a Dirichlet alpha beyond float32": (["--partition", "dirichlet", "--alpha", "1e308"],
                                         "--alpha must be positive and finite, at most 3.4e+38"),
    "a confirmation level Holm cannot test": (["--method", "pfeddsh-ext", "--replay-confirm-alpha", "1e-308"],
                                              "--replay-confirm-alpha must be between 0 and 1, at least 1e-09"),
    "threads beyond a C int": (["--threads", "1000000000000"], "--threads must be at most"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, tiny_data_dir, tmp_path, capsys):
    """In-process through cli.cli, train.py's entry point (test_train_py_exits_2 checks the process itself)."""
    args, expected = BAD_INPUT[case]
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case == "--amp on flower":
        pytest.importorskip("flwr")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    args = [a.replace("{empty}", str(empty)).replace("{file}", str(tmp_path / "a_file")) for a in args]
    base = ["--data-dir", str(tiny_data_dir)] if "--data-dir" not in args else []
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    code = cli.cli([*base, *args, *out])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0] and "Traceback" not in err


def test_train_py_exits_2_with_one_line(tmp_path):
    done = train_py("--rounds", "0", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "error: --rounds must be a positive integer, got 0"


def test_auto_preset_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config, _ = cli.resolve_config([])
    demo = PRESETS["cpu-demo"]
    assert demo["width"] < DEFAULTS["width"] and demo["rounds"] < DEFAULTS["rounds"]
    assert (config["preset"], config["preset_auto"], config["width"], config["rounds"]) == \
        ("cpu-demo", True, demo["width"], demo["rounds"])
    line = cli.describe_protocol(config)
    assert "protocol cpu-demo" in line and "--preset full" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config, _ = cli.resolve_config([])
    assert (config["preset"], config["width"], config["rounds"]) == ("full", DEFAULTS["width"], DEFAULTS["rounds"])
    assert "--preset cpu-demo" in cli.describe_protocol(config)
    config, _ = cli.resolve_config(["--device", "cpu"])             # CUDA there, but not asked for
    assert config["preset"] == "cpu-demo"


def test_explicit_preset_and_flags_win_over_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config, _ = cli.resolve_config(["--preset", "cpu-demo", "--rounds", "7"])
    assert (config["preset"], config["preset_auto"], config["width"], config["rounds"]) == \
        ("cpu-demo", False, PRESETS["cpu-demo"]["width"], 7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config, _ = cli.resolve_config(["--preset", "full", "--width", "8"])
    assert (config["preset"], config["width"], config["rounds"]) == ("full", 8, DEFAULTS["rounds"])
    assert {k: v for k, v in config.items() if k in train.DEFAULTS and k != "width"} == \
        {k: v for k, v in train.DEFAULTS.items() if k != "width"}


def test_help_shows_every_default_and_the_presets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")          # one line per option, whatever the terminal
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    demo = PRESETS["cpu-demo"]
    assert f"(default {DEFAULTS['width']}; cpu-demo {demo['width']})" in text
    assert f"(default {DEFAULTS['rounds']}; cpu-demo {demo['rounds']})" in text
    assert f"cpu-demo: a few minutes on a 2-core CPU: --width {demo['width']}" in text
    for action in cli.build_parser()._actions:          # every option with a default says it
        if action.dest in train.DEFAULTS:
            assert "default" in action.help, action.dest


def test_threads_flag_is_checked_recorded_and_restored(tiny_data_dir, tmp_path):
    with pytest.raises(cli.CliError, match="--threads must be a positive integer"):
        cli.resolve_config(["--threads", "0"])
    before = torch.get_num_threads()
    results = run_tiny(tiny_data_dir, tmp_path, "--method", "local", "--threads", "1", "--rounds", "1",
                       "--local-steps", "1")
    assert results["config"]["threads"] == 1 and torch.get_num_threads() == before
    assert cli.default_threads() == max(1, len(os.sched_getaffinity(0)) - 1)


def test_threads_beyond_the_cores_are_refused_and_the_edges_of_every_bound_accepted():
    """Issue 43: a bound is where the check says, the largest and smallest accepted values pass it."""
    cores = cli.available_cores()
    with pytest.raises(cli.CliError, match=f"--threads must be at most {cores}, the cores this process may use"):
        cli.resolve_config(["--threads", str(cores + 1)])
    assert cli.FLOAT32_MAX <= torch.finfo(torch.float32).max
    config, _ = cli.resolve_config(["--threads", str(cores), "--lr", "3.4e38", "--replay-temperature", "3.4e38",
                                    "--replay-kd", "3.4e38", "--alpha", "1e-308"])
    assert config["threads"] == cores and config["lr"] == cli.FLOAT32_MAX == 3.4e38
    config, _ = cli.resolve_config(["--method", "pfeddsh-ext", "--replay-confirm-alpha", "1e-9"])
    assert config["replay_confirm_alpha"] == cli.CONFIRM_ALPHA_MIN


def test_the_smallest_confirmation_level_holm_is_given_can_still_be_tested():
    """The bound's reason: at CONFIRM_ALPHA_MIN, with a proposal per client of the largest run the data allows,
    Holm's strictest level still has a normal quantile; below, it rounds to 1.0 and has none."""
    from statistics import NormalDist, StatisticsError
    from shell import runner
    most = runner.DATASET_IMAGES["cifar10"][1]          # clients: at most one test image each
    assert NormalDist().inv_cdf(1 - cli.CONFIRM_ALPHA_MIN / most) > 0
    with pytest.raises(StatisticsError):
        NormalDist().inv_cdf(1 - 1e-308 / 2)


def test_deterministic_switches_cuda_kernels_both_ways():
    try:
        cli.use_kernels(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.are_deterministic_algorithms_enabled()
        cli.use_kernels(False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        cli.use_kernels(False)


def test_a_stage_whose_last_rounds_get_worse_is_not_ended_silently():
    from shell import runner
    assert runner.late_rise([1.2, 0.7, 0.55, 0.5, 0.52, 0.9, 1.1], stage=1).startswith("warning: stage 1")
    assert runner.late_rise([1.2, 0.7, 0.55, 0.5, 0.52, 0.58, 0.49], stage=1) is None     # noise, not a fall
    assert runner.late_rise([0.5, 2.0], stage=0) is None                                   # too short to tell


# --------------------------------------------------------------------------------------------------
# --amp: the shell's global bf16 autocast
# --------------------------------------------------------------------------------------------------

def test_without_amp_no_autocast_context_is_ever_opened(tiny_data_dir, tmp_path, monkeypatch):
    """--amp off (the default) must leave fp32 runs bitwise as they were: not even a disabled autocast."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.autocast opened without --amp")
    monkeypatch.setattr(torch, "autocast", refuse)
    results = run_tiny(tiny_data_dir, tmp_path, "--rounds", "1", "--classes-per-client", "6", *REPLAY_TINY)
    assert results["config"]["amp"] is False and len(results["replay"]) == 1


def test_amp_runs_the_whole_experiment_in_one_bf16_autocast(tiny_data_dir, tmp_path, monkeypatch, capsys):
    """--amp: train.run runs inside one bf16 autocast of the run's device (replay included), and a whole run on
    a CPU works and says that it is meant for CUDA; the results are counts of test images like any run's."""
    opened, inside, real = [], [], torch.autocast

    class Recording:
        def __init__(self, device_type, dtype=None, **kwargs):
            opened.append((device_type, dtype))
            self.context = real(device_type, dtype=dtype, **kwargs)

        def __enter__(self):
            inside.append(True)
            return self.context.__enter__()

        def __exit__(self, *exc):
            inside.pop()
            return self.context.__exit__(*exc)

    monkeypatch.setattr(torch, "autocast", Recording)
    import deepinversion
    synthesize, seen = deepinversion.synthesize, []

    def watched(*args, **kwargs):
        seen.append(bool(inside) and torch.is_autocast_enabled("cpu"))
        return synthesize(*args, **kwargs)

    monkeypatch.setattr(deepinversion, "synthesize", watched)
    results = run_tiny(tiny_data_dir, tmp_path, "--amp", "--classes-per-client", "6", "--rounds", "1",
                       "--local-steps", "1", *REPLAY_TINY)
    assert opened == [("cpu", torch.bfloat16)] and seen == [True]
    assert "--amp on a CPU runs bf16 autocast" in capsys.readouterr().out
    assert results["config"]["amp"] is True and len(results["replay"]) == 1 and not results["replay"][0]["dropped"]
    assert counts_of_test_images(results["accuracy"][-1], results["test_sizes"])
