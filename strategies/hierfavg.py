"""HierFAVG (Liu, Zhang, Song, Letaief: "Client-Edge-Cloud Hierarchical Federated Learning", ICC 2020):
WorldLM's hierarchical baseline without personalization (spec ``worldlm.md`` section 10).

Every round each sub-federation g averages its sites' whole models (kappa1 = the local steps of one round)::

    M_g <- sum_{c in g} n_c M_c / sum_{c in g} n_c          (under g's central DP: the clipped, noised mean)

and every ``kappa2`` rounds the root averages the sub-federations::

    M <- sum_g n_g M_g / sum_g n_g,   M_g <- M for every g

A site trains and deploys its sub-federation's model M_g (unseen sites too); that is also its "global" path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kumiki import hierarchy
from strategies.aggregate import noise_rng, weighted_mean
from strategies.base import KumikiStrategy, Update
from strategies.worldlm import local_dp_config
from strategies.worldlm_tree import CentralDP, reduce


class HierFAVG(KumikiStrategy):
    def __init__(self, cfg, job, split, initial):
        super().__init__(cfg, job, split, initial)
        self.tree = hierarchy.resolve(cfg)
        self.models = {g: {k: np.array(v) for k, v in initial.items()} for g in self.tree.groups}
        self.group_n: dict[str, float] = {}
        self.group_releases = dict.fromkeys(self.tree.groups, 0)
        self._round = 0

    def group(self, site: str) -> str:
        return self.tree.group_of(site) or ""

    def payload(self, node_id: int) -> dict[str, np.ndarray]:
        return self.models[self.group(self.profiles[node_id].site)]

    def extra_config(self, node_id: int, server_round: int) -> dict:
        g = self.group_of(node_id)
        return local_dp_config(self.policy(g), self.cfg.privacy.accountant, self.cfg.privacy.reproducible_noise) if g else {}

    def policy(self, group: str):
        return self.tree.groups[group]

    def group_of(self, node_id: int) -> str:
        return self.group(self.profiles[node_id].site)

    def aggregate_train(self, server_round, replies):
        self._round = server_round
        return super().aggregate_train(server_round, replies)

    def aggregate(self, updates: list[Update]) -> None:
        for i, g in enumerate(self.tree.groups):
            mine = [u for u in updates if self.group(u.profile.site) == g]
            if not mine:
                continue
            p = self.policy(g)
            dp = CentralDP(p.dp_clip, p.dp_noise_multiplier) if p.dp == "central" else None
            w = self.weights(mine)
            rng = noise_rng(self.cfg.privacy, self.cfg.run.seed, i, self._round)  # the server's secret
            self.models[g] = reduce([u.arrays for u in mine], w, self.models[g], dp, rng)
            self.group_n[g] = float(sum(w))
            self.group_releases[g] += int(dp is not None)
        if self._round % self.cfg.method.kappa2 == 0 and self.group_n:
            gs = sorted(self.group_n)
            mean = weighted_mean([self.models[g] for g in gs], [self.group_n[g] for g in gs])
            self.models = {g: {k: v.copy() for k, v in mean.items()} for g in self.models}
        self.shared = weighted_mean([self.models[g] for g in self.models], [self.group_n.get(g, 1.0)
                                                                             for g in self.models])

    def record(self, rnd: int) -> dict[str, Any]:
        return {"root_average": rnd % self.cfg.method.kappa2 == 0}

    def server_state(self) -> dict[str, np.ndarray]:
        return {f"{g}/{k}": v for g, m in self.models.items() for k, v in m.items()}

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        for g in self.models:
            mine = {k[len(g) + 1:]: v for k, v in arrays.items() if k.startswith(f"{g}/")}
            if set(mine) != set(self.models[g]):
                raise ValueError(f"checkpoint lacks sub-federation {g}'s model (written by another method or tree)")
            self.models[g] = {k: np.array(v) for k, v in mine.items()}

    def state_dict(self):
        arrays, meta = super().state_dict()
        meta["hierfavg"] = {"group_n": self.group_n, "group_releases": self.group_releases}
        return arrays, meta

    def load_state_dict(self, arrays, meta):
        super().load_state_dict(arrays, meta)
        h = meta.get("hierfavg", {})
        self.group_n = {str(k): float(v) for k, v in h.get("group_n", {}).items()}
        self.group_releases.update({str(k): int(v) for k, v in h.get("group_releases", {}).items()})
