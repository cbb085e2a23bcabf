"""Offline image sources. Nothing here downloads: missing data is a clear error."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


class DataUnavailable(FileNotFoundError):
    """An optional dataset that is not installed on this machine."""


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits: 1,797 8x8 images, values scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as _ld

    x, y = _ld(return_X_y=True)
    return (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32), y.astype(np.int64)


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from the Debian package dataset-fashion-mnist; (N, 1, 28, 28) in [0, 1]."""
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.is_file() or not lab.is_file():
        raise DataUnavailable(
            f"Fashion-MNIST not found in {root} (expected {img.name}); install it with "
            "`apt-get install dataset-fashion-mnist` or set data.path / FMNIST_DIR"
        )
    x = _idx(img, 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    return x, _idx(lab, 8).astype(np.int64)


def fashion_mnist_available(root: str | Path) -> bool:
    return (Path(root) / "train-images-idx3-ubyte.gz").is_file()


SHAPES = {"digits": ((1, 8, 8), 10), "fashion-mnist": ((1, 28, 28), 10)}
#: the task every site of a pooled dataset learns unless the method assigns tasks (``kumiki/tasks.py``)
DATASET_TASK = {"digits": "classification", "fashion-mnist": "classification", "fortunes": "language",
                "shakespeare": "language", "markov": "language"}
#: the datasets of each task, as a config error names them (a method that trains only some tasks)
TASK_DATASETS = {"classification": "'digits' or 'fashion-mnist'",
                 "language": "'markov' (always installed), 'fortunes' or 'shakespeare'"}
