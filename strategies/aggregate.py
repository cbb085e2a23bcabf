"""Aggregation math as plain functions over named numpy arrays (no torch; Flower only for its trimmed mean).

Unit-tested against hand-computed values; strategies only choose the weights. Every function takes the updates
as a sequence of ``name -> array`` mappings or, on the server's hot path, as a :class:`~strategies.flat.Stack`
(the round's replies as rows read from their bytes; a K x P matrix only where a rule needs one); the math
runs over all rows at once, never tensor by tensor (``strategies/flat.py`` says why).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from strategies.flat import Stack, scaled

Arrays = Mapping[str, np.ndarray]
Updates = Sequence[Arrays] | Stack


def weighted_mean(updates: Updates, weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k (w_k / sum_j w_j) * x_k per coordinate: one weighted sum over the rows (on the server, taken in the
    same pass that reads and checks the replies; else the same row-by-row sum over the matrix, never a BLAS
    product, whose summation order depends on the CPU: ``Stack.weighted_sum``), accumulated in the rows'
    dtype (float32 for float32 models, as Flower's and PFLlib's FedAvg do; float64 for a float64 model), cast back
    to each tensor's dtype. The weights enter scaled by a power of two (exact: an
    integer example count keeps every bit) and the sum is divided by their total once at the end, so a mean
    of values a float32 holds exactly comes out exact (10 x 1 + 30 x 3 over 40 is 2.5, not 2.5000002).

    Integer tensors (BatchNorm ``num_batches_tracked``) are not averaged: the first
    update's value is taken (the baselines spec's choice).
    """
    if not len(updates):
        raise ValueError("nothing to aggregate")
    if len(updates) != len(weights):
        raise ValueError("one weight per update")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    stack = Stack.of(updates)
    return stack.unflatten(_mean_row(stack, w))


def _mean_row(stack: Stack, w: np.ndarray) -> np.ndarray:
    """The weighted mean of the stack's rows, as one row (``weighted_mean``'s arithmetic); the sum is the one
    the round's read already took where it used the same weights (``Stack.premean``)."""
    ws = scaled(w)
    w32 = ws.astype(stack.layout.dtype)
    total = stack.weighted_sum(w32)
    return np.divide(total, total.dtype.type(ws.sum()))


