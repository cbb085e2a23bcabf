"""FedHB server (Kim & Hospedales, "FedHB: Hierarchical Bayesian Federated Learning",
arXiv 2305.04979, following v1 through ``../shared/methods/fedhb.md``): the NIW-diag
instantiation (spec section 5), a closed-form conjugate update of the global posterior.

Model, per coordinate k of the network parameters (spec section 5)::

    sigma_k^2 ~ IG(nu_0/2, psi_0/2),  mu_k | sigma_k^2 ~ N(mu_0k, sigma_k^2 / lambda_0),
    theta_ik | mu_k, sigma_k^2 ~ N(mu_k, sigma_k^2),   q_i(theta_i) = N(m_i, eps^2 I)

Given the N_t uploaded site weights m_i (pseudo-observations, each with extra
variance eps^2), with m_bar = (1/N_t) sum_i m_i, the global posterior
q(mu_k, sigma_k^2) = NIG(m_k, l, psi_k, nu) is::

    l     = lambda_0 + N_t
    m_k   = (lambda_0 mu_0k + sum_i m_ik) / (lambda_0 + N_t)
    nu    = nu_0 + N_t
    psi_k = psi_0 + N_t eps^2 + sum_i (m_ik - m_bar_k)^2
            + (lambda_0 N_t / (lambda_0 + N_t)) (m_bar_k - mu_0k)^2
    w_k   = E[1/sigma_k^2] = nu / psi_k

The mean is uniform over sites (not size-weighted). Stability (spec section 5,
"Stability"): ``psi0 = auto`` sets psi_0 = nu / (mu_max * n_mean) every round
(n_mean: mean train size of this round's sites), so w_k <= nu / psi_0 and the
per-sample pull w_k / n_i stays near mu_max. Before the first update
w_k = ``init_precision`` (0: round 1 is plain local training); ``fixed_precision``
freezes w_k (0: the FedAvg limit; mu': the FedProx limit, spec 13.1-13.2).

L_0 = (m, w) is the strategy's state: m is ``self.shared`` (it travels as the
model), w is ``self.precision`` and travels under the message's ``extra`` as
``precision/<tensor>``. Non-parameter float tensors (BatchNorm running
statistics, ``bn_stats = average``) get a plain uniform mean outside the Bayesian
update; integer buffers are taken from the first reply.

Not implemented (spec options): ``niw_iso``, the mixture instantiation (section 6),
``partial = cached`` (this is ``participants``), ``sample_weights`` (eps -> 0 limit only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models import build_model
from strategies.aggregate import uniform_mean
from strategies.base import KumikiStrategy, Update
from strategies.flat import Stack


@dataclass
class NIGPosterior:
    """q(mu_k, sigma_k^2) = NIG(m_k, l, psi_k, nu), per coordinate k (float64)."""

    m: dict[str, np.ndarray]
    psi: dict[str, np.ndarray]
    l: float
    nu: float

    @property
    def w(self) -> dict[str, np.ndarray]:
        """Precision w_k = E[1/sigma_k^2] = nu / psi_k."""
        return {k: self.nu / p for k, p in self.psi.items()}


def auto_psi0(nu: float, mu_max: float, n_mean: float) -> float:
    """psi_0 = nu / (mu_max * n_mean): caps w_k at mu_max * n_mean (spec section 5)."""
    return nu / (mu_max * n_mean)


def niw_diag_update(ms: Sequence[Mapping[str, np.ndarray]], lambda0: float,
                    mu0: float | Mapping[str, np.ndarray], nu0: float, psi0: float, eps: float) -> NIGPosterior:
    """The exact minimizer of the negative ELBO over L_0 given the sites' m_i (module docstring), in float64
    over column blocks of the sites' K x P matrix (``strategies/flat.py``), never tensor by tensor."""
    if not len(ms):
        raise ValueError("nothing to aggregate")
    stack = Stack.of(ms)
    lay = stack.layout
    n = len(stack)
    l, nu = lambda0 + n, nu0 + n
    shrink = lambda0 * n / (lambda0 + n)
    if isinstance(mu0, Mapping):  # per tensor, each an array of its shape or a scalar
        prior = lay.flatten({k: np.broadcast_to(np.asarray(mu0[k], dtype=np.float64), lay.shapes[i])
                             for i, k in enumerate(lay.names)}, dtype=np.float64)
    else:
        prior = np.full(lay.size, float(mu0))
    m, psi = np.empty(lay.size), np.empty(lay.size)
    for cols in stack.blocks():
        block = stack.rows[:, cols].astype(np.float64)
        m_bar = block.mean(axis=0)
        m[cols] = (lambda0 * prior[cols] + block.sum(axis=0)) / l
        psi[cols] = psi0 + n * eps**2 + ((block - m_bar) ** 2).sum(axis=0) + shrink * (m_bar - prior[cols]) ** 2
    return NIGPosterior(lay.views(m), lay.views(psi), l, nu)


class FedHB(KumikiStrategy):
    def __init__(self, cfg, job, split, initial):
        super().__init__(cfg, job, split, initial)
        h = self.method
        params = {n for n, _ in build_model(job.model, h.variant).named_parameters()}
        #: The Bayesian coordinates: every shared network parameter.
        self.coords = [k for k in self.shared if k in params]
        self.mu0 = {k: np.asarray(initial[k] if h.mu0 == "init" else h.mu0, dtype=np.float64) for k in self.coords}
        start = h.init_precision if h.fixed_precision is None else h.fixed_precision
        #: w_k, sent to the sites every round.
        self.precision = {k: np.full(initial[k].shape, start, dtype=np.float32) for k in self.coords}

    def extra_arrays(self, node_id: int, server_round: int) -> dict[str, np.ndarray]:
        return {self.method.precision_prefix + k: w for k, w in self.precision.items()}

    def server_state(self) -> dict[str, np.ndarray]:
        """What a server checkpoint needs besides ``self.shared`` (= m) to restore L_0."""
        return dict(self.extra_arrays(0, 0))

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        """The precision w of a checkpoint (a resumed server continues from the same L_0 = (m, w))."""
        prefix = self.method.precision_prefix
        want = {prefix + k for k in self.coords}
        if set(arrays) != want:
            raise ValueError(f"checkpoint precision tensors differ from this model's: {sorted(set(arrays) ^ want)[:3]}")
        for k in self.coords:
            if arrays[prefix + k].shape != self.precision[k].shape:
                raise ValueError(f"checkpoint precision {k}: shape {arrays[prefix + k].shape} != {self.precision[k].shape}")
        self.precision = {k: np.asarray(arrays[prefix + k], dtype=np.float32) for k in self.coords}

    def aggregate_shared(self, updates: list[Update]) -> dict[str, np.ndarray]:
        h = self.method
        others = [k for k in self.shared if k not in self.coords]
        plain = uniform_mean(self.part(updates, others)) if others else {}
        nu = h.nu0 + len(updates)
        n_mean = float(np.mean([u.num_examples for u in updates]))
        psi0 = auto_psi0(nu, h.mu_max, n_mean) if h.psi0 == "auto" else h.psi0
        post = niw_diag_update(self.part(updates, self.coords), h.lambda0, self.mu0, h.nu0, psi0, h.eps)
        if h.fixed_precision is None:
            self.precision = {k: w.astype(np.float32) for k, w in post.w.items()}
        return {k: (post.m[k].astype(self.shared[k].dtype) if k in post.m else plain[k]) for k in self.shared}
