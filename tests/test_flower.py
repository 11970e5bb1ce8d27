"""--engine flower (flower_app.py): Flower's simulation engine against the in-process loop, a real
SuperLink with SuperNodes on 127.0.0.1, a SuperNode killed mid-run, and bad input.

Skipped without Flower; CI installs requirements-flower.txt and runs them. The two tests with a real SuperLink
take minutes on a 2-core CPU (every message starts a ClientApp process): they run when PFEDDSH_SUPERLINK=1 is set.
Every process a test starts is in a process group of its own and is killed when the test ends, passed or not."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from shell import cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "cifar10", "--batches", "2", "--clients-per-batch", "2", "--rounds", "3",
        "--clients-per-round", "2", "--local-steps", "2", "--batch-size", "16", "--width", "8",
        "--hidden", "16", "--chunk-size", "1024", "--embed-dim", "4", "--device", "cpu"]
# 5 classes per client, so that batch 1's dreams hold classes of batch 0 and replay tries its clients (with
# 2 classes each, the tiny split gives the batches disjoint classes).
REPLAY = ["--replay-images", "4", "--replay-iterations", "3", "--replay-steps", "3", "--classes-per-client", "5"]


def needs_flower():
    pytest.importorskip("flwr")
    pytest.importorskip("ray")


superlink = pytest.mark.skipif(os.environ.get("PFEDDSH_SUPERLINK") != "1",
                               reason="a real SuperLink takes minutes: set PFEDDSH_SUPERLINK=1 to run it")


def train_py(*args, timeout=900):   # a hang guard, not a speed claim: two loaded cores take minutes
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_simulation_gives_the_in_process_results(tiny_data_dir, tmp_path):
    """Same seed, same numbers: the clients draw from their own generators (kept in their node's Context
    between messages), the weights travel as float32 bit for bit, and the Ray worker trains with as many
    threads as this process does."""
    needs_flower()
    common = TINY + REPLAY + ["--data-dir", str(tiny_data_dir)]
    local = cli.main(common + ["--out", str(tmp_path / "local")])
    done = train_py(*common, "--out", str(tmp_path / "flower"), "--engine", "flower", "--node-timeout", "300")
    assert done.returncode == 0, done.stderr[-3000:]
    flower = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert set(flower) == set(local)
    for key in ["batches", "accuracy", "val_accuracy", "val_metrics", "neurons", "test_sizes"]:
        assert flower[key] == local[key], key
    # PA's local reference trains on the clients' own data in this process: the flower engine has none
    without_pa = {k: v for k, v in local["metrics"].items() if not k.startswith("pa")}
    assert flower["metrics"] == dict(without_pa, pa=None, pa_per_batch=None) and local["metrics"]["pa"] is not None
    assert flower["config"]["engine"] == "flower"
    replay, = flower["replay"]
    assert replay["tried"] and replay["client_queries"] == 0        # the paper's replay sends the nodes nothing
    for key in ["tried", "bn_loss_start", "bn_loss_end"]:
        assert replay[key] == local["replay"][0][key], key
    assert flower["faults"] == dict(local["faults"], unanswered_messages=0)


def test_the_extension_with_adapters_and_selection_gives_the_in_process_results_on_one_thread(tiny_data_dir,
                                                                                               tmp_path):
    """pfeddsh-ext: its replay asks the earlier clients, as messages, to score proposals on val_select and to
    confirm them on val_confirm. With batch adapters (rank >= 1) the server's update holds a threaded MKL product
    whose last bits depend on the thread that calls it (Flower runs the ServerApp in a thread of its own: README,
    "What Flower costs"). On one thread there is nothing to split, and the engines agree bit for bit."""
    needs_flower()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    common = TINY + REPLAY + ["--method", "pfeddsh-ext", "--adapter-budget", "0.5", "--data-dir", str(tiny_data_dir)]
    results = {}
    for engine in ["local", "flower"]:
        done = subprocess.run([sys.executable, str(REPO / "train.py"), *common, "--engine", engine, "--node-timeout",
                               "300", "--out", str(tmp_path / engine)], capture_output=True, text=True, timeout=600,
                              env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert re.search(r"adapters of rank [1-9]", done.stdout + done.stderr)
        results[engine] = json.loads((tmp_path / engine / "results.json").read_text())
    for key in ["accuracy", "val_accuracy", "val_metrics", "neurons"]:
        assert results["flower"][key] == results["local"][key], key
    assert results["flower"]["metrics"] == dict(results["local"]["metrics"], pa=None, pa_per_batch=None)
    replay, = results["flower"]["replay"]
    assert replay["tried"] and replay["client_queries"] > 0         # the clients did score and confirm, as messages
    for key in ["val_before", "val_after", "confirm", "accepted", "rejected", "client_queries", "bn_loss_end"]:
        assert replay[key] == results["local"]["replay"][0][key], key


def test_flower_bad_input_exits_2_with_one_line(tiny_data_dir, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    with pytest.raises(cli.CliError, match="needs Flower.*pip install -r requirements-flower.txt"):
        cli.resolve_config(["--engine", "flower"])
    monkeypatch.undo()
    needs_flower()
    for args, expected in [(["--method", "fedavg-ft"], "cannot run fedavg-ft"),
                           (["--methods", "fedavg-ft,pfeddsh"], "cannot run fedavg-ft"),
                           (["--resume"], "nothing to --resume"),
                           (["--node-timeout", "0"], "--node-timeout must be positive"),
                           (["--privacy-audit"], "stay on their Flower nodes")]:
        done = train_py("--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out"), "--engine", "flower", *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr


# ------------------------------------------------------------------------------------------------------
# A real SuperLink and SuperNodes, as local processes
# ------------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def federation(tmp_path, num_nodes, data_dir):
    """A SuperLink and `num_nodes` SuperNodes (client ids 0..n-1) in --insecure mode on 127.0.0.1.

    Yields (environment for `flwr run`, {client id: SuperNode process}, {client id: its log}). Each process
    leads a process group (a SuperNode starts a SuperExec and ClientApp processes): all are killed at the end."""
    home = tmp_path / "flwr_home"          # Flower's own files (installed apps, the connection), not ~/.flwr
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    # Unbuffered: a node's log lines reach its file as they happen (block-buffered, they came at its exit).
    env = dict(os.environ, FLWR_HOME=str(home), PYTHONUNBUFFERED="1")
    procs, nodes, logs = [], {}, {}

    def start(cmd, log):
        procs.append(subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
        return procs[-1]

    try:
        start(["flower-superlink", "--insecure", "--port", str(link_port),
               "--disable-runtime-dependency-installation"], tmp_path / "superlink.log")
        wait_until(lambda: "Uvicorn running" in (tmp_path / "superlink.log").read_text(), "the SuperLink to listen")
        for cid in range(num_nodes):
            logs[cid] = tmp_path / f"supernode{cid}.log"
            nodes[cid] = start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                "--port", str(free_port()),
                                "--node-config", f'client-id={cid} data-dir="{data_dir}"'], logs[cid])
        for cid in range(num_nodes):
            wait_until(lambda: "SuperNode ID" in logs[cid].read_text(), f"SuperNode {cid} to connect")
        yield env, nodes, logs
    finally:
        for p in procs:
            kill(p)


def wait_until(condition, what, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.2)


def kill(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def flwr_run(env, args, timeout):
    """`flwr run` this repository on the test SuperLink; the run config's args is train.py's command line."""
    return subprocess.Popen(["flwr", "run", str(REPO), "--run-config", f'args="{" ".join(args)}"', "--stream"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


# Two nodes, one client each, in two batches: every message is a new ClientApp process on a real node.
DEPLOYED = ["--dataset", "cifar10", "--batches", "2", "--clients-per-batch", "1", "--rounds", "1",
            "--local-steps", "2", "--batch-size", "16", "--width", "8", "--hidden", "16", "--chunk-size", "1024",
            "--embed-dim", "4", "--device", "cpu", "--no-replay"]


def finish(run, timeout):
    try:
        output, _ = run.communicate(timeout=timeout)
    finally:
        kill(run)
    return output


@superlink
def test_superlink_and_supernodes_run_it(tiny_data_dir, tmp_path):
    needs_flower()
    out = tmp_path / "run"
    with federation(tmp_path, 2, tiny_data_dir) as (env, nodes, logs):
        run = flwr_run(env, DEPLOYED + ["--data-dir", "/nowhere", "--out", str(out), "--node-timeout", "60"],
                       timeout=240)
        output = finish(run, 240)
    assert (out / "results.json").exists(), output[-3000:]
    results = json.loads((out / "results.json").read_text())
    local = cli.main(DEPLOYED + ["--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "local")])
    # The nodes read their data from --node-config data-dir (the server's /nowhere is never read).
    assert results["accuracy"] == local["accuracy"] and results["batches"] == local["batches"]
    assert results["faults"]["unanswered_messages"] == 0


@superlink
def test_a_supernode_killed_mid_run_counts_as_dropped(tiny_data_dir, tmp_path):
    """Batch 1's node dies once every node has answered who it is (batch 0 is training): its update in stage
    1 never comes (a dropped update, a round without a server step), its evaluation is NaN, the run ends.
    The server asks for its test and its validation accuracy in two messages (federated.Server.evaluate).

    The kill waits on the nodes' own logs, which are unbuffered: stage 0 lasts seconds after batch 0's node
    receives its training (every message starts a ClientApp process of its own), and the late node is asked
    nothing before stage 1; the test checks that it was not."""
    needs_flower()
    import data
    _, (late,) = data.assign_batches(2, 2, 0)
    early = 1 - late
    out = tmp_path / "run"
    args = DEPLOYED + ["--data-dir", "/nowhere", "--out", str(out), "--node-timeout", "30"]
    with federation(tmp_path, 2, tiny_data_dir) as (env, nodes, logs):
        run = flwr_run(env, args, timeout=240)
        deadline = time.time() + 180
        # batch 0's training begins only after every node has answered its query
        while "Receiving: train message" not in logs[early].read_text():
            assert time.time() < deadline and run.poll() is None, "batch 0 never trained"
            time.sleep(0.1)
        assert "Sending: query message" in logs[late].read_text()
        assert "Receiving: train message" not in logs[late].read_text(), "stage 1 began before the kill"
        kill(nodes[late])
        output = finish(run, 240)
    assert (out / "results.json").exists(), output[-3000:]
    results = json.loads((out / "results.json").read_text())
    faults = results["faults"]
    assert faults["dropped_updates"] == 1 and faults["skipped_rounds"] == 1, (faults, output[-3000:])
    assert faults["unanswered_messages"] == 3, faults            # its training and its two evaluations
    final = results["accuracy"][1]
    early_right = final[early] * results["test_sizes"][early]            # a count of its test images
    assert final[late] != final[late] and abs(early_right - round(early_right)) < 1e-6    # NaN, and a real number
