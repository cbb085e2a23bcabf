"""Per-site image shifts (a factory's camera): derived from real images, labelled as derived."""

from __future__ import annotations

import numpy as np


def apply(x: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """x: (N, C, H, W) float32 in [0, 1]."""
    name, _, arg = domain.partition(":")
    if name == "identity":
        return x
    if name == "invert":
        return 1.0 - x
    if name in ("rot90", "rot180", "rot270"):
        return np.ascontiguousarray(np.rot90(x, k=int(name[3:]) // 90, axes=(2, 3)))
    if name == "rotate":
        from scipy.ndimage import rotate

        return rotate(x, float(arg), axes=(3, 2), reshape=False, order=1, mode="constant").clip(0, 1).astype(np.float32)
    if name == "contrast":
        f = float(arg)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        return ((x - mean) * f + mean).clip(0, 1).astype(np.float32)
    if name == "noise":
        return (x + rng.normal(0, float(arg), x.shape)).clip(0, 1).astype(np.float32)
    if name == "blur":
        from scipy.ndimage import uniform_filter

        return uniform_filter(x, size=(1, 1, 3, 3), mode="nearest").astype(np.float32)
    raise ValueError(f"unknown domain shift {domain!r}")
