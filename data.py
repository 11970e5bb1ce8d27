"""Datasets and the non-IID client partition (paper: the "experimental setup"; docs/design.md §1).

Owns four things, in reading order:
  1. load_dataset    CIFAR-10 / CIFAR-100 / Tiny-ImageNet as uint8 NCHW tensors on the device, read from
                     <data_dir>/<name>/train_*.npz, test.npz, classes.txt (shell/datasets.py writes them
                     when they are missing: CIFAR downloaded, Tiny-ImageNet decoded).
  2. partition       pFedHN's pathological split (k classes per client, shares U(0.4, 0.6)) or Dirichlet(alpha).
                     One share matrix S[c, i] splits both the train and the test pool of every class, so a
                     client's train / val / test have the same class mix (its test set is "its" distribution).
  3. assign_batches  which clients join in which onboarding batch B_0, ..., B_{T-1}.
  4. normalize, augment   crop (4-px zero padding) + horizontal flip as batched tensor ops on the device.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200}  # name -> number of classes
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "tinyimagenet": 64}  # name -> height = width in pixels
DEFAULT_CLASSES_PER_CLIENT = {"cifar10": 2, "cifar100": 10, "tinyimagenet": 20}


class DataError(Exception):
    """A one-line, user-facing problem with the data or the split (train.py prints str(e) and exits 2)."""


# --------------------------------------------------------------------------------------------------
# 1. Loading
# --------------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W) on the device
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor   # uint8 (M, C, H, W)
    y_test: torch.Tensor   # int64 (M,)
    classes: list[str]
    mean: tuple[float, float, float]  # per channel, fraction of 255, from x_train
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.x_train.shape[2]


def load_dataset(name: str, data_dir: str, device="cpu") -> Dataset:
    """<data_dir>/<name>/train_*.npz, test.npz and classes.txt as tensors on the device (the shell checks the
    files first, and writes the folder when it is missing: shell/datasets.py)."""
    folder = Path(data_dir) / name
    shards = [dict(np.load(p)) for p in train_shards(folder)]
    x_tr, y_tr = np.concatenate([s["x"] for s in shards]), np.concatenate([s["y"] for s in shards])
    with np.load(folder / "test.npz") as test:
        x_te, y_te = test["x"], test["y"]
    classes = [c.strip() for c in (folder / "classes.txt").read_text().splitlines() if c.strip()]
    mean, std = channel_stats(x_tr)
    to_nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)   # noqa: E731
    return Dataset(name, to_nchw(x_tr), torch.from_numpy(y_tr).to(device), to_nchw(x_te),
                   torch.from_numpy(y_te).to(device), classes, mean, std)


def train_shards(folder: Path) -> list[Path]:
    # (length, name) sorts train_2 before train_10, which plain string order would not.
    return sorted(folder.glob("train_*.npz"), key=lambda p: (len(p.name), p.name))


def channel_stats(x_nhwc: np.ndarray):
    """Per-channel mean and std (fractions of 255), exact, from a 256-bin histogram: no float copy of the data."""
    levels = np.arange(256) / 255
    p = np.stack([np.bincount(x_nhwc[..., ch].ravel(), minlength=256) for ch in range(3)]) / (x_nhwc.size // 3)
    mean = (p * levels).sum(1)
    std = np.sqrt((p * (levels - mean[:, None]) ** 2).sum(1))
    return tuple(mean.tolist()), tuple(std.tolist())


# --------------------------------------------------------------------------------------------------
# 2. The client partition
# --------------------------------------------------------------------------------------------------

@dataclass
class ClientSplit:
    train: torch.Tensor  # int64 indices into Dataset.x_train
    val: torch.Tensor    # int64 indices into Dataset.x_train, disjoint from every client's train and val
    test: torch.Tensor   # int64 indices into Dataset.x_test
    classes: list[int]   # the classes this client holds (sorted)


def _pathological_shares(rng, num_clients: int, num_classes: int, k: int) -> np.ndarray:
    S = np.zeros((num_classes, num_clients))
    used = np.zeros(num_classes, dtype=int)
    for i in range(num_clients):
        for _ in range(k):
            # pFedHN: pick at random among the least-used classes; unlike pFedHN, never one this client has.
            free = np.flatnonzero(S[:, i] == 0)
            least = free[used[free] == used[free].min()]
            c = rng.choice(least)
            S[c, i], used[c] = 1.0, used[c] + 1
    for c in np.flatnonzero(used):
        holders = np.flatnonzero(S[c])
        w = rng.uniform(0.4, 0.6, size=len(holders))
        S[c, holders] = w / w.sum()
    return S


def _split_counts(shares: np.ndarray, n: int) -> np.ndarray:
    # Cutting at floor(cumulative share * n) keeps every count within 1 of share * n and the total <= n.
    cuts = np.floor(np.cumsum(shares) * n + 1e-9).astype(int).clip(max=n)
    return np.diff(cuts, prepend=0)


def _val_count(m, val_fraction: float):
    # At least one validation image of every class a client holds, so its val mix matches its train mix.
    return np.where(m > 0, np.maximum(1, np.rint(val_fraction * m)), 0).astype(int) if val_fraction > 0 else 0 * m


def _drop_short_shares(S, n_tr, n_te, val_fraction):
    """Zero every share too small to give its client >= 2 train, >= 1 val and >= 1 test image of the class
    (the class's other holders split its pool instead)."""
    for c in range(S.shape[0]):
        while True:
            m, t = _split_counts(S[c], n_tr[c]), _split_counts(S[c], n_te[c])
            v = _val_count(m, val_fraction)
            bad = np.flatnonzero((S[c] > 0) & ((m - v < 2) | ((val_fraction > 0) & (v < 1)) | (t < 1)))
            if not len(bad):
                break
            S[c, bad] = 0
            S[c] = S[c] / S[c].sum() if S[c].sum() > 0 else S[c]


def shares(rng, n_tr, n_te, num_clients, scheme, classes_per_client, alpha, val_fraction):
    """The share matrix S[c, i]: client i's share of class c's images (pathological or Dirichlet)."""
    if scheme == "pathological":
        S = _pathological_shares(rng, num_clients, len(n_tr), classes_per_client)
        _drop_short_shares(S, n_tr, n_te, val_fraction)
        if np.count_nonzero(S) < num_clients * classes_per_client:
            raise DataError(f"{num_clients} clients x {classes_per_client} classes is more than the data supports "
                            "(a client would get under 2 train, 1 validation or 1 test image of a class); use fewer "
                            "clients or classes per client")
        return S
    for _ in range(100):        # small alpha can leave a client with no usable class: redraw, as FL benchmarks do
        S = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(n_tr))
        _drop_short_shares(S, n_tr, n_te, val_fraction)
        if (S.sum(axis=0) > 0).all():
            return S
    raise DataError(f"dirichlet(alpha={alpha}) left a client without a usable class in 100 draws; use fewer "
                    "clients or a larger alpha")


