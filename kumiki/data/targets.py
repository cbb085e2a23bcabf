"""Targets of each task, derived from a pooled image dataset's real images and labels.

Classification keeps the real labels. Other tasks' targets are computed from the clean images
(a foreground mask, an edge map, the clean image behind a noisy input) and every site folder that
holds them says ``"derived": true`` (``../shared/datasets.md``). For M-Fed (``../shared/methods/mfed.md``
section 3), with thresholds that suit both digits and Fashion-MNIST:

* segmentation: mask = 1[x > 0.2] of the clean image (channel mean). The spec's 0.5 cuts the dark
  garments of Fashion-MNIST in pieces: 31% of its pixels are above 0.5, 42% above 0.2, 49% non-zero;
* edges: 1[Sobel magnitude of the clean image, divided by the image's largest magnitude, > 0.3]
  (Sobel with edge-replicating borders, so the frame of the image is no edge);
* denoising: input clip(x + N(0, 0.3^2), 0, 1), target the clean x (the only task with a noisy input).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FG_THRESHOLD = 0.2
EDGE_THRESHOLD = 0.3
NOISE_STD = 0.3


def foreground(x: np.ndarray, threshold: float = FG_THRESHOLD) -> np.ndarray:
    """(N, 1, H, W) float32 0/1 mask of the pixels brighter than ``threshold``."""
    return (x.mean(axis=1, keepdims=True) > threshold).astype(np.float32)


def edge_map(x: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """(N, 1, H, W) float32 0/1 map of the pixels whose Sobel magnitude exceeds ``threshold`` x the image's largest."""
    from scipy import ndimage

    g = x.mean(axis=1).astype(np.float64)
    mag = np.hypot(ndimage.sobel(g, axis=1, mode="nearest"), ndimage.sobel(g, axis=2, mode="nearest"))
    peak = mag.reshape(len(mag), -1).max(axis=1).reshape(-1, 1, 1)
    scaled = np.divide(mag, peak, out=np.zeros_like(mag), where=peak > 0)
    return (scaled > threshold).astype(np.float32)[:, None]


def noisy(x: np.ndarray, rng: np.random.Generator, std: float = NOISE_STD) -> np.ndarray:
    return np.clip(x + rng.normal(0.0, std, x.shape), 0.0, 1.0).astype(np.float32)


#: task -> f(x, y, rng) -> (inputs, targets); x float32 (N, C, H, W) in [0, 1], y int64 labels
DERIVE: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "classification": lambda x, y, rng: (x, y),
    "segmentation": lambda x, y, rng: (x, foreground(x)),
    "edges": lambda x, y, rng: (x, edge_map(x)),
    "denoising": lambda x, y, rng: (noisy(x, rng), x.astype(np.float32)),
}


def derive(task: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A site's (inputs, targets) for ``task`` from real images ``x`` and labels ``y``."""
    if task not in DERIVE:
        raise ValueError(f"no derived targets for task {task!r} on an image dataset (known: {', '.join(DERIVE)})")
    return DERIVE[task](x, y, rng)


def is_derived(task: str) -> bool:
    return task != "classification"
