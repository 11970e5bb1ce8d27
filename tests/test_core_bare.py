"""The top level is the design card (issue 33): the core's files alone, and the core runs without the shell.

A fresh interpreter runs `train.run(config, device)` bare on tiny generated data, for both of the core's
methods, and then no module of the shell (the package `shell/`, nor the old top-level names of its files) and
none of our extensions (`extensions/`) may have been imported. A baseline, bare, is refused; the shell's registry
builds it. A core function's defaults are the run's.
"""
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import deepinversion
import extensions
import federated
import hypernet
import masks
import train

REPO = Path(__file__).resolve().parents[1]
CORE = {"data.py", "hypernet.py", "masks.py", "deepinversion.py", "federated.py", "train.py"}
SHELL = ["cli", "runner", "checkpoint", "compare", "baselines", "flower_app", "privacy", "settings", "faults",
         "datasets", "tables", "exercises"]
EXTENSIONS = ["adapters", "borrow", "selection", "controls", "server"]

BARE_RUN = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
import train
config = dict(train.DEFAULTS, dataset="cifar10", data_dir={data_dir!r}, batches=2, clients_per_batch=2, rounds=2,
              clients_per_round=2, local_steps=1, batch_size=8, width=8, hidden=16, chunk_size=1024, embed_dim=4,
              classes_per_client=5, replay_images=4, replay_iterations=2, replay_steps=2, device="cpu")
found = {{}}
for method in ("pfeddsh", "pfedhn"):
    results = train.run(dict(config, method=method), torch.device("cpu"))
    found[method] = {{"stages": len(results["accuracy"]), "replays": len(results["replay"])}}
shell = sorted(name for name in sys.modules
               if name.split(".")[0] in ("shell", "extensions") or name in {shell_names!r})
print(json.dumps({{"runs": found, "shell": shell}}))
"""


def test_the_top_level_holds_only_the_core():
    assert {p.name for p in REPO.glob("*.py")} == CORE
    assert (REPO / "shell" / "__init__.py").is_file()
    assert {f"{name}.py" for name in SHELL} <= {p.name for p in (REPO / "shell").glob("*.py")}
    assert {f"{name}.py" for name in EXTENSIONS} <= {p.name for p in (REPO / "extensions").glob("*.py")}


def test_a_bare_run_of_the_core_imports_nothing_of_the_shell(tiny_data_dir):
    script = BARE_RUN.format(repo=str(REPO), data_dir=str(tiny_data_dir), shell_names=SHELL + EXTENSIONS)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["runs"] == {"pfeddsh": {"stages": 2, "replays": 1}, "pfedhn": {"stages": 2, "replays": 0}}
    assert found["shell"] == [], f"the core imported the shell or an extension: {found['shell']}"


def test_a_baseline_needs_the_shells_registry():
    config = dict(train.DEFAULTS, method="fedavg", batches=2, clients_per_batch=2, width=8)
    with pytest.raises((ValueError, KeyError, TypeError)):
        train.build_server(config, torch.device("cpu"), 10, 32)
    from shell import baselines
    server, batches, model, layout = train.build_server(config, torch.device("cpu"), 10, 32,
                                                        servers=baselines.SERVERS)
    assert type(server) is baselines.FedAvg and sorted(sum(batches, [])) == [0, 1, 2, 3]
    assert set(baselines.SERVERS) == {"local", "fedavg", "fedavg-ft", "fedrep", "fedrep-frozen", "ditto", "fedlwf",
                                      "fedtarget", "frozen-adapters", "pfedhn-frozen", "pfedhn-pc"}


# (function, its keyword, the run's setting it mirrors): a student who calls a core function from a notebook
# gets the method the run runs.
MIRRORED = [
    (federated.Server.__init__, "server_lr", "server_lr"),
    (federated.Server.__init__, "sparsity", "sparsity"),
    (federated.Server.__init__, "classifier_lr", "classifier_lr"),
    (masks.BatchGates.__init__, "s_max", "s_max"),
    (masks.BatchGates.__init__, "lr", "gate_lr"),
    (hypernet.ResNet18.__init__, "width", "width"),
    (hypernet.HyperNetwork.__init__, "embed_dim", "embed_dim"),
    (hypernet.HyperNetwork.__init__, "hidden", "hidden"),
    (hypernet.HyperNetwork.__init__, "num_layers", "hyper_layers"),
    (hypernet.HyperNetwork.__init__, "chunk_size", "chunk_size"),
    (deepinversion.synthesize, "num_images", "replay_images"),
    (deepinversion.synthesize, "iterations", "replay_iterations"),
    (deepinversion.synthesize, "bn_weight", "replay_bn_weight"),
    (data.partition, "scheme", "partition"),
    (data.partition, "alpha", "alpha"),
    (data.partition, "val_fraction", "val_fraction"),
    (data.partition, "seed", "seed"),
]


@pytest.mark.parametrize("function, keyword, setting", MIRRORED,
                         ids=[f"{f.__qualname__}.{k}" for f, k, _ in MIRRORED])
def test_a_core_functions_default_is_the_runs(function, keyword, setting):
    assert inspect.signature(function).parameters[keyword].default == train.DEFAULTS[setting]


def test_the_core_has_no_setting_of_our_extensions():
    """The core's settings are the paper's method's; our extensions' live beside them (extensions.DEFAULTS),
    and the core's classes take none of them."""
    assert set(extensions.DEFAULTS).isdisjoint(train.DEFAULTS)
    for function in (federated.Server.__init__, hypernet.HyperNetwork.__init__, masks.BatchGates.__init__):
        assert {"adapter_budget", "adapter_lr", "optimizer", "amp"}.isdisjoint(inspect.signature(function).parameters)
    assert train.METHODS == ("pfeddsh", "pfedhn") and train.DEFAULTS["method"] == "pfeddsh"
