"""WorldLM (Iacob, Sani, Marino, Aleksandrov, Shen, Lane: "Worldwide Federated Training of Language Models",
arXiv 2405.14446), following the reconstruction ``../shared/methods/worldlm.md``.

The tree (``kumiki/hierarchy.py``): the root, its sub-federations g, their sites c. Every internal node v
keeps a backbone B_v and one key-layer set K_{v->g} per group of its subtree (the math, with its equations:
``strategies/worldlm_tree.py``). Levels train in sequence (spec 5.1):

* **root phase**, rounds 1..R_0: the root is the server of every site; its groups are the sub-federations.
  A sub-federation's sites are first reduced to one update under its own policy (n-weighted mean, or its
  central DP), then Delta = sum_g n_g (B_g - B_root) / sum_g n_g, B_root <- OuterOpt(B_root, Delta), and the
  K_g are attention-aggregated into K_{root->g}.
* **sub-federation phase**, then R_g rounds per sub-federation g (in lockstep, each with its own policy):
  B_g <- B_root and K_{g->c} <- K_{root->g} at the start; then g is the server of its sites, every site is
  its own group (per-site key layers), and the residual layer embeddings of g's siblings join g's attention.
  After each round the root recomputes the residuals from the sub-federations' summaries Kbar_g
  (``method.residual_refresh``).

A site receives exactly B of the node running its phase and its own group's K (``payload``); an evaluation
message also carries the node's summary Kbar under ``extra`` (the site's "global" path, B + Kbar). Unseen
sites get B + Kbar of their sub-federation (zero-shot). Sub-federation policy: ``rounds``, ``key_layers``,
``fraction_train``, ``share_residuals`` and DP (``central``: the node clips each site's change to
``dp_clip`` and adds N(0, (z dp_clip / m)^2), a whole site being the unit, with its own RDP ledger and
budget; ``local``: its sites train with DP-SGD, through their own persistent ledger).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from kumiki import contract as C
from kumiki import hierarchy
from kumiki.accounting import epsilon
from kumiki.config import PrivacySection
from kumiki.split import EVERY_GROUP, ParamSplit, SplitRules
from strategies.aggregate import clip_to_norm, noise_rng, update_norms, weighted_mean
from strategies.base import KumikiStrategy, Update
from strategies.worldlm_tree import (AttentionOptions, CentralDP, Node, OuterOptimizer, reduce,
                                     residual_embeddings)

log = logging.getLogger("kumiki.server")
ROOT = "root"


def key_names(names: Iterable[str], patterns: Iterable[str]) -> tuple[str, ...]:
    """The tensors the patterns claim as key layers (ParamSplit: K is the ``EVERY_GROUP`` group)."""
    patterns = tuple(patterns)
    if not patterns:
        return ()
    split = ParamSplit.build(list(names), SplitRules(shared=("*",), groups={EVERY_GROUP: patterns}))
    return split.groups.get(EVERY_GROUP, ())


def local_dp_config(policy, accountant: str, reproducible_noise: bool = False) -> dict:
    """A sub-federation with local DP: its sites' messages carry its privacy policy in place of ``[privacy]``
    (DP-SGD through each site's own persistent ledger, ``client/privacy.py``)."""
    if policy.dp != "local":
        return {}
    priv = PrivacySection(enabled=True, target_epsilon=policy.dp_target_epsilon, delta=policy.dp_delta,
                          max_grad_norm=policy.dp_clip, noise_multiplier=policy.dp_noise_multiplier,
                          accountant=accountant, reproducible_noise=reproducible_noise)
    return {C._PRIVACY: priv.model_dump_json()}


class WorldLM(KumikiStrategy):
    """The whole tree in one strategy (deployment shape (a): one SuperLink, sub-federations as site groups)."""

    def __init__(self, cfg, job, split, initial):
        super().__init__(cfg, job, split, initial)
        m = cfg.method
        self.tree = hierarchy.resolve(cfg)
        self.template = {k: np.asarray(v) for k, v in initial.items()}
        self.group_arrays = {}  # the nodes below hold every K; the base's single group copy is not used
        self.opts = AttentionOptions(m.temperature, m.similarity, m.attn_on, m.attn_granularity, m.embed_dim,
                                     cfg.run.seed)
        self.root_keys = key_names(initial, m.keys())
        for g, p in self.tree.groups.items():
            if p.key_layers is not None and p.key_layers and not key_names(initial, p.key_layers):
                raise ValueError(f"federation.groups[{g}].key_layers {p.key_layers} match no tensor of the model")
        self.root = self._node(ROOT, initial, self.root_keys, list(self.tree.groups))
        self.shared = self.root.backbone
        self.regions: dict[str, Node] = {}
        #: R_v: sub-federation -> {sibling u: r_u}
        self.residuals: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        #: central DP releases per sub-federation (its epsilon follows from the count)
        self.group_releases: dict[str, int] = dict.fromkeys(self.tree.groups, 0)
        #: sub-federations whose central DP budget is spent (round it happened)
        self.group_budget_spent: dict[str, int] = {}
        self._round = 0
        self._for_eval = False
        self.last_alphas: dict[str, Any] = {}

    # ------------------------------------------------------------------ the tree
    def _node(self, name: str, model: dict[str, np.ndarray], keys: tuple[str, ...], groups: list[str]) -> Node:
        m = self.cfg.method
        outer = OuterOptimizer(m.outer_optimizer, m.server_lr if m.outer_optimizer == "fedavg" else m.adam_lr,
                               m.adam_betas, m.adam_tau)
        node = Node(name, {k: np.array(v) for k, v in model.items() if k not in keys},
                    {g: {k: np.array(model[k]) for k in keys} for g in groups}, keys, outer)
        node.update_summary()
        return node

    def phase(self, rnd: int) -> tuple[int, int]:
        """(0, round of the root phase) or (1, round of the sub-federations' phase)."""
        r0 = self.tree.root_rounds
        return (0, rnd) if rnd <= r0 else (1, rnd - r0)

    def group_of(self, node_id: int) -> str:
        return self.tree.group_of(self.profiles[node_id].site) or ""

    def policy(self, group: str):
        return self.tree.groups[group]

    def phase_keys(self, group: str, phase: int) -> tuple[str, ...]:
        """The key layers ``group``'s sites send in ``phase`` (0: the root's, 1: the group's own policy)."""
        p = self.policy(group)
        return key_names(self.template, p.key_layers) if phase == 1 and p.key_layers is not None else self.root_keys

    def releases_per_round(self, group: str, phase: int) -> int:
        """Central DP: the Gaussian releases of one round of ``group`` in ``phase``: the backbone (when it has a
        tensor) and, under ``dp_cover_k``, the key layers (when there are any), each clipped and noised on its
        own. A flat tree without key layers (FedAvg as WorldLM) releases once a round, not twice."""
        keys = self.phase_keys(group, phase)
        backbone = any(k not in keys for k in self.template)
        return int(backbone) + int(bool(keys) and self.policy(group).dp_cover_k)

    def _start_regions(self) -> None:
        """Phase 1 starts from the root's end state: B_g <- B_root, K_{g->c} <- K_{root->g} (spec 5.1)."""
        names = hierarchy.site_names(self.cfg)
        trained = set(names[: self.cfg.data.sites]) if names else {q.site for q in self.profiles.values()
                                                                  if q.role == "train"}
        for g, p in self.tree.groups.items():
            self.regions[g] = self._node(g, self.root.model_for(g), self.phase_keys(g, 1),
                                         [s for s in p.sites if s in trained])
        self._refresh_residuals()
        log.info("worldlm: root phase done after %d rounds; %d sub-federations train on their own",
                 self.tree.root_rounds, len(self.regions))

    def _refresh_residuals(self) -> None:
        m = self.cfg.method
        if not m.use_residuals or not self.regions:
            self.residuals = {g: {} for g in self.regions}
            return
        self.residuals = residual_embeddings({g: n.summary for g, n in self.regions.items()},
                                             {g: self.policy(g).share_residuals for g in self.regions})

    def _ensure_phase(self, rnd: int) -> None:
        if self.phase(rnd)[0] == 1 and not self.regions:
            self._start_regions()

    # ------------------------------------------------------------------ sites
    def discover(self, grid: Grid, expected: int, timeout: float):
        super().discover(grid, expected, timeout)
        self._check_groups()
        return self.profiles

    def refresh(self, grid: Grid, server_round: int) -> None:
        super().refresh(grid, server_round)
        self._check_groups()

    def _check_groups(self) -> None:
        """A site outside the tree, or one whose node config names another sub-federation, is refused: its
        updates must never reach a sub-federation it does not belong to."""
        for nid, p in list(self.profiles.items()):
            tree_group = self.tree.group_of(p.site)
            reason = None
            if tree_group is None:
                reason = f"site {p.site} is in no sub-federation of [federation]"
            elif p.group and p.group != tree_group:
                reason = f"site {p.site} says it is in sub-federation {p.group!r}, the config puts it in {tree_group!r}"
            if reason:
                log.error("node %s dropped at discovery: %s", nid, reason)
                self.discovery_rejected.append({"node": nid, "site": p.site, "reason": reason})
                self._refused.add(nid)
                del self.profiles[nid]
        if not self.train_nodes():
            raise RuntimeError("no training site of the federation tree answered; nothing to train")

    def active(self, group: str, rnd: int) -> bool:
        """Whether ``group``'s sites train in round ``rnd`` (its phase is running and its budget is left)."""
        if group in self.group_budget_spent:
            return False
        phase, k = self.phase(rnd)
        return phase == 0 or k <= self.tree.rounds[group]

    def train_nodes(self) -> list[int]:
        return [n for n in super().train_nodes() if self.active(self.group_of(n), self._round or 1)]

    def sample(self, nodes: list[int]) -> list[int]:
        """Each node samples its own sites: the root with ``server.fraction_train``, a sub-federation with its own."""
        if self.phase(self._round)[0] == 0:
            return super().sample(nodes)
        out = []
        for g in self.tree.groups:
            mine = [n for n in nodes if self.group_of(n) == g]
            frac = self.policy(g).fraction_train or self.cfg.server.fraction_train
            k = max(1, math.ceil(frac * len(mine))) if mine else 0
            out += sorted(self._rng.sample(mine, k)) if k < len(mine) else mine
        return sorted(out)

    # ------------------------------------------------------------------ messages
    def payload(self, node_id: int) -> dict[str, np.ndarray]:
        """B of the node running the site's phase and the site's own K (unseen sites: the node's summary)."""
        p, g = self.profiles[node_id], self.group_of(node_id)
        if self.phase(self._round or 1)[0] == 0:
            return self.root.model_for(g)
        node = self.regions[g]
        if p.role == "train" and p.site not in node.keys and node.key_names:  # a site the phase start did not know
            node.keys[p.site] = {k: v.copy() for k, v in node.summary.items()}
        return node.model_for(p.site if p.role == "train" else "")

    def extra_arrays(self, node_id: int, server_round: int) -> dict[str, np.ndarray]:
        """Evaluation of a training site: the node's summary Kbar (its "global" path is B + Kbar)."""
        if not self._for_eval or self.profiles[node_id].role != "train":
            return {}
        return self.kbar(self.root if self.phase(self._round)[0] == 0 else self.regions[self.group_of(node_id)])

    def kbar(self, node: Node) -> dict[str, np.ndarray]:
        return {f"{self.cfg.method.kbar_prefix}{k}": v for k, v in node.summary.items()}

    def extra_config(self, node_id: int, server_round: int) -> dict:
        g = self.group_of(node_id)
        return local_dp_config(self.policy(g), self.cfg.privacy.accountant, self.cfg.privacy.reproducible_noise) if g else {}

    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid, evaluate: int | None = None) -> Iterable[Message]:
        self._round = server_round
        self._ensure_phase(server_round)
        self._spend_budgets(server_round)
        return super().configure_train(server_round, arrays, config, grid, evaluate)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                           grid: Grid, skip=(), only=None) -> Iterable[Message]:
        self._round, self._for_eval = server_round, True
        try:
            return super().configure_evaluate(server_round, arrays, config, grid, skip, only)
        finally:
            self._for_eval = False

    def reference_arrays(self) -> dict[str, np.ndarray]:
        return self.template

    # ------------------------------------------------------------------ aggregation
    def leaf_weight(self, u: Update) -> float:
        """n_c = tokens the site trained on this round (``train-tokens``), capped at the most one round can see
        (tau x batch x context, or one pass over its announced data); a reply without it counts its examples."""
        m, t = self.cfg.method, self.cfg.train
        context = int(self.job.model.input_shape[0])
        seqs = m.local_steps * t.batch_size if m.local_steps else u.profile.num_train * t.local_epochs
        tokens = u.metrics.get("train-tokens")
        if tokens is not None and math.isfinite(tokens) and tokens > 0:
            return float(min(tokens, seqs * context))
        return float(u.num_examples)

    def weights(self, updates: list[Update]) -> list[float]:
        return [self.leaf_weight(u) for u in updates]

    def central(self, group: str) -> CentralDP | None:
        p = self.policy(group)
        return CentralDP(p.dp_clip, p.dp_noise_multiplier) if p.dp == "central" else None

    def _bounded(self, updates: list[Update], sent: list[dict[str, np.ndarray]]) -> list[Update]:
        """``server.aggregation = "norm_bound"``: each update's change from what its site was sent, capped at
        norm_bound x the median change of the round."""
        if self.cfg.server.aggregation != "norm_bound" or not updates:
            return updates
        norms = np.array([update_norms([u.arrays], ref)[0] for u, ref in zip(updates, sent)])
        limit = self.cfg.server.norm_bound * float(np.median(norms))
        return [Update(u.profile, clip_to_norm([u.arrays], ref, limit, np.array([nrm]))[0], u.num_examples, u.metrics)
                for u, ref, nrm in zip(updates, sent, norms)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self._round = server_round
        return super().aggregate_train(server_round, replies)

    def _dp_rng(self, salt: int) -> np.random.Generator:
        return noise_rng(self.cfg.privacy, self.cfg.run.seed, salt, self._round)  # the server's secret

    def aggregate(self, updates: list[Update]) -> None:
        if self.phase(self._round)[0] == 0:
            self._aggregate_root(updates)
        else:
            self._aggregate_regions(updates)
        self.shared = self.root.backbone

    def _aggregate_root(self, updates: list[Update]) -> None:
        node = self.root
        updates = self._bounded(updates, [node.model_for(self.tree.group_of(u.profile.site)) for u in updates])
        b_means, k_means, ns = [], {}, []
        for g in self.tree.groups:
            mine = [u for u in updates if self.tree.group_of(u.profile.site) == g]
            if not mine:
                continue
            b, k, n = self._reduce_group(g, mine, node.backbone, node.keys[g], salt=len(b_means))
            b_means.append(b)
            ns.append(n)
            k_means[g] = (k, n)
        backbone = weighted_mean(b_means, ns) if b_means else None
        self.last_alphas = {ROOT: node.step(backbone, k_means, {}, self.opts)}

    def _reduce_group(self, g: str, ups: list[Update], ref_b, ref_k, salt: int):
        """A sub-federation's sites as one update (B_g, K_g, n_g), under its own DP policy."""
        dp, w = self.central(g), self.weights(ups)
        rng = self._dp_rng(salt)
        b = reduce([{k: u.arrays[k] for k in ref_b} for u in ups], w, ref_b, dp, rng)
        k = reduce([{n: u.arrays[n] for n in ref_k} for u in ups], w, ref_k,
                   dp if dp and self.policy(g).dp_cover_k else None, rng) if ref_k else {}
        if dp is not None:
            self.group_releases[g] += int(bool(ref_b)) + int(bool(ref_k) and self.policy(g).dp_cover_k)
        return b, k, float(sum(w))

    def _aggregate_regions(self, updates: list[Update]) -> None:
        alphas = {}
        for i, (g, node) in enumerate(self.regions.items()):
            mine = [u for u in updates if self.tree.group_of(u.profile.site) == g and u.profile.site in node.keys]
            if not mine:
                continue
            mine = self._bounded(mine, [node.model_for(u.profile.site) for u in mine])
            dp, w = self.central(g), self.weights(mine)
            rng = self._dp_rng(1000 + i)
            b = reduce([{k: u.arrays[k] for k in node.backbone} for u in mine], w, node.backbone, dp, rng)
            cover = dp if dp and self.policy(g).dp_cover_k else None
            keys = {u.profile.site: (reduce([{k: u.arrays[k] for k in node.key_names}], [wu],
                                            node.keys[u.profile.site], cover, rng), wu)
                    for u, wu in zip(mine, w)} if node.key_names else {}
            if dp is not None:
                self.group_releases[g] += int(bool(node.backbone)) + int(bool(node.key_names) and cover is not None)
            alphas[g] = node.step(b, keys, self.residuals.get(g, {}), self.opts)
        self.last_alphas = alphas
        if self.cfg.method.residual_refresh == "per_round":
            self._refresh_residuals()

    # ------------------------------------------------------------------ privacy of sub-federations
    def group_epsilon(self, g: str, releases: int | None = None) -> float:
        p = self.policy(g)
        n = self.group_releases.get(g, 0) if releases is None else releases
        return epsilon(self.cfg.privacy.accountant, [(p.dp_noise_multiplier, 1.0, n)] if n else [], p.dp_delta)

    def _spend_budgets(self, rnd: int) -> None:
        """A central-DP sub-federation whose next round would exceed its budget stops training (its sites keep
        evaluating the model they have)."""
        for g, p in self.tree.groups.items():
            if p.dp != "central" or g in self.group_budget_spent:
                continue
            nxt = self.group_releases[g] + self.releases_per_round(g, self.phase(rnd)[0])
            if self.group_epsilon(g, nxt) > p.dp_target_epsilon:
                log.warning("round %d: sub-federation %s stops training: another release would take its epsilon "
                            "from %.3f to %.3f > %g", rnd, g, self.group_epsilon(g), self.group_epsilon(g, nxt),
                            p.dp_target_epsilon)
                self.group_budget_spent[g] = rnd

    def _central_covers(self, g: str) -> str:
        if not (self.phase_keys(g, 0) or self.phase_keys(g, 1)):
            return "everything each site sends (no key layers: one release a round)"
        if self.policy(g).dp_cover_k:
            return ("the backbone and the key layers each site sends, each clipped and noised on its own (a release "
                    "each a round: releases_per_round)")
        return ("the backbone only: the key layers (and the residuals built from them) travel WITHOUT noise, outside "
                "epsilon (dp_cover_k = false)")

    def privacy_record(self) -> dict | None:
        out = {}
        for g, p in self.tree.groups.items():
            if p.dp == "central":
                out[g] = {"mode": "central", "epsilon": self.group_epsilon(g), "releases": self.group_releases[g],
                          "target_epsilon": p.dp_target_epsilon, "delta": p.dp_delta, "clip": p.dp_clip,
                          "noise_multiplier": p.dp_noise_multiplier, "cover_k": p.dp_cover_k,
                          "stopped_at_round": self.group_budget_spent.get(g), "unit": "one site (all its records)",
                          "releases_per_round": {"root": self.releases_per_round(g, 0),
                                                 "own": self.releases_per_round(g, 1)},
                          "covers": self._central_covers(g)}
            elif p.dp == "local":
                out[g] = {"mode": "local", "target_epsilon": p.dp_target_epsilon, "delta": p.dp_delta,
                          "max_grad_norm": p.dp_clip, "noise_multiplier": p.dp_noise_multiplier,
                          "unit": "one record of a site (each site's ledger: privacy.epsilon_per_site)",
                          "covers": "everything its sites send: every tensor trained by DP-SGD (tau steps a round "
                                    "planned), no training-split metric (train-tokens is the planned count)"}
        return out or None

    def record(self, rnd: int) -> dict:
        phase, k = self.phase(rnd)
        out: dict[str, Any] = {"phase": "root" if phase == 0 else "sub-federations", "phase_round": k}
        eps = {g: self.group_epsilon(g) for g, p in self.tree.groups.items() if p.dp == "central"}
        if eps:
            out["group_epsilon"] = eps
        if self.last_alphas:
            out["attention"] = _alpha_summary(self.last_alphas)
        return out

    # ------------------------------------------------------------------ resume
    def server_state(self) -> dict[str, np.ndarray]:
        """Every node's tensors (``root/...``, ``region/<g>/...``: the deployable models of the whole tree, also in
        ``checkpoints/global.npz``) and the residuals (``res/<v>/<u>/...``)."""
        arrays = {f"root/{k}": v for k, v in self.root.state()[0].items()}
        for g, node in self.regions.items():
            arrays.update({f"region/{g}/{k}": v for k, v in node.state()[0].items()})
        for v, res in self.residuals.items():
            for u, arrs in res.items():
                arrays.update({f"res/{v}/{u}/{k}": a for k, a in arrs.items()})
        return arrays

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = super().state_dict()
        meta["worldlm"] = {"root": self.root.state()[1],
                           "regions": {g: {"meta": n.state()[1], "groups": sorted(n.keys), "keys": list(n.key_names)}
                                       for g, n in self.regions.items()},
                           "residuals": {v: sorted(r) for v, r in self.residuals.items()},
                           "group_releases": dict(self.group_releases),
                           "group_budget_spent": dict(self.group_budget_spent)}
        return arrays, meta

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        self._loaded = arrays  # restored with the JSON side in load_state_dict

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        wl = meta.get("worldlm")
        if wl is None:
            raise ValueError("the checkpoint holds no WorldLM tree state: it was written by another method")
        super().load_state_dict(arrays, meta)
        server = self._loaded

        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in server.items() if k.startswith(prefix)}

        self.root.load(part("root/"), wl["root"])
        self.regions = {}
        for g, info in wl["regions"].items():
            node = self._node(g, self.template, tuple(info["keys"]), list(info["groups"]))
            node.load(part(f"region/{g}/"), info["meta"])
            self.regions[g] = node
        self.residuals = {v: {u: part(f"res/{v}/{u}/") for u in us} for v, us in wl["residuals"].items()}
        self.group_releases = {g: int(wl["group_releases"].get(g, 0)) for g in self.tree.groups}
        self.group_budget_spent = {str(k): int(x) for k, x in wl.get("group_budget_spent", {}).items()}
        self.shared = self.root.backbone

    def summary(self) -> None:
        log.info("WorldLM: %d sub-federations (%s); root phase %d rounds, then %s; %d key tensors at the root",
                 len(self.tree.groups), ", ".join(self.tree.groups), self.tree.root_rounds,
                 ", ".join(f"{g} {r}" for g, r in self.tree.rounds.items()), len(self.root_keys))


def _alpha_summary(alphas: dict) -> dict:
    """A round's attention, compact: per node, each group's weight on its own K and on the siblings' residuals
    (means over key layers)."""
    own, res = {}, {}
    for node, layers in alphas.items():
        mine: dict[str, list[float]] = {}
        onres: list[float] = []
        for a in layers.values():
            for g, row in a.items():
                mine.setdefault(g, []).append(row.get(g, 0.0))
                onres.append(sum(w for h, w in row.items() if h.startswith("residual:")))
        own[node] = {g: round(float(np.mean(v)), 4) for g, v in mine.items()}
        res[node] = round(float(np.mean(onres)), 4) if onres else 0.0
    return {"self_weight": own, "residual_weight": res}
