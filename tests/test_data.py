"""Tests for data.py: loading, the client partition (its promised class mix), batches, and the batched
augmentation. Checking the files, downloading and decoding are the shell's (tests/test_datasets.py); checking
the partition's arguments is the CLI's (tests/test_cli.py)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def test_load_tiny_cache(tiny_data_dir):
    ds = data.load_dataset("cifar10", str(tiny_data_dir), device="cpu")
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (600, 3, 32, 32)
    assert ds.x_test.dtype == torch.uint8 and ds.x_test.shape == (200, 3, 32, 32)
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert ds.x_train.device.type == "cpu" and ds.num_classes == 10 and ds.image_size == 32
    assert ds.classes == [f"class{c}" for c in range(10)]
    # shards concatenated in order, NHWC -> NCHW
    shards = [np.load(tiny_data_dir / "cifar10" / f"train_{k}.npz") for k in (0, 1)]
    x = np.concatenate([s["x"] for s in shards])
    assert torch.equal(ds.x_train, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert torch.equal(ds.y_train, torch.from_numpy(np.concatenate([s["y"] for s in shards])))
    assert np.allclose(ds.mean, (x / 255).mean(axis=(0, 1, 2)), atol=1e-9)
    assert np.allclose(ds.std, (x / 255).std(axis=(0, 1, 2)), atol=1e-9)


@pytest.mark.skipif(not (SHARED_DATA / "cifar10" / "train_0.npz").exists(), reason="no shared CIFAR-10")
def test_real_cifar10():
    ds = data.load_dataset("cifar10", str(SHARED_DATA))
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.num_classes == 10 and ds.classes[0] == "airplane"
    assert torch.bincount(ds.y_train).tolist() == [5000] * 10
    assert np.allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=1e-4)
    assert np.allclose(ds.std, (0.2470, 0.2435, 0.2616), atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Partition
# --------------------------------------------------------------------------------------------------

def _labels(num_classes, train_per_class, test_per_class, seed=0):
    g = torch.Generator().manual_seed(seed)
    shuffled = lambda n: torch.arange(num_classes).repeat_interleave(n)[torch.randperm(num_classes * n, generator=g)]
    return shuffled(train_per_class), shuffled(test_per_class)


def _check_split(splits, y_tr, y_te, val_fraction=0.1):
    """The invariants every partition must keep; returns per-client class counts (train incl. val, test)."""
    num_classes = int(y_tr.max()) + 1
    n_tr, n_te = torch.bincount(y_tr, minlength=num_classes), torch.bincount(y_te, minlength=num_classes)
    all_tr = torch.cat([torch.cat([s.train, s.val]) for s in splits])
    all_te = torch.cat([s.test for s in splits])
    assert len(all_tr.unique()) == len(all_tr) and len(all_te.unique()) == len(all_te)  # disjoint, val included
    counts = []
    for s in splits:
        assert s.train.dtype == s.val.dtype == s.test.dtype == torch.int64
        assert s.classes == sorted(set(s.classes)) and len(s.classes) > 0
        for part, y in [(s.train, y_tr), (s.val, y_tr), (s.test, y_te)]:
            assert set(y[part].tolist()) <= set(s.classes)
        c_tr = torch.bincount(y_tr[torch.cat([s.train, s.val])], minlength=num_classes)
        c_va = torch.bincount(y_tr[s.val], minlength=num_classes)
        c_te = torch.bincount(y_te[s.test], minlength=num_classes)
        for c in s.classes:
            assert c_tr[c] - c_va[c] >= 2 and c_te[c] >= 1 and (c_va[c] >= 1 or val_fraction == 0)
            # same class proportions in train and test: each count is within one image of share * pool
            assert abs(c_tr[c] / n_tr[c] - c_te[c] / n_te[c]) <= 1 / n_tr[c] + 1 / n_te[c] + 1e-9
            assert abs(c_va[c] - val_fraction * c_tr[c]) <= 1
        counts.append((c_tr, c_te))
    return counts


@pytest.mark.parametrize("num_clients,k", [(10, 2), (50, 2), (7, 3), (4, 10), (30, 4)])
def test_pathological(num_clients, k):
    y_tr, y_te = _labels(10, 500, 100)
    splits = data.partition(y_tr, y_te, num_clients, 10, classes_per_client=k, seed=1)
    counts = _check_split(splits, y_tr, y_te)
    assert all(len(s.classes) == k for s in splits)
    usage = np.bincount([c for s in splits for c in s.classes], minlength=10)
    assert usage.max() - usage.min() <= 1  # classes used as evenly as possible
    for c in range(10):
        holders = [i for i, s in enumerate(splits) if c in s.classes]
        h = len(holders)
        for i in holders:  # weights U(0.4, 0.6) normalised: share in [0.4 / (0.4 + 0.6 (h-1)), 0.6 / (0.6 + 0.4 (h-1))]
            share = counts[i][0][c].item() / 500
            assert 0.4 / (0.4 + 0.6 * (h - 1)) - 1 / 500 <= share <= 0.6 / (0.6 + 0.4 * (h - 1)) + 1 / 500
        assert sum(counts[i][0][c].item() for i in holders) == 500  # a held class's pool is used up


@pytest.mark.parametrize("alpha,num_clients", [(0.5, 10), (0.1, 20), (100.0, 5)])
def test_dirichlet(alpha, num_clients):
    y_tr, y_te = _labels(10, 500, 100)
    splits = data.partition(y_tr, y_te, num_clients, 10, scheme="dirichlet", alpha=alpha, seed=0)
    _check_split(splits, y_tr, y_te)
    sizes = [len(s.train) for s in splits]
    if alpha == 100.0:  # nearly uniform: every client holds every class, in nearly equal amounts
        assert all(s.classes == list(range(10)) for s in splits) and max(sizes) < 1.3 * min(sizes)
    if alpha == 0.1:  # skewed: most clients hold only a few classes
        assert np.median([len(s.classes) for s in splits]) < 10


def test_tiny_dataset_clients_get_the_promised_class_mix(tiny_data_dir):
    """The run's own path (train.client_splits, cifar10's default of 2 classes per client): every client's
    train, validation and test images are of its classes only, all of them, in the same proportions."""
    import train
    ds = data.load_dataset("cifar10", str(tiny_data_dir))
    config = dict(train.DEFAULTS, batches=2, clients_per_batch=5)
    splits = train.client_splits(config, ds)
    assert len(splits) == 10 and all(len(s.classes) == 2 for s in splits)
    _check_split(splits, ds.y_train, ds.y_test)
    for s in splits:
        for part, y in [(s.train, ds.y_train), (s.val, ds.y_train), (s.test, ds.y_test)]:
            assert sorted(set(y[part].tolist())) == s.classes     # each part holds every class of the client
        share = lambda part, y: torch.bincount(y[part], minlength=10)[s.classes].float() / len(part)  # noqa: E731
        assert torch.allclose(share(s.train, ds.y_train), share(s.test, ds.y_test), atol=0.25)


def test_val_fraction_zero():
    y_tr, y_te = _labels(10, 100, 20)
    splits = data.partition(y_tr, y_te, 5, 10, val_fraction=0.0)
    assert all(len(s.val) == 0 for s in splits)
    _check_split(splits, y_tr, y_te, val_fraction=0.0)


def test_partition_is_seeded():
    y_tr, y_te = _labels(10, 200, 50)
    for scheme in ("pathological", "dirichlet"):
        a, b, c = (data.partition(y_tr, y_te, 10, 10, scheme=scheme, seed=s) for s in (3, 3, 4))
        same = lambda p, q: all(torch.equal(getattr(s, f), getattr(t, f)) for s, t in zip(p, q)
                                for f in ("train", "val", "test"))
        assert same(a, b) and [s.classes for s in a] == [s.classes for s in b]
        assert not same(a, c)


def test_too_many_clients():
    y_tr, y_te = _labels(10, 60, 20)
    with pytest.raises(data.DataError, match=r"200 clients x 2 classes .* use fewer clients") as e:
        data.partition(y_tr, y_te, 200, 10)
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="larger alpha"):
        data.partition(y_tr, y_te, 200, 10, scheme="dirichlet", alpha=0.1)


def test_assign_batches():
    batches = data.assign_batches(12, 3, seed=0)
    assert [len(b) for b in batches] == [4, 4, 4] and all(b == sorted(b) for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert batches == data.assign_batches(12, 3, seed=0) and batches != data.assign_batches(12, 3, seed=1)
    assert data.assign_batches(5, 1, seed=0) == [[0, 1, 2, 3, 4]]
    for n, t in [(10, 3), (4, 0)]:
        with pytest.raises(data.DataError):
            data.assign_batches(n, t, seed=0)


# --------------------------------------------------------------------------------------------------
# Normalisation and augmentation
# --------------------------------------------------------------------------------------------------

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_normalize():
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    out = data.normalize(x, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out[:, 1], (x[:, 1].float() / 255 - 0.4) / 0.25)


def test_augment_is_a_crop_and_flip_of_the_padded_image():
    x = torch.randint(0, 256, (1000, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = data.augment(x, MEAN, STD, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    # every output is exactly one of the 9 x 9 crops of the zero-padded image, flipped or not
    padded = data.normalize(F.pad(x, (4, 4, 4, 4)), MEAN, STD)
    crops = padded.unfold(2, 8, 1).unfold(3, 8, 1)  # (N, C, 9, 9, 8, 8): crop at every offset (dy, dx)
    hits = torch.stack([(crops == o[:, :, None, None]).all(-1).all(-1).all(1) for o in (out, out.flip(-1))], 1)
    assert (hits.flatten(1).sum(1) == 1).all(), "an output is not one crop/flip of its padded input"
    flip, dy, dx = hits.nonzero()[:, 1:].T  # sorted by image
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(9)) and set(flip.tolist()) == {0, 1}
    # the zero-offset, unflipped crop is normalize itself: a few outputs equal it (1/162 of them), most do not
    assert torch.equal(crops[:, :, 4, 4], data.normalize(x, MEAN, STD))
    same = (out == data.normalize(x, MEAN, STD)).flatten(1).all(1)
    assert torch.equal(same, hits[:, 0, 4, 4]) and 0 < same.sum() < 30


def test_augment_generator_makes_it_reproducible():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    a = data.augment(x, MEAN, STD, generator=torch.Generator().manual_seed(5))
    b = data.augment(x, MEAN, STD, generator=torch.Generator().manual_seed(5))
    c = data.augment(x, MEAN, STD, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert data.augment(x, MEAN, STD).shape == x.shape  # no generator: the global one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_augment_on_gpu_with_cpu_generator():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    cpu = data.augment(x, MEAN, STD, generator=torch.Generator().manual_seed(5))
    gpu = data.augment(x.cuda(), MEAN, STD, generator=torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu)
