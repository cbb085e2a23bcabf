"""Ditto site update (Li et al., ICML 2021, arXiv 2012.04221).

Receiving w_t, the site runs two tracks:

(a) global: E epochs of SGD on F_k from w_t (FedAvg's update, same data order); w_k is uploaded;
(b) personal: s epochs of SGD on  F_k(v_k) + (lambda/2) ||v_k - w_t||^2  from the persisted
    v_k (the first received w_t the first time).

v_k (all its tensors, BN buffers included) lives only in the site state
(``extra['v']``), never in a message. Personalized evaluation uses v_k; the
global path is w. An unseen site starts v at the global w_t and runs the personal
track for ``eval.unseen_adapt_epochs`` (baselines spec, Ditto).
"""

from __future__ import annotations

import copy

from torch import nn

from client.methods.base import SiteJob, SiteObjective
from client.methods.fedprox import anchored


class DittoObjective(SiteObjective):
    def _personal(self, sj: SiteJob) -> nn.Module:
        v = copy.deepcopy(sj.model)  # holds w_t until v_k exists
        if "v" in sj.state.extra:
            v.load_state_dict(sj.state.extra["v"])
        return v

    def personal_track(self, sj: SiteJob, v: nn.Module, epochs: int | None, tag: str) -> dict[str, float]:
        """(b): SGD on F_k(v) + (lambda/2)||v - w_t||^2 from v's current weights."""
        return sj.trainer.fit(v, v.parameters(), sj.task_loss, epochs=epochs, tag=tag,
                              penalty=anchored(sj, self.cfg.lam))  # the pull acts under DP too (post-processing)

    def fit(self, sj: SiteJob) -> dict[str, float]:
        v = self._personal(sj)
        pers = self.personal_track(sj, v, self.cfg.personal_epochs, f"v{sj.job.round}")
        sj.state.extra["v"] = {k: t.detach().cpu().clone() for k, t in v.state_dict().items()}
        metrics = super().fit(sj)  # (a) the global track, exactly FedAvg's
        return {**metrics, "personal-loss": pers["loss"]}

    def personalized_model(self, sj: SiteJob) -> nn.Module:
        return self._personal(sj)

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        v = copy.deepcopy(sj.model)  # v starts at the global w_t
        self.personal_track(sj, v, epochs, f"v{sj.job.round}")
        return v
