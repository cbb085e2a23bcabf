"""WorldLM's math as plain functions over named numpy arrays (no Flower, no torch), unit-tested by hand.

Notation (spec ``worldlm.md`` section 5). A node v (the root, or a sub-federation's server) holds a backbone
B_v, one key-layer set K_{v->g} per group g of its subtree (a sub-federation at the root, a site at a
sub-federation), and the summary Kbar_v of its key layers. One round at v, with groups g present::

    backbone   Delta = mean_c (B_c - B_v)                (n-weighted; under central DP the clipped, noised mean)
               B_v  <- OuterOpt(B_v, Delta)               (FedAvg: B_v + lr Delta; FedAdam: ours)
    key layers K_g   = sum_{c in g} n_c K_c / sum_{c in g} n_c
               R     = n-weighted mean of the K_{v->g} sent this round (the common reference)
               for each key layer l (one module's tensors):
                 e_g   = P(vec(K_g^l) - vec(R^l))                       (layer embedding of a group)
                 H     = groups present (value K_g^l, key e_g)
                         + residuals u (value R^l + r_u^l, key P(r_u^l))
                 alpha_{g,h} = softmax_{h in H}( sim(e_g, e_h) / T )
                 K_{v->g}^l <- sum_h alpha_{g,h} value_h
               groups absent this round keep K_{v->g}
    summary    Kbar_v = n-weighted mean of the K_{v->g}   (sent up; the parent derives residuals from it)

Residual layer embeddings (section 5.3): r_u = Kbar_u - mean_{u' children of the parent} Kbar_{u'}; a node
receives its siblings' residuals (those that share). P is a seeded CountSketch to ``embed_dim`` coordinates
for larger layers (identity otherwise): a sparse Johnson-Lindenstrauss projection, where a dense Gaussian
one (the spec's wording) would need embed_dim x |layer| floats, 400 MB for one of the default LM's blocks.

Limits the tests check: T -> 0 keeps every group's own K (FedPer at the node); T -> infinity without
residuals gives the uniform (not n-weighted) mean of the groups present; an empty K and FedAvg with lr 1
at a flat root is FedAvg.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from strategies.aggregate import central_dp_mean, weighted_mean

Arrays = Mapping[str, np.ndarray]


# ----------------------------------------------------------------------------------------- layer embeddings
def layers_of(names: Sequence[str], granularity: str = "layer") -> dict[str, list[str]]:
    """Key tensors grouped into layers: one module's tensors (``blocks.3.attn.qkv``: weight and bias), or
    one layer holding all of K (``granularity = "all"``)."""
    if granularity == "all":
        return {"*": list(names)} if names else {}
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
    return out


def _seed(layer: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"worldlm:{seed}:{layer}".encode()).digest()[:8], "little")


def sketch(vec: np.ndarray, dim: int, layer: str, seed: int) -> np.ndarray:
    """P(vec): a seeded CountSketch to ``dim`` coordinates (each coordinate to one bucket with a random sign);
    vectors of at most ``dim`` coordinates are returned as they are. Every node draws the same P per layer."""
    if vec.size <= dim:
        return vec
    rng = np.random.default_rng(_seed(layer, seed))
    bucket = rng.integers(0, dim, vec.size)
    sign = rng.choice((-1.0, 1.0), vec.size)
    return np.bincount(bucket, weights=sign * vec, minlength=dim)


def flat(arrays: Arrays, names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in names])


def similarity(a: np.ndarray, b: np.ndarray, kind: str = "cosine") -> float:
    """cosine (0 when either vector is zero), neg_l2 (-||a - b||) or dot_scaled (a.b / sqrt(dim))."""
    if kind == "cosine":
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))
    if kind == "neg_l2":
        return -float(np.linalg.norm(a - b))
    if kind == "dot_scaled":
        return float(a @ b / np.sqrt(max(a.size, 1)))
    raise ValueError(f"unknown similarity {kind!r}")


def attention_weights(queries: Mapping[str, np.ndarray], keys: Mapping[str, np.ndarray], temperature: float,
                      kind: str = "cosine") -> dict[str, dict[str, float]]:
    """alpha_{g,h} = softmax_h(sim(q_g, k_h) / T) for every query g over every key h (each row sums to 1)."""
    out = {}
    names = list(keys)
    for g, q in queries.items():
        s = np.array([similarity(q, keys[h], kind) for h in names]) / temperature
        w = np.exp(s - s.max())
        w /= w.sum()
        out[g] = dict(zip(names, w.tolist()))
    return out


@dataclass(frozen=True)
class AttentionOptions:
    temperature: float = 0.1
    similarity: str = "cosine"
    attn_on: str = "delta"
    granularity: str = "layer"
    embed_dim: int = 512
    seed: int = 0


def attend(groups: Mapping[str, Arrays], weights: Mapping[str, float], sent: Mapping[str, Arrays],
           residuals: Mapping[str, Arrays], names: Sequence[str],
           opts: AttentionOptions) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, dict[str, float]]]]:
    """The new K_{v->g} of every group present, and the attention weights (layer -> g -> h -> alpha).

    ``groups``: K_g (this round's mean of the group's sites); ``weights``: n_g; ``sent``: the K_{v->g} the
    groups trained from (their n-weighted mean is the reference R); ``residuals``: r_u per sibling u.
    """
    present = list(groups)
    ref = weighted_mean([sent[g] for g in present], [weights[g] for g in present])
    new: dict[str, dict[str, np.ndarray]] = {g: {} for g in present}
    alphas: dict[str, dict[str, dict[str, float]]] = {}
    for layer, tensors in layers_of(names, opts.granularity).items():
        r = flat(ref, tensors)
        values = {g: flat(groups[g], tensors) for g in present}
        if opts.attn_on == "delta":
            keys = {g: v - r for g, v in values.items()}
        else:
            keys = dict(values)
        for u, res in residuals.items():
            if all(t in res for t in tensors):
                du = flat(res, tensors)
                values[f"residual:{u}"] = r + du
                keys[f"residual:{u}"] = du if opts.attn_on == "delta" else r + du
        emb = {h: sketch(k, opts.embed_dim, layer, opts.seed) for h, k in keys.items()}
        a = attention_weights({g: emb[g] for g in present}, emb, opts.temperature, opts.similarity)
        alphas[layer] = a
        for g in present:
            mixed = sum(w * values[h] for h, w in a[g].items())
            offset = 0
            for t in tensors:
                size = groups[g][t].size
                new[g][t] = mixed[offset: offset + size].reshape(groups[g][t].shape).astype(groups[g][t].dtype)
                offset += size
    return new, alphas


def residual_embeddings(summaries: Mapping[str, Arrays], share: Mapping[str, bool]) -> dict[str, dict[str, dict]]:
    """R_v for every child v of one parent: {u: r_u} over v's siblings u that share, with
    r_u = Kbar_u - (mean of Kbar_{u'} over every child u' holding that tensor)."""
    names = sorted({n for s in summaries.values() for n in s})
    mean = {}
    for n in names:
        holders = [np.asarray(s[n], dtype=np.float64) for s in summaries.values() if n in s]
        mean[n] = sum(holders) / len(holders)
    r = {u: {n: (np.asarray(s[n], dtype=np.float64) - mean[n]).astype(np.asarray(s[n]).dtype) for n in s}
         for u, s in summaries.items()}
    return {v: {u: r[u] for u in summaries if u != v and share.get(u, True)} for v in summaries}


# ------------------------------------------------------------------------------------------------ backbone
class OuterOptimizer:
    """The node's step on the backbone: FedAvg (B + lr Delta) or FedAdam (Reddi et al. 2021; ours for WorldLM):
    m <- b1 m + (1 - b1) Delta, v <- b2 v + (1 - b2) Delta^2, B <- B + eta m / (sqrt(v) + tau)."""

    def __init__(self, kind: str = "fedavg", lr: float = 1.0, betas: Sequence[float] = (0.9, 0.99), tau: float = 1e-3):
        self.kind, self.lr, self.betas, self.tau = kind, lr, tuple(betas), tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    def step(self, params: Arrays, delta: Arrays) -> dict[str, np.ndarray]:
        self.steps += 1
        out = {}
        for k, p in params.items():
            if not np.issubdtype(p.dtype, np.floating):
                out[k] = p.copy()
                continue
            d = np.asarray(delta[k], dtype=np.float64)
            if self.kind == "fedavg":
                out[k] = (p.astype(np.float64) + self.lr * d).astype(p.dtype)
                continue
            b1, b2 = self.betas
            self.m[k] = b1 * self.m.get(k, np.zeros_like(d)) + (1 - b1) * d
            self.v[k] = b2 * self.v.get(k, np.zeros_like(d)) + (1 - b2) * d * d
            out[k] = (p.astype(np.float64) + self.lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau)).astype(p.dtype)
        return out

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"m/{k}": v for k, v in self.m.items()} | {f"v/{k}": v for k, v in self.v.items()}
        return arrays, {"steps": self.steps}

    def load(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        self.m = {k[2:]: np.array(v) for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(v) for k, v in arrays.items() if k.startswith("v/")}
        self.steps = int(meta.get("steps", 0))


@dataclass(frozen=True)
class CentralDP:
    """A sub-federation's central DP: each site's update clipped to ``clip``, noise std z * clip / m."""

    clip: float
    noise_multiplier: float


def reduce(updates: Sequence[Arrays], weights: Sequence[float], reference: Arrays, dp: CentralDP | None,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One set of sites' updates as one: their n-weighted mean, or under central DP the uniform mean of the
    changes clipped to ``dp.clip`` plus N(0, (z clip / m)^2) (DP-FedAvg, ``strategies.aggregate``)."""
    if dp is None:
        return weighted_mean(updates, weights)
    return central_dp_mean(updates, reference, dp.clip, dp.noise_multiplier, rng)


# -------------------------------------------------------------------------------------------------- a node
@dataclass
class Node:
    """One internal node of the tree (the root, or a sub-federation's server) and its state."""

    name: str
    backbone: dict[str, np.ndarray]
    keys: dict[str, dict[str, np.ndarray]]
    key_names: tuple[str, ...]
    outer: OuterOptimizer
    summary: dict[str, np.ndarray] = field(default_factory=dict)
    #: n_g of each group's last update (weights of the summary)
    group_n: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    #: central DP releases of this node so far (its epsilon follows from the count)
    releases: int = 0

    def model_for(self, group: str) -> dict[str, np.ndarray]:
        """What a site of ``group`` deploys: B_v and K_{v->g} (the summary for a group without its own K)."""
        return {**self.backbone, **self.keys.get(group, self.summary)}

    def update_summary(self) -> None:
        if self.keys:
            gs = sorted(self.keys)
            self.summary = weighted_mean([self.keys[g] for g in gs], [self.group_n.get(g, 1.0) for g in gs])

    def step(self, backbone_mean: Arrays | None, keys: Mapping[str, tuple[Arrays, float]],
             residuals: Mapping[str, Arrays], opts: AttentionOptions) -> dict:
        """One round: the outer step on B, attention on the K of the groups present, a new summary."""
        self.rounds += 1
        if backbone_mean is not None and self.backbone:
            delta = {k: np.asarray(backbone_mean[k], dtype=np.float64) - v.astype(np.float64)
                     for k, v in self.backbone.items()}
            self.backbone = self.outer.step(self.backbone, delta)
        alphas: dict = {}
        present = {g: kw for g, kw in keys.items() if g in self.keys}
        if present and self.key_names:
            new, alphas = attend({g: k for g, (k, _) in present.items()}, {g: n for g, (_, n) in present.items()},
                                 self.keys, residuals, self.key_names, opts)
            for g, k in new.items():
                self.keys[g] = k
                self.group_n[g] = float(present[g][1])
            self.update_summary()
        return alphas

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"B/{k}": v for k, v in self.backbone.items()}
        arrays |= {f"K/{g}/{k}": v for g, ks in self.keys.items() for k, v in ks.items()}
        arrays |= {f"S/{k}": v for k, v in self.summary.items()}
        opt_arrays, opt_meta = self.outer.state()
        arrays |= {f"O/{k}": v for k, v in opt_arrays.items()}
        return arrays, {"group_n": dict(self.group_n), "rounds": self.rounds, "releases": self.releases,
                        "outer": opt_meta}

    def load(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: np.array(v) for k, v in arrays.items() if k.startswith(prefix)}

        backbone = part("B/")
        if set(backbone) != set(self.backbone):
            raise ValueError(f"node {self.name}: checkpoint backbone tensors differ from this model's")
        self.backbone = backbone
        keys: dict[str, dict[str, np.ndarray]] = {}
        for k, v in part("K/").items():
            g, _, name = k.partition("/")
            keys.setdefault(g, {})[name] = v
        if set(keys) != set(self.keys):
            raise ValueError(f"node {self.name}: checkpoint groups {sorted(keys)} differ from {sorted(self.keys)}")
        self.keys = keys
        self.summary = part("S/")
        self.outer.load(part("O/"), meta.get("outer", {}))
        self.group_n = {str(k): float(v) for k, v in meta.get("group_n", {}).items()}
        self.rounds = int(meta.get("rounds", 0))
        self.releases = int(meta.get("releases", 0))
