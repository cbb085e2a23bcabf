"""WorldLM in deployment shape (b): every sub-federation runs its own SuperLink, bridged to the root.

The same math as shape (a) (``strategies/worldlm.py``), split between two servers:

* ``BridgedRoot`` is the root's ServerApp. Its nodes are the sub-federations' aggregators (one SuperNode each
  on the root's SuperLink, named after its sub-federation); it never talks to a site. Root phase: it sends
  B_root and K_{root->g} to aggregator g and gets back g's reduced update (B_g, K_g, n_g), already under g's
  own DP policy, then steps exactly as shape (a)'s root. Sub-federation phase: it sends g its siblings'
  residual embeddings R_g (under ``extra``, ``res/<sibling>/<tensor>``; the full root model once, in the
  phase's first round) and gets back g's summary Kbar_g, from which it derives the next residuals. Only
  summaries and residuals cross between sub-federations.
* ``RegionServer`` is a sub-federation's ServerApp, one job per root message (``server/region.py``): it is
  the node of shape (a) for its own sites only (their updates, its DP, its per-site key layers, its state on
  its own disk), and answers the root with the reduced update or the summary.

With the same config and seed, both shapes compute the same models (``tests/test_worldlm_deploy.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kumiki import contract as C
from strategies.aggregate import weighted_mean
from strategies.base import SiteProfile, Update
from strategies.worldlm import WorldLM
from strategies.worldlm_tree import residual_embeddings

log = logging.getLogger("kumiki.server")
RES = "res/"


def residual_arrays(residuals: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{RES}{u}/{n}": a for u, arrs in residuals.items() for n, a in arrs.items()}


def parse_residuals(extra: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for k, v in extra.items():
        if k.startswith(RES):
            u, _, n = k[len(RES):].partition("/")
            out.setdefault(u, {})[n] = np.asarray(v)
    return out


class BridgedRoot(WorldLM):
    """The root of shape (b): one node per sub-federation (its aggregator)."""

    def __init__(self, cfg, job, split, initial):
        super().__init__(cfg, job, split, initial)
        #: Kbar_g as each sub-federation last reported it (the sub-federation phase)
        self.summaries: dict[str, dict[str, np.ndarray]] = {}
        #: what each sub-federation reported of its central DP (epsilon so far)
        self.reported_epsilon: dict[str, float] = {}

    # ------------------------------------------------------------------ nodes are sub-federations
    def discover(self, grid, expected: int, timeout: float):
        return super().discover(grid, len(self.tree.groups), timeout)

    def expected_nodes(self) -> int:
        return len(self.tree.groups)

    def _check_groups(self) -> None:
        for nid, p in list(self.profiles.items()):
            if p.site not in self.tree.groups or (p.group and p.group != p.site):
                reason = (f"node {p.site!r} is not the aggregator of a sub-federation of [federation] "
                          f"({', '.join(self.tree.groups)})")
                log.error("node %s dropped at discovery: %s", nid, reason)
                self.discovery_rejected.append({"node": nid, "site": p.site, "reason": reason})
                self._refused.add(nid)
                del self.profiles[nid]
        if not self.train_nodes():
            raise RuntimeError("no sub-federation aggregator answered; nothing to train")

    def group_of(self, node_id: int) -> str:
        return self.profiles[node_id].site

    def sample(self, nodes: list[int]) -> list[int]:
        return nodes  # every aggregator, every round; each samples its own sites

    def extra_config(self, node_id: int, server_round: int) -> dict:
        return {}  # a sub-federation applies its own DP to its own sites

    # ------------------------------------------------------------------ messages
    def payload(self, node_id: int) -> dict[str, np.ndarray]:
        g = self.group_of(node_id)
        phase, k = self.phase(self._round or 1)
        model = self.root.model_for(g)
        if phase == 0 or (k == 1 and not self._for_eval):
            return model  # the root's model for g (in the sub-federation phase: once, as its starting point)
        if self._for_eval:
            return {}
        return {n: model[n] for n in self.root_keys}

    def extra_arrays(self, node_id: int, server_round: int) -> dict[str, np.ndarray]:
        phase, _ = self.phase(server_round)
        if phase == 0:
            return self.kbar(self.root) if self._for_eval else {}
        return {} if self._for_eval else residual_arrays(self.residuals.get(self.group_of(node_id), {}))

    # ------------------------------------------------------------------ aggregation
    def leaf_weight(self, u: Update) -> float:
        """n_g: the tokens g's sites trained on (``train-tokens``), capped at the most its sites can see in one
        round; a reply without it counts its examples."""
        m, t = self.cfg.method, self.cfg.train
        sites = len(self.tree.groups[u.profile.site].sites)
        seqs = m.local_steps * t.batch_size * sites if m.local_steps else u.profile.num_train * t.local_epochs
        tokens = u.metrics.get("train-tokens")
        if tokens is not None and np.isfinite(tokens) and tokens > 0:
            return float(min(tokens, seqs * int(self.job.model.input_shape[0])))
        return float(u.num_examples)

    def _aggregate_root(self, updates: list[Update]) -> None:
        b_means, ns, k_means = [], [], {}
        for u in updates:
            g, w = u.profile.site, self.leaf_weight(u)
            b_means.append({k: u.arrays[k] for k in self.root.backbone})
            ns.append(w)
            k_means[g] = ({k: u.arrays[k] for k in self.root_keys}, w)
            self._note_epsilon(g, u)
        backbone = weighted_mean(b_means, ns) if b_means else None
        self.last_alphas = {"root": self.root.step(backbone, k_means, {}, self.opts)}

    def _aggregate_regions(self, updates: list[Update]) -> None:
        for u in updates:
            self.summaries[u.profile.site] = {k: u.arrays[k] for k in self.root_keys}
            self._note_epsilon(u.profile.site, u)
        if self.cfg.method.residual_refresh == "per_round":
            self._refresh_residuals()

    def _note_epsilon(self, g: str, u: Update) -> None:
        if "train-group-epsilon" in u.metrics:
            self.reported_epsilon[g] = float(u.metrics["train-group-epsilon"])

    def _start_regions(self) -> None:
        self.summaries = {g: {k: v.copy() for k, v in self.root.keys[g].items()} for g in self.tree.groups}
        self._refresh_residuals()

    def _ensure_phase(self, rnd: int) -> None:
        if self.phase(rnd)[0] == 1 and not self.summaries:
            self._start_regions()

    def _refresh_residuals(self) -> None:
        m = self.cfg.method
        if not m.use_residuals or not self.summaries:
            self.residuals = {g: {} for g in self.summaries}
            return
        self.residuals = residual_embeddings(self.summaries, {g: self.policy(g).share_residuals
                                                              for g in self.summaries})

    def _spend_budgets(self, rnd: int) -> None:
        pass  # every sub-federation keeps its own budget (it declines to train when it is spent)

    def record(self, rnd: int) -> dict:
        out = super().record(rnd)
        out.pop("group_epsilon", None)
        if self.reported_epsilon:
            out["group_epsilon"] = dict(self.reported_epsilon)
        return out

    def privacy_record(self) -> dict | None:
        rec = super().privacy_record()
        for g, e in self.reported_epsilon.items():
            if rec and g in rec:
                rec[g]["epsilon"] = e
                rec[g]["releases"] = None  # counted by the sub-federation
        return rec

    # ------------------------------------------------------------------ resume
    def server_state(self) -> dict[str, np.ndarray]:
        arrays = super().server_state()
        arrays.update({f"sum/{g}/{k}": v for g, sm in self.summaries.items() for k, v in sm.items()})
        return arrays

    def state_dict(self):
        arrays, meta = super().state_dict()
        meta["worldlm"]["reported_epsilon"] = dict(self.reported_epsilon)
        return arrays, meta

    def load_state_dict(self, arrays, meta):
        super().load_state_dict(arrays, meta)
        self.summaries = {}
        for k, v in self._loaded.items():
            if k.startswith("sum/"):
                g, _, n = k[len("sum/"):].partition("/")
                self.summaries.setdefault(g, {})[n] = np.array(v)
        self.reported_epsilon = {str(g): float(e) for g, e in meta["worldlm"].get("reported_epsilon", {}).items()}


class RegionServer(WorldLM):
    """Sub-federation ``group``'s server in shape (b): the node of shape (a) over its own sites only."""

    def __init__(self, cfg, job, split, initial, group: str):
        super().__init__(cfg, job, split, initial)
        if group not in self.tree.groups:
            raise ValueError(f"sub-federation {group!r} is not in [federation] ({', '.join(self.tree.groups)})")
        self.group = group
        #: the answer to the root's message: arrays and metrics
        self.result: dict[str, Any] = {}
        self.received: dict[str, np.ndarray] = {}

    def discover(self, grid, expected: int, timeout: float):
        return super().discover(grid, len(self.tree.groups[self.group].sites), timeout)

    def expected_nodes(self) -> int:
        return len(self.tree.groups[self.group].sites)

    def _check_groups(self) -> None:
        for nid, p in list(self.profiles.items()):
            if self.tree.group_of(p.site) != self.group:
                reason = f"site {p.site} is not in sub-federation {self.group!r}"
                log.error("node %s dropped at discovery: %s", nid, reason)
                self.discovery_rejected.append({"node": nid, "site": p.site, "reason": reason})
                self._refused.add(nid)
                del self.profiles[nid]
        super()._check_groups()

    def receive(self, arrays: dict[str, np.ndarray], extra: dict[str, np.ndarray]) -> None:
        """The root's message: its model for this sub-federation (root phase, and the start of ours), its
        summary Kbar (evaluation of the root phase), or our siblings' residuals (our phase)."""
        self.received = dict(arrays)
        full = set(self.template)
        if set(arrays) == full:
            self.root.backbone = {k: np.array(arrays[k]) for k in self.root.backbone}
            self.root.keys[self.group] = {k: np.array(arrays[k]) for k in self.root_keys}
        prefix = self.cfg.method.kbar_prefix
        kbar = {k[len(prefix):]: np.asarray(v) for k, v in extra.items() if k.startswith(prefix)}
        if kbar:
            self.root.summary = kbar
        res = parse_residuals(extra)
        self.residuals = {self.group: res}

    def _start_regions(self) -> None:
        g = self.group
        trained = [q.site for q in self.profiles.values() if q.role == "train"]
        self.regions = {g: self._node(g, self.root.model_for(g), self.phase_keys(g, 1), sorted(trained))}
        log.info("sub-federation %s: its own phase starts from the root's model", g)

    def _refresh_residuals(self) -> None:
        pass  # the root derives them from every sub-federation's summary and sends them with each message

    def _ensure_phase(self, rnd: int) -> None:
        if self.phase(rnd)[0] == 1 and not self.regions:
            self._start_regions()

    def _aggregate_root(self, updates: list[Update]) -> None:
        g = self.group
        b, k, n = self._reduce_group(g, updates, self.root.backbone, self.root.keys[g], salt=0)
        self.result = {"arrays": {**b, **k}, "tokens": n}

    def _aggregate_regions(self, updates: list[Update]) -> None:
        super()._aggregate_regions(updates)
        node = self.regions[self.group]
        summary = {**node.backbone, **node.summary}  # a layer this sub-federation keeps in its backbone: B_g
        sent = {k: (summary[k] if k in self.root_keys else v) for k, v in self.received.items()}
        self.result = {"arrays": sent, "tokens": float(sum(self.weights(updates)))}

    def group_epsilon_now(self) -> float | None:
        return self.group_epsilon(self.group) if self.policy(self.group).dp == "central" else None


def profile_of(profiles: dict[int, SiteProfile]) -> dict[str, int]:
    """What an aggregator announces to the root: its sites' training and test examples."""
    return {"num-train": sum(p.num_train for p in profiles.values() if p.role == "train"),
            "num-test": sum(p.num_test for p in profiles.values())}


def check_same_run(root_config: dict[str, str], ours) -> None:
    """The root's job knobs must be this sub-federation's own (the same method, model, optimizer and run)."""
    for key, mine in ((C._METHOD, ours.method.model_dump_json()), (C._MODEL, ours.model.to_json()),
                      (C._TRAIN, ours.train.model_dump_json()), (C._RUN, ours.run)):
        if key in root_config and str(root_config[key]) != mine:
            raise ValueError(f"the root runs another config than this sub-federation's ({key} differs); give the "
                             "aggregator the federation's config")
