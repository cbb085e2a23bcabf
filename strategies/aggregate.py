"""Aggregation math as plain functions over named numpy arrays (no Flower, no torch).

Unit-tested against hand-computed values; strategies only choose the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def weighted_mean(updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k (w_k / sum_j w_j) * x_k per tensor, in float64, cast back to the tensor's dtype.

    Integer tensors (BatchNorm ``num_batches_tracked``) are not averaged: the first
    update's value is taken (the baselines spec's choice).
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    if len(updates) != len(weights):
        raise ValueError("one weight per update")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    out = {}
    for name, first in updates[0].items():
        if not np.issubdtype(first.dtype, np.floating):
            out[name] = first.copy()
            continue
        acc = np.zeros(first.shape, dtype=np.float64)
        for wk, upd in zip(w, updates):
            acc += wk * upd[name].astype(np.float64)
        out[name] = acc.astype(first.dtype)
    return out


def uniform_mean(updates: Sequence[Arrays]) -> dict[str, np.ndarray]:
    return weighted_mean(updates, [1.0] * len(updates))