def partition(y_train: torch.Tensor, y_test: torch.Tensor, num_clients: int, num_classes: int, *,
              scheme: str = "pathological", classes_per_client: int = 2, alpha: float = 0.5,
              val_fraction: float = 0.1, seed: int = 0) -> list[ClientSplit]:
    """Every client's split. One share matrix cuts both the train and the test pool of every class, so a
    client's train, validation and test sets have the same class mix."""
    y_tr, y_te = y_train.cpu().numpy(), y_test.cpu().numpy()
    n_tr, n_te = (np.bincount(y, minlength=num_classes)[:num_classes] for y in (y_tr, y_te))
    rng = np.random.default_rng(seed)
    S = shares(rng, n_tr, n_te, num_clients, scheme, classes_per_client, alpha, val_fraction)
    parts = [{"train": [], "val": [], "test": []} for _ in range(num_clients)]
    for c in range(num_classes):
        pool_tr = rng.permutation(np.flatnonzero(y_tr == c))
        pool_te = rng.permutation(np.flatnonzero(y_te == c))
        cut_tr = np.cumsum(_split_counts(S[c], n_tr[c]), dtype=int)
        cut_te = np.cumsum(_split_counts(S[c], n_te[c]), dtype=int)
        for i in np.flatnonzero(S[c]):
            mine = pool_tr[(cut_tr[i - 1] if i else 0):cut_tr[i]]
            v = int(_val_count(len(mine), val_fraction))
            parts[i]["val"].append(mine[:v])
            parts[i]["train"].append(mine[v:])
            parts[i]["test"].append(pool_te[(cut_te[i - 1] if i else 0):cut_te[i]])
    # Shuffled so that any prefix of a client's split is a fair sample of its class mix.
    as_tensor = lambda chunks: torch.from_numpy(rng.permutation(np.concatenate(chunks)).astype(np.int64))  # noqa: E731
    return [ClientSplit(as_tensor(p["train"]), as_tensor(p["val"]), as_tensor(p["test"]),
                        [int(c) for c in np.flatnonzero(S[:, i])]) for i, p in enumerate(parts)]


def assign_batches(num_clients: int, num_batches: int, seed: int) -> list[list[int]]:
    if num_batches < 1 or num_clients % num_batches:
        raise DataError(f"{num_clients} clients cannot be cut into {num_batches} equal batches")
    perm = np.random.default_rng(seed).permutation(num_clients)
    return [sorted(int(i) for i in group) for group in np.split(perm, num_batches)]


# --------------------------------------------------------------------------------------------------
# 3. Normalisation and augmentation (batched, on the device)
# --------------------------------------------------------------------------------------------------

def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


def augment(x_uint8: torch.Tensor, mean, std, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with 4-px zero padding + random horizontal flip + normalize (torchvision's CIFAR recipe)."""
    (n, _, h, w), p = x_uint8.shape, 4
    draw_on = generator.device if generator is not None else x_uint8.device
    dev = x_uint8.device
    dy, dx = torch.randint(0, 2 * p + 1, (2, n, 1), generator=generator, device=draw_on).to(dev)
    flip = torch.randint(0, 2, (n, 1), generator=generator, device=draw_on).to(dev).bool()
    # Padding in uint8 before normalising pads with black, exactly like RandomCrop(32, padding=4) on a PIL image.
    padded = F.pad(x_uint8, (p, p, p, p)).permute(0, 2, 3, 1)  # (N, H+2p, W+2p, C)
    rows = dy + torch.arange(h, device=dev)                                            # (N, H)
    cols = dx + torch.where(flip, torch.arange(w - 1, -1, -1, device=dev), torch.arange(w, device=dev))  # (N, W)
    out = padded[torch.arange(n, device=dev).view(n, 1, 1), rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return normalize(out.permute(0, 3, 1, 2), mean, std)
