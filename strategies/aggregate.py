"""Aggregation math as plain functions over named numpy arrays (no torch; Flower only for its trimmed mean).

Unit-tested against hand-computed values; strategies only choose the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

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


# ----------------------------------------------------------------------------- robust aggregation
# server.aggregation (issue 7). The coordinate-wise rules follow Flower's own strategies: the
# trimmed mean is Flower's ``trim_mean`` (FedTrimmedAvg), the median is FedMedian's np.median.


def _coordinatewise(updates: Sequence[Arrays], rule) -> dict[str, np.ndarray]:
    if not updates:
        raise ValueError("nothing to aggregate")
    out = {}
    for name, first in updates[0].items():
        if not np.issubdtype(first.dtype, np.floating):
            out[name] = first.copy()  # integer buffers: as weighted_mean
            continue
        stack = np.stack([u[name].astype(np.float64) for u in updates])
        out[name] = np.asarray(rule(stack)).astype(first.dtype)
    return out


def trimmed_mean(updates: Sequence[Arrays], beta: float) -> dict[str, np.ndarray]:
    """Per coordinate, drop the ``beta`` fraction of largest and of smallest values, average the rest
    (Yin et al. 2018; Flower's FedTrimmedAvg). Unweighted: example counts cannot buy influence."""
    return _coordinatewise(updates, lambda stack: trim_mean(stack, beta))


def coordinate_median(updates: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """Per-coordinate median (Yin et al. 2018; Flower's FedMedian). Unweighted."""
    return _coordinatewise(updates, lambda stack: np.median(stack, axis=0))


def update_norms(updates: Sequence[Arrays], reference: Arrays) -> np.ndarray:
    """L2 norm of each update's change from ``reference``, over all its floating-point tensors."""
    norms = []
    for u in updates:
        sq = sum(float(((u[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2).sum())
                 for k in u if np.issubdtype(u[k].dtype, np.floating))
        norms.append(np.sqrt(sq))
    return np.asarray(norms)


def clip_to_norm(updates: Sequence[Arrays], reference: Arrays, limit: float,
                 norms: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """Scale each update's change from ``reference`` to L2 norm at most ``limit`` (integer buffers as sent);
    ``norms`` are the changes' norms where the caller already has them."""
    out = []
    for u, norm in zip(updates, update_norms(updates, reference) if norms is None else norms):
        scale = 1.0 if norm <= limit or norm == 0 else limit / norm
        out.append({k: (reference[k].astype(np.float64) + scale * (v.astype(np.float64) - reference[k])).astype(v.dtype)
                    if np.issubdtype(v.dtype, np.floating) else v for k, v in u.items()})
    return out


def central_dp_mean(updates: Sequence[Arrays], reference: Arrays, clip: float, noise_multiplier: float,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Site-level central DP (DP-FedAvg, McMahan et al. 2018): the uniform mean of the changes clipped to
    ``clip``, plus N(0, (z clip / m)^2) on every floating-point coordinate; m = len(updates).

    Uniform weights: with example-count weights one site's share, hence the sensitivity, would be unbounded.
    """
    mean = uniform_mean(clip_to_norm(updates, reference, clip))
    std = noise_multiplier * clip / len(updates)
    return {k: (v.astype(np.float64) + rng.normal(0.0, std, v.shape)).astype(v.dtype)
            if np.issubdtype(v.dtype, np.floating) else v for k, v in mean.items()}


def clip_to_median_norm(updates: Sequence[Arrays], reference: Arrays, bound: float) -> list[dict[str, np.ndarray]]:
    """Scale each update's change so its norm is at most ``bound`` x the round's median change norm.

    One site can then move the model at most ``bound`` times as far as a typical site, whatever it sends
    (norm bounding, Sun et al. 2019). Integer buffers are left as sent.
    """
    norms = update_norms(updates, reference)
    return clip_to_norm(updates, reference, bound * float(np.median(norms)), norms)
