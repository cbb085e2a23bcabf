"""FLoRAL server (Almansoori et al., CPAL 2025, arXiv 2410.03497; spec ``floral.md`` section 5).

Over the sites S that replied this round, with n_k examples and router p(c|k) = softmax(theta_k)
(reported by each site as the metrics ``pi-0 .. pi-{C-1}``: no noise, temperature or clamp):

    p(k) = n_k / sum_{j in S} n_j,   p(c) = sum_k p(k) p(c|k),   p(k|c) = p(k) p(c|k) / p(c)
    W   = sum_k p(k)   W_k                         (the base, BN statistics included)
    A_c = sum_k p(k|c) A_{c,k},  B_c = sum_k p(k|c) B_{c,k},  b_c = sum_k p(k|c) b_{c,k}

Each factor is averaged on its own; the product B_c A_c is never formed. The router theta_k is
personal by the split and never travels. The server update is replacement (the code's SGD with lr
1). When no site this round weighs adaptor c (p(c) < 1e-6), ``absent_cluster = keep`` leaves it
unchanged; ``code`` follows the official code (``get_client_cluster_probs``): its eps of 1e-10 sits only
in p(k) = n_k / (sum_j n_j + eps), and p(k|c) divides by p(c) without one, so the eps cancels and
adaptor c is the p(k|c)-weighted mean (weights summing to 1) however small p(c) is. Where p(c) is exactly
0 (every router underflowed to 0 for c) the code's 0/0 would make the adaptor NaN; both rules keep it.
"""

from __future__ import annotations

import math
import re

import numpy as np

from strategies.aggregate import weighted_mean, weighted_sum
from strategies.flat import Stack
from strategies.base import KumikiStrategy, Update
from strategies.replies import BadReply

ABSENT = 1e-6
CODE_EPS = 1e-10  # the official code's eps, on sum_k n_k only


def cluster_weights(num_examples: list[float], pis: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p(k), p(c), p(k|c) as a K x C matrix) from the sites' example counts and routers."""
    n = np.asarray(num_examples, dtype=np.float64)
    pi = np.asarray(pis, dtype=np.float64)
    pk = n / n.sum()
    pc = pk @ pi
    joint = pk[:, None] * pi
    with np.errstate(invalid="ignore", divide="ignore"):
        pkc = np.where(pc > 0, joint / np.where(pc > 0, pc, 1.0), 0.0)
    return pk, pc, pkc


def router_of(metrics: dict[str, float], c: int) -> list[float]:
    """A site's reported p(.|k): C finite probabilities summing to 1, or BadReply."""
    try:
        pi = [metrics[f"train-pi-{i}"] for i in range(c)]
    except KeyError:
        raise BadReply(f"reply lacks its router metrics train-pi-0..{c - 1}") from None
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in pi) or abs(sum(pi) - 1.0) > 1e-4:
        raise BadReply(f"router metrics are not a probability vector over {c} adaptors: {pi}")
    return pi


class FLoRAL(KumikiStrategy):
    def __init__(self, cfg, job, split, initial):
        super().__init__(cfg, job, split, initial)
        cluster = re.compile(rf"^{re.escape(self.method.cluster_prefix)}\.(\d+)\.")
        self.cluster_of = {k: int(m.group(1)) for k in self.shared if (m := cluster.match(k))}

    def parse_update(self, reply, expected):
        update = super().parse_update(reply, expected)
        router_of(update.metrics, self.method.num_adaptors)  # reject before it can weigh anything
        return update

    def aggregate_shared(self, updates: list[Update]) -> dict[str, np.ndarray]:
        c = self.method.num_adaptors
        return floral_mean([u.arrays for u in updates], [u.num_examples for u in updates],
                           [router_of(u.metrics, c) for u in updates], self.cluster_of, self.shared,
                           self.method.absent_cluster)


def floral_mean(arrays: list[dict[str, np.ndarray]], num_examples: list[float], pis: list[list[float]],
                cluster_of: dict[str, int], previous: dict[str, np.ndarray], absent: str = "keep") -> dict[str, np.ndarray]:
    """The module docstring's rule: tensors in ``cluster_of`` with p(k|c) of their cluster, the rest with p(k)
    (each a single matrix-vector product over the sites' rows; ``strategies/flat.py``)."""
    pk, pc, pkc = cluster_weights(num_examples, pis)
    stack = Stack.of(arrays)
    rows = range(len(stack))
    base = [k for k in previous if k not in cluster_of]
    out = weighted_mean(stack.take(rows, base), pk) if base else {}
    for j in range(len(pc)):
        names = [k for k, cj in cluster_of.items() if cj == j]
        if not names:
            continue
        if (absent == "keep" and pc[j] < ABSENT) or pc[j] == 0.0:
            out.update({k: previous[k] for k in names})
            continue
        if absent == "keep":
            w = pkc[:, j]
        else:  # the code's arithmetic: eps on sum n_k only, p(c) from those p(k), no eps dividing by it
            n = np.asarray(num_examples, dtype=np.float64)
            joint = n / (n.sum() + CODE_EPS) * np.asarray(pis, dtype=np.float64)[:, j]
            w = joint / joint.sum()
        out.update(weighted_sum(stack.take(rows, names), w))
    return out
