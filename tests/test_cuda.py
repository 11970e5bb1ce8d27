"""What only a GPU can show (skipped without CUDA): the full-size model with and without --amp (the shell's global
bf16 autocast, replay's synthesis inside it), an exact resume under --deterministic, and the Flower engine on
the GPU.
benchmarks/gpu_check.sh runs these with the rest of the GPU check."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import counts_of_test_images
from shell import cli

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FULL = ["--dataset", "cifar10", "--batches", "2", "--clients-per-batch", "2", "--clients-per-round", "2",
        "--rounds", "3", "--local-steps", "3", "--device", "cuda", "--replay-images", "8",
        "--replay-iterations", "5", "--replay-steps", "3"]     # width 64: the full-size ResNet-18


@pytest.mark.parametrize("amp", [False, True])
def test_full_size_model_trains_and_replays_on_cuda(tiny_data_dir, tmp_path, amp):
    results = cli.main(FULL + ["--data-dir", str(tiny_data_dir), "--out", str(tmp_path)] + ["--amp"] * amp)
    assert results["config"]["width"] == 64 and results["device"].startswith("cuda")
    assert counts_of_test_images(results["accuracy"][-1], results["test_sizes"])
    assert len(results["replay"]) == 1 and not results["replay"][0]["dropped"]
    assert results["replay"][0]["client_queries"] == 0          # the default method: the paper's replay
    assert (tmp_path / "synthetic_batch1.png").exists() and results["metrics"]["pa"] is not None


def test_deterministic_resume_equals_the_uninterrupted_run_on_cuda(tiny_data_dir, tmp_path):
    base = FULL + ["--data-dir", str(tiny_data_dir), "--deterministic", "--width", "16"]
    whole = cli.main(base + ["--out", str(tmp_path / "whole")])
    stopped = subprocess.run([sys.executable, str(REPO / "train.py"), *base, "--out", str(tmp_path / "cut"),
                              "--stop-after-rounds", "4"], cwd=REPO, capture_output=True, text=True)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    resumed = cli.main(base + ["--out", str(tmp_path / "cut"), "--resume"])
    for key in ("accuracy", "val_accuracy", "local_accuracy"):
        assert resumed[key] == whole[key], key


def test_flower_engine_trains_on_the_gpu(tiny_data_dir, tmp_path):
    pytest.importorskip("flwr")
    args = FULL + ["--data-dir", str(tiny_data_dir), "--width", "8", "--node-timeout", "120"]
    local = cli.main(args + ["--out", str(tmp_path / "local")])
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *args, "--engine", "flower",
                           "--out", str(tmp_path / "flower")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    flower = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert flower["device"].startswith("cuda") and flower["test_sizes"] == local["test_sizes"]
    assert counts_of_test_images(flower["accuracy"][-1], flower["test_sizes"])
