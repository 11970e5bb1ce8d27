"""Preparing a dataset's folder for data.load_dataset (ours; not the paper's): when <data_dir>/<name> has no
train_*.npz, CIFAR is downloaded with torchvision and Tiny-ImageNet decoded from its unzipped folder, once,
and written there as train_0.npz, test.npz and classes.txt. train.py's shell calls `prepare` before a run.
"""
import contextlib
import io
import os
from pathlib import Path

import numpy as np

import data
from data import DataError


def one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def prepare(name: str, data_dir: str, download: bool = True):
    """Writes <data_dir>/<name>'s files unless they are there, then checks them (`check`); a DataError (one
    line) if it cannot."""
    if name not in data.DATASETS:
        raise DataError(f"unknown dataset '{name}': choose from {', '.join(data.DATASETS)}")
    folder = Path(data_dir) / name
    if data.train_shards(folder):
        return check(folder, data.DATASETS[name])
    if name == "tinyimagenet":
        arrays = _decode_tinyimagenet(Path(data_dir))
    else:
        if download:        # torchvision's own output is silenced: say what the wait is for
            print(f"{name}: no cache in {folder}; downloading it with torchvision (once, about 170 MB)", flush=True)
        arrays = _download_cifar(name, folder, download)
    _write_cache(folder, *arrays)


def _read_npz(path: Path, num_classes: int, image_shape=None):
    try:
        with np.load(path) as f:
            x, y = f["x"], f["y"]
    except Exception as e:  # zip, pickle, truncation and missing-key errors all look different
        raise DataError(f"cannot read {path} ({one_line(e)}): replace it, or delete the folder's *.npz to rebuild")
    if not (x.dtype == np.uint8 and x.ndim == 4 and x.shape[3] == 3 and x.shape[1] == x.shape[2] and y.dtype == np.int64
            and y.shape == (len(x),) and (image_shape is None or x.shape[1:] == image_shape)):
        raise DataError(f"{path} has x {x.dtype}{x.shape}, y {y.dtype}{y.shape}: expected x uint8 (N, H, H, 3) "
                        f"NHWC{'' if image_shape is None else f' with H={image_shape[0]}'} and y int64 (N,)")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path} has labels in [{y.min()}, {y.max()}], expected 0..{num_classes - 1}")
    return x, y


def check(folder: Path, num_classes: int):
    """Every file data.load_dataset reads is there and of the promised format, or a DataError (one line)."""
    shapes = {_read_npz(p, num_classes)[0].shape[1:] for p in data.train_shards(folder)}
    if len(shapes) > 1:
        raise DataError(f"{folder}'s train_*.npz hold images of different sizes: {sorted(shapes)}")
    if not (folder / "test.npz").exists():
        raise DataError(f"{folder} has train_*.npz but no test.npz")
    _read_npz(folder / "test.npz", num_classes, shapes.pop())
    try:
        classes = [c.strip() for c in (folder / "classes.txt").read_text().splitlines() if c.strip()]
    except OSError as e:
        raise DataError(f"cannot read {folder / 'classes.txt'}: {e.strerror or e}")
    if len(classes) != num_classes:
        raise DataError(f"{folder / 'classes.txt'} lists {len(classes)} classes, {folder.name} has {num_classes}")


def _write_cache(folder: Path, x_tr, y_tr, x_te, y_te, classes):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "classes.txt").write_text("\n".join(classes) + "\n")
        # train_0.npz last and renamed into place: its presence is what marks the cache as complete.
        for fname, x, y in [("test.npz", x_te, y_te), ("train_0.npz", x_tr, y_tr)]:
            with open(folder / f".{fname}.tmp", "wb") as f:
                np.savez(f, x=x, y=y)  # uncompressed: loads at disk speed
            os.replace(folder / f".{fname}.tmp", folder / fname)
    except OSError as e:
        raise DataError(f"cannot write the dataset cache in {folder}: {e.strerror or e}")


def _download_cifar(name: str, folder: Path, download: bool):
    import torchvision  # slow to import, and only needed the first time

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        # torchvision prints "Downloading ..." and tqdm bars: the user gets our one line instead.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train = cls(root=str(folder / "raw"), train=True, download=download)
            test = cls(root=str(folder / "raw"), train=False, download=download)
    except Exception as e:  # URLError, OSError, RuntimeError("Dataset not found or corrupted"), ...
        why = f"could not be downloaded (offline? {one_line(e)})" if download else "download is off"
        raise DataError(f"{name} not found in {folder} and {why}: put train_*.npz/test.npz/"
                        "classes.txt there (see README), or point --data-dir at a folder that has them, "
                        "e.g. --data-dir ../shared/data")
    as_arrays = lambda d: (np.ascontiguousarray(d.data, dtype=np.uint8), np.asarray(d.targets, dtype=np.int64))
    return (*as_arrays(train), *as_arrays(test), list(train.classes))


def _decode_tinyimagenet(data_dir: Path):
    from PIL import Image

    candidates = [data_dir / "tiny-imagenet-200", data_dir / "tinyimagenet" / "tiny-imagenet-200"]
    root = next((c for c in candidates if (c / "wnids.txt").exists()), None)
    if root is None:
        raise DataError(f"tinyimagenet not found: no train_*.npz in {data_dir / 'tinyimagenet'} and no "
                        f"tiny-imagenet-200/wnids.txt in {candidates[0].parent} or {candidates[1].parent}: unzip "
                        "http://cs231n.stanford.edu/tiny-imagenet-200.zip into one of them (it is not downloaded)")
    try:
        wnids = sorted((root / "wnids.txt").read_text().split())  # sorted, as torchvision's ImageFolder would
        rows = [line.split("\t") for line in (root / "val" / "val_annotations.txt").read_text().splitlines()]
        words = (root / "words.txt").read_text().splitlines() if (root / "words.txt").exists() else []
    except OSError as e:
        raise DataError(f"{root} is incomplete: {one_line(e)}")
    label = {w: i for i, w in enumerate(wnids)}
    words = {w: text.split(",")[0].strip() for w, _, text in (line.partition("\t") for line in words)}  # "goldfish"
    train = [(f, label[w]) for w in wnids for f in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    val = [(root / "val" / "images" / r[0], label[r[1]]) for r in rows if len(r) > 1 and r[1] in label]
    if len(wnids) != data.DATASETS["tinyimagenet"] or not train or not val:
        raise DataError(f"{root} has {len(wnids)} classes, {len(train)} train and {len(val)} val images: "
                        "is the folder complete?")

    def decode(pairs):
        x = np.empty((len(pairs), 64, 64, 3), dtype=np.uint8)
        for k, (f, _) in enumerate(pairs):  # a Python loop, but only once: afterwards the cache is read
            try:
                with Image.open(f) as im:
                    x[k] = np.asarray(im.convert("RGB"))  # a few Tiny-ImageNet images are greyscale
            except (OSError, ValueError) as e:
                raise DataError(f"cannot decode {f} as a 64x64 image: {one_line(e)}")
        return x, np.array([y for _, y in pairs], dtype=np.int64)

    return (*decode(train), *decode(val), [words.get(w, w) for w in wnids])
