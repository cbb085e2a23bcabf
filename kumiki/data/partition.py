"""Split one pool of labelled examples into sites: iid, Dirichlet label skew, shards, clusters."""

from __future__ import annotations

import numpy as np


def iid(y: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(len(y)), n)]


def dirichlet(y: np.ndarray, n: int, alpha: float, rng: np.random.Generator, min_size: int = 10) -> list[np.ndarray]:
    """Per class, cut its shuffled indices by Dirichlet(alpha) proportions (Hsu et al. 2019).

    Redraws (bounded) until every site has ``min_size`` examples, so no site is empty.
    """
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            break
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def shards(y: np.ndarray, n: int, classes_per_site: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological split (McMahan et al.): sort by label, cut n*k shards, deal k per site."""
    order = np.argsort(y, kind="stable")
    pieces = np.array_split(order, n * classes_per_site)
    deal = rng.permutation(len(pieces))
    return [np.sort(np.concatenate([pieces[j] for j in deal[i::n]])) for i in range(n)]


def cluster_of(site: int, clusters: int) -> int:
    """FLoRAL's assignment: cluster = site index mod C. Unseen sites continue the numbering, so they fall
    into the clusters the training sites taught."""
    return site % clusters


def shift_labels(y: np.ndarray, cluster: int, num_classes: int) -> np.ndarray:
    """Label shift: y -> (y + c) mod K, one label permutation per cluster (cluster 0 keeps the labels)."""
    return (y + cluster) % num_classes


def cluster_rotation(cluster: int, clusters: int) -> str:
    """The domain shift that turns a cluster's images by (360 / C) * c degrees. Multiples of 90 use the
    exact rot90/rot180/rot270 (no interpolation blur, and fast); cluster 0 is the identity."""
    if (4 * cluster) % clusters == 0:
        quarter = (4 * cluster // clusters) % 4
        return f"rot{90 * quarter}" if quarter else "identity"
    return f"rotate:{360 * cluster / clusters}"


def partition(y: np.ndarray, n: int, spec, rng: np.random.Generator) -> list[np.ndarray]:
    """The examples of each of ``n`` sites. ``clusters`` splits IID here; its per-cluster shift is applied
    to each site's data afterwards (``kumiki.data.images``)."""
    if spec.kind in ("iid", "clusters"):
        return iid(y, n, rng)
    if spec.kind == "dirichlet":
        return dirichlet(y, n, spec.alpha, rng)
    if spec.kind == "shards":
        return shards(y, n, spec.classes_per_site, rng)
    raise ValueError(f"unknown partition kind {spec.kind!r}")
