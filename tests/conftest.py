"""Shared test helpers: a tiny, learnable synthetic dataset in the prepared-cache format data.py reads."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import data` from any working directory


def make_tiny_dataset(root, name="cifar10", num_classes=10, train_per_class=60, test_per_class=20, size=32, seed=0):
    """Write <root>/<name>/{train_0,train_1,test}.npz + classes.txt; return root.

    Each class is a fixed, smooth random colour pattern (a 3x3 grid of colours around a class colour,
    bilinearly upsampled) plus pixel noise: a small CNN separates the classes in a few dozen steps (about
    0.8-1.0 test accuracy after 40 SGD steps with crop+flip), and crops and flips keep most of the signal.
    """
    rng = np.random.default_rng(seed)
    # a class's own mean colour (what a pooled CNN picks up first) plus a coarse 3x3 colour pattern
    grid = 0.6 * rng.uniform(0, 255, (num_classes, 1, 1, 3)) + 0.4 * rng.uniform(0, 255, (num_classes, 3, 3, 3))
    grid = torch.from_numpy(grid).permute(0, 3, 1, 2)
    templates = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True).permute(0, 2, 3, 1).numpy()

    def sample(per_class):
        y = rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)
        x = templates[y] + rng.normal(0, 20, size=(len(y), size, size, 3))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y

    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    x, y = sample(train_per_class)
    half = len(y) // 2  # two shards, so the concatenation path is exercised
    np.savez(folder / "train_0.npz", x=x[:half], y=y[:half])
    np.savez(folder / "train_1.npz", x=x[half:], y=y[half:])
    np.savez(folder / "test.npz", **dict(zip("xy", sample(test_per_class))))
    (folder / "classes.txt").write_text("".join(f"class{c}\n" for c in range(num_classes)))
    return Path(root)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A data root holding a tiny cifar10 cache (10 classes, 60 train + 20 test images each, 32x32)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def counts_of_test_images(accuracy, test_sizes):
    """Each accuracy is a count of a client's test images over their number: right, not merely in [0, 1]
    (a loss, a NaN or a share of the wrong split fails)."""
    return all(a is not None and a == a and abs(a * n - round(a * n)) < 1e-6 and 0 <= round(a * n) <= n
               for a, n in zip(accuracy, test_sizes) if a is not None)
