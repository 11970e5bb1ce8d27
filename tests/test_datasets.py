"""Tests for shell/datasets.py: a missing dataset folder is downloaded (CIFAR) or decoded (Tiny-ImageNet) once
and written where data.load_dataset reads it; every failure is one line."""
import shutil
import urllib.error

import numpy as np
import pytest
import torch

import data
from shell import datasets


def test_missing_data_without_download_is_one_line(tmp_path):
    with pytest.raises(data.DataError) as e:
        datasets.prepare("cifar10", str(tmp_path), download=False)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "cifar10") in msg and "--data-dir" in msg


def test_prepare_leaves_a_prepared_folder_alone(tiny_data_dir):
    before = {p.name: p.stat().st_mtime_ns for p in (tiny_data_dir / "cifar10").iterdir()}
    datasets.prepare("cifar10", str(tiny_data_dir), download=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tiny_data_dir / "cifar10").iterdir()} == before


class _FakeCIFAR:
    """Stands in for torchvision.datasets.CIFAR10: either fails like an offline download or serves arrays."""
    offline = True

    def __init__(self, root, train, download):
        if self.offline:
            print("Downloading https://www.cs.toronto.edu/...")  # torchvision's chatter must not reach the user
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        n = 50 if train else 20
        self.data = np.full((n, 32, 32, 3), 7 if train else 9, dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]
        self.classes = [f"c{i}" for i in range(10)]


def test_download_failure_is_quiet_and_one_line(tmp_path, monkeypatch, capsys):
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR)
    with pytest.raises(data.DataError) as e:
        datasets.prepare("cifar10", str(tmp_path))
    assert "\n" not in str(e.value) and "could not be downloaded" in str(e.value)
    out = capsys.readouterr()           # only our note that a download is being tried, none of torchvision's
    note = f"cifar10: no cache in {tmp_path / 'cifar10'}; downloading it with torchvision (once, about 170 MB)\n"
    assert out.out == note
    assert out.err == ""


def test_download_writes_cache(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", type("Online", (_FakeCIFAR,), {"offline": False}))
    datasets.prepare("cifar10", str(tmp_path))
    ds = data.load_dataset("cifar10", str(tmp_path))
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32) and ds.classes[0] == "c0"
    assert sorted(p.name for p in (tmp_path / "cifar10").glob("*")) == ["classes.txt", "test.npz", "train_0.npz"]
    # the second load reads the cache and never asks torchvision (which is offline again)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR)
    datasets.prepare("cifar10", str(tmp_path))
    again = data.load_dataset("cifar10", str(tmp_path))
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_tinyimagenet_folder_is_decoded_and_cached(tmp_path):
    from PIL import Image
    root = tmp_path / "tinyimagenet" / "tiny-imagenet-200"
    wnids = [f"n{k:08d}" for k in range(200)]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # classes are sorted by wnid
    (root / "words.txt").write_text("".join(f"{w}\tthing {k}, other name\n" for k, w in enumerate(wnids)))
    rng = np.random.default_rng(0)
    annotations = []
    for k, w in enumerate(wnids):
        (root / "train" / w / "images").mkdir(parents=True)
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0], "L") if k == 5 else Image.fromarray(pixels)  # one greyscale
        image.save(root / "train" / w / "images" / f"{w}_0.JPEG")
        image.save(root / "val" / "images" / f"val_{k}.JPEG")
        annotations.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")

    datasets.prepare("tinyimagenet", str(tmp_path))
    ds = data.load_dataset("tinyimagenet", str(tmp_path))
    assert ds.x_train.shape == (200, 3, 64, 64) and ds.x_test.shape == (200, 3, 64, 64) and ds.image_size == 64
    assert ds.y_train.tolist() == list(range(200)) and ds.classes[3] == "thing 3"
    assert (tmp_path / "tinyimagenet" / "train_0.npz").exists()
    shutil.rmtree(root)  # the cache alone is enough now
    assert torch.equal(data.load_dataset("tinyimagenet", str(tmp_path)).x_test, ds.x_test)


def test_tinyimagenet_missing(tmp_path):
    with pytest.raises(data.DataError, match="tiny-imagenet-200") as e:
        datasets.prepare("tinyimagenet", str(tmp_path))
    assert "\n" not in str(e.value)


def test_unknown_dataset(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset 'mnist': choose from cifar10, cifar100, tinyimagenet"):
        datasets.prepare("mnist", str(tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_dtype", "missing_test", "classes"])
def test_corrupt_cache_is_one_line(tmp_path, tiny_data_dir, damage):
    """`check` (run by prepare on a folder that has train_*.npz) refuses damaged files before a run loads them."""
    shutil.copytree(tiny_data_dir / "cifar10", tmp_path / "cifar10")
    datasets.check(tmp_path / "cifar10", 10)            # the intact copy passes
    target = tmp_path / "cifar10" / "test.npz"
    if damage == "garbage":
        target.write_bytes(b"not a zip file")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:5000])
    elif damage == "wrong_dtype":
        np.savez(target, x=np.zeros((4, 32, 32, 3), np.float32), y=np.zeros(4, np.int64))
    elif damage == "missing_test":
        target.unlink()
    else:
        target = tmp_path / "cifar10" / "classes.txt"
        target.write_text("one\ntwo\n")
    with pytest.raises(data.DataError, match=target.name) as e:
        datasets.prepare("cifar10", str(tmp_path), download=False)
    assert "\n" not in str(e.value)


def test_labels_out_of_range_are_refused(tmp_path, tiny_data_dir):
    shutil.copytree(tiny_data_dir / "cifar10", tmp_path / "cifar10")
    shard = tmp_path / "cifar10" / "train_1.npz"
    with np.load(shard) as f:
        x, y = f["x"], f["y"].copy()
    y[0] = 10
    np.savez(shard, x=x, y=y)
    with pytest.raises(data.DataError, match=r"labels in \[0, 10\], expected 0..9"):
        datasets.check(tmp_path / "cifar10", 10)