def weighted_sum(updates: Updates, weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k w_k x_k, weights as given (not renormalized, any sign): one matrix-vector product."""
    stack = Stack.of(updates)
    if len(stack) != len(weights):
        raise ValueError("one weight per update")
    return stack.unflatten(np.asarray(weights, dtype=np.float64).astype(stack.rows.dtype) @ stack.rows)


def uniform_mean(updates: Updates) -> dict[str, np.ndarray]:
    return weighted_mean(updates, [1.0] * len(updates))


# ----------------------------------------------------------------------------- robust aggregation
# server.aggregation (issue 7). The coordinate-wise rules follow Flower's own strategies: the
# trimmed mean is Flower's ``trim_mean`` (FedTrimmedAvg), the median is FedMedian's np.median.


def _coordinatewise(updates: Updates, rule) -> dict[str, np.ndarray]:
    """``rule`` over axis 0 of float64 column blocks of the K x P matrix (integer tensors: as weighted_mean)."""
    if not len(updates):
        raise ValueError("nothing to aggregate")
    stack = Stack.of(updates)
    out = np.empty(stack.layout.size, stack.rows.dtype)
    for cols in stack.blocks():
        out[cols] = np.asarray(rule(stack.rows[:, cols].astype(np.float64)))
    return stack.unflatten(out)


def trimmed_mean(updates: Updates, beta: float) -> dict[str, np.ndarray]:
    """Per coordinate, drop the ``beta`` fraction of largest and of smallest values, average the rest
    (Yin et al. 2018; Flower's FedTrimmedAvg). Unweighted: example counts cannot buy influence."""
    return _coordinatewise(updates, lambda stack: trim_mean(stack, beta))


def coordinate_median(updates: Updates) -> dict[str, np.ndarray]:
    """Per-coordinate median (Yin et al. 2018; Flower's FedMedian). Unweighted."""
    return _coordinatewise(updates, lambda stack: np.median(stack, axis=0))


def update_norms(updates: Updates, reference: Arrays) -> np.ndarray:
    """L2 norm of each update's change from ``reference``, over all its floating-point tensors (in float64)."""
    stack = Stack.of(updates)
    ref = stack.layout.flatten(reference).astype(np.float64)
    sq = np.zeros(len(stack))
    for cols in stack.blocks():
        d = stack.rows[:, cols] - ref[cols]  # float64 (ref is)
        sq += np.einsum("ij,ij->i", d, d)
    return np.sqrt(sq)


def clip_to_norm(updates: Updates, reference: Arrays, limit: float, norms: np.ndarray | None = None) -> Stack:
    """Scale each update's change from ``reference`` to L2 norm at most ``limit`` (integer buffers as sent);
    ``norms`` are the changes' norms where the caller already has them.

    Returns the clipped updates as a :class:`Stack` (a sequence of name -> array mappings). A ``Stack`` passed in
    is clipped in place (the server's round batch: no second K x P copy); mappings are copied first.
    """
    stack = updates if isinstance(updates, Stack) else Stack.of(updates)
    norms = update_norms(stack, reference) if norms is None else np.asarray(norms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where((norms <= limit) | (norms == 0), 1.0, limit / norms)
    rows = np.flatnonzero(scale < 1.0)
    stack._premean = None  # the rows change: a sum taken before no longer holds
    if len(rows):
        ref = stack.layout.flatten(reference).astype(np.float64)
        for cols in stack.blocks():
            block = stack.rows[rows, cols].astype(np.float64)
            stack.rows[rows, cols] = ref[cols] + scale[rows, None] * (block - ref[cols])
    return stack


def noise_rng(privacy, seed: int, *salt: int) -> np.random.Generator:
    """The server's source of central-DP noise: its own secret (the OS CSPRNG, 128 bits), never a value a site
    knows; only ``privacy.reproducible_noise`` (not private) seeds it from the run seed and ``salt``."""
    if getattr(privacy, "reproducible_noise", False):
        return np.random.default_rng([seed, 7919, *salt])
    return np.random.default_rng(secrets.randbits(128))


def joint_norms(parts: list[tuple[Updates, Arrays]], sites: list[list[str]]) -> dict[str, float]:
    """Each site's change norm over every part it sent (the shared tensors and its group's): one clip of this
    joint norm makes all the parts one Gaussian release (M-Fed's encoder and decoder), not one per part."""
    sq: dict[str, float] = {}
    for (updates, ref), names in zip(parts, sites):
        for site, nrm in zip(names, update_norms(updates, ref)):
            sq[site] = sq.get(site, 0.0) + float(nrm) ** 2
    return {s: v ** 0.5 for s, v in sq.items()}


def central_dp_mean(updates: Updates, reference: Arrays, clip: float, noise_multiplier: float,
                    rng: np.random.Generator, norms: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Site-level central DP (DP-FedAvg, McMahan et al. 2018): the uniform mean of the changes clipped to
    ``clip``, plus N(0, (z clip / m)^2) on every floating-point coordinate; m = len(updates).

    Uniform weights: with example-count weights one site's share, hence the sensitivity, would be unbounded.
    A ``Stack`` passed in is clipped in place (see :func:`clip_to_norm`). ``norms``: the norms to clip by (a
    site's joint norm over several parts, :func:`joint_norms`; default each update's own).
    """
    stack = clip_to_norm(updates, reference, clip, norms)
    std = noise_multiplier * clip / len(stack)
    mean = _mean_row(stack, np.ones(len(stack)))
    noised = (mean.astype(np.float64) + rng.normal(0.0, std, mean.shape)).astype(mean.dtype)
    return stack.unflatten(noised)


def clip_to_median_norm(updates: Updates, reference: Arrays, bound: float) -> Stack:
    """Scale each update's change so its norm is at most ``bound`` x the round's median change norm.

    One site can then move the model at most ``bound`` times as far as a typical site, whatever it sends
    (norm bounding, Sun et al. 2019). Integer buffers are left as sent; a ``Stack`` is clipped in place.
    """
    stack = updates if isinstance(updates, Stack) else Stack.of(updates)
    norms = update_norms(stack, reference)
    return clip_to_norm(stack, reference, bound * float(np.median(norms)), norms)
