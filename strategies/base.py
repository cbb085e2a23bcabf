"""KumikiStrategy: the common base every method's strategy subclasses.

It implements Flower's Message-API ``Strategy`` once for all methods:

* **per-site messages**: each site receives the shared tensors plus its own
  group's tensors, in a fresh ``RecordDict`` per node (Flower's FedAvg shares
  one across nodes; per-site content needs its own);
* **reply checks** (``strategies.replies``): every field of every reply is parsed
  defensively; error replies, other tensor names, dtypes or shapes, non-finite
  values, example counts beyond the site's announcement and out-of-range metrics
  are logged as rejections and dropped; no reply can raise in the server; a round
  with too few valid replies keeps the previous model;
* **aggregation**: shared tensors over all valid replies, each group's tensors
  over that group's sites only. Subclasses change ``weights`` or
  ``aggregate_shared`` (the math itself lives in ``strategies.aggregate``);
* **accounting**: bytes of every ArrayRecord sent and received, per round.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from kumiki import contract as C
from kumiki.accounting import epsilon
from kumiki.split import ParamSplit
from strategies.aggregate import (central_dp_mean, clip_to_median_norm, coordinate_median, trimmed_mean,
                                 weighted_mean)
from strategies.replies import BadReply, check_arrays, eval_metrics, parse_profile, train_metrics

log = logging.getLogger("kumiki.server")


@dataclass(frozen=True)
class SiteProfile:
    node_id: int
    site: str
    role: str
    group: str
    num_train: int
    num_test: int
    #: what the site learns (its data's task, ``kumiki/tasks.py``): which metric its replies carry
    task: str = "classification"
    #: the site's camera/domain as its site.json (or node config ``domain``) describes it; "" if unknown
    domain: str = ""


@dataclass
class Update:
    """One accepted training reply."""

    profile: SiteProfile
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass
class RoundStats:
    sent: dict[int, tuple[str, ...]] = field(default_factory=dict)
    eval_sent: set[int] = field(default_factory=set)
    accepted: int = 0
    rejected: list[dict] = field(default_factory=list)
    #: sites that declined to train (privacy budget spent): expected, not a fault
    declined: list[dict] = field(default_factory=list)
    aggregated: bool = False
    bytes_down: int = 0
    bytes_up: int = 0
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _restored(current: dict[str, np.ndarray], saved: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """``saved`` in place of ``current``: the same names, shapes and dtypes, or ValueError."""
    if set(saved) != set(current):
        raise ValueError(f"checkpoint {what} tensors differ from this model's: {sorted(set(saved) ^ set(current))[:3]}")
    for k, v in saved.items():
        if v.shape != current[k].shape or v.dtype != current[k].dtype:
            raise ValueError(f"checkpoint tensor {k} ({what}): {v.dtype}{list(v.shape)} but this model has "
                             f"{current[k].dtype}{list(current[k].shape)}")
    return {k: np.array(saved[k]) for k in current}


class KumikiStrategy(Strategy):
    """Base for every Kumiki method (FedAvg behaviour unless overridden)."""

    def __init__(self, cfg, job: C.Job, split: ParamSplit, initial: dict[str, np.ndarray]):
        self.cfg = cfg
        self.method = cfg.method
        self.job = job
        self.split = split
        self.shared: dict[str, np.ndarray] = {k: initial[k] for k in split.shared}
        self.group_arrays: dict[str, dict[str, np.ndarray]] = {
            g: {k: initial[k] for k in names} for g, names in split.groups.items()
        }
        self.profiles: dict[int, SiteProfile] = {}
        #: nodes dropped at discovery (bad profile, duplicate site name), with the reason
        self.discovery_rejected: list[dict] = []
        #: site -> last round whose update was accepted (sent to the site: its state file must exist then)
        self.completed: dict[str, int] = {}
        self._refused: set[int] = set()  # node ids dropped at discovery: not asked again
        self.rounds: dict[int, RoundStats] = {}
        self._rng = random.Random(cfg.run.seed)
        #: site -> round in which it declined to train because its privacy budget is spent
        self.budget_spent: dict[str, int] = {}
        #: central DP (``privacy.central``): noised releases so far
        self.central_releases = 0

    # ------------------------------------------------------------- sites
    def train_nodes(self) -> list[int]:
        """Training sites still able to train (a site out of privacy budget only evaluates)."""
        return sorted(n for n, p in self.profiles.items() if p.role == "train" and p.site not in self.budget_spent)

    def eval_nodes(self) -> list[int]:
        return sorted(self.profiles)

    def discover(self, grid: Grid, expected: int, timeout: float) -> dict[int, SiteProfile]:
        """Wait for ``expected`` sites (bounded), then ask each who it is (query.profile)."""
        self._discovery_timeout = timeout
        # Latency only (not mutated: a wrong bound here waits out the discovery timeout, the result is the same).
        deadline = time.monotonic() + timeout  # pragma: no mutate
        while len(ids := list(grid.get_node_ids())) < expected and time.monotonic() < deadline:  # pragma: no mutate
            log.info("waiting for sites: %d of %d connected", len(ids), expected)
            time.sleep(1.0)  # pragma: no mutate
        if len(ids) < expected:
            log.warning("only %d of %d sites connected within %.0fs; going on with them", len(ids), expected, timeout)
        self._admit(grid, ids, timeout, live=set(ids))
        if not self.train_nodes():
            raise RuntimeError("no training site answered the profile query; nothing to train")
        log.info("sites: %s", ", ".join(f"{p.site}({p.role}{'/' + p.group if p.group else ''})"
                                          for p in sorted(self.profiles.values(), key=lambda p: p.site)))
        return self.profiles

    def refresh(self, grid: Grid, server_round: int) -> None:
        """Before a round: profile nodes that connected since (a restarted SuperNode has a new node id).

        A known site on a new node takes over its old node if that one is gone; a new name joins late.
        """
        live = set(grid.get_node_ids())
        new = sorted(live - set(self.profiles) - self._refused)
        if new:
            self._admit(grid, new, min(30.0, getattr(self, "_discovery_timeout", 30.0)), live, server_round)
        self._live = live

    def _admit(self, grid: Grid, ids: list[int], timeout: float, live: set[int], server_round: int = 0) -> None:
        msgs = [
            Message(RecordDict({C.CONFIG: replace(self.job, round=server_round).to_config()}), dst_node_id=n,
                    message_type=f"{MessageType.QUERY}.{C.QUERY_PROFILE}")
            for n in ids
        ]
        for r in grid.send_and_receive(msgs, timeout=timeout):
            nid = r.metadata.src_node_id
            try:
                if r.has_error():
                    raise BadReply(f"the site answered with an error: {r.error.reason}")
                p = parse_profile(nid, r.content)
                self.check_profile(p)
            except Exception as exc:  # noqa: BLE001 - a bad profile drops that node, never the run
                reason = str(exc) if isinstance(exc, BadReply) else f"malformed profile ({type(exc).__name__}: {exc})"
                log.error("site on node %s dropped at discovery: %s", nid, reason)
                self.discovery_rejected.append({"node": nid, "reason": reason})
                self._refused.add(nid)
                continue
            holder = next((n for n, q in self.profiles.items() if q.site == p["site"]), None)
            if holder is not None and holder in live:
                # Not refused for good: a restarted SuperNode can show up while its old node still looks
                # online (until Flower's heartbeat expires); it is asked again before the next round.
                reason = f"a second node claims site name {p['site']!r}; the first one keeps it"
                if not any(d.get("node") == nid for d in self.discovery_rejected):
                    log.error("node %s dropped at discovery: %s", nid, reason)
                    self.discovery_rejected.append({"node": nid, "site": p["site"], "reason": reason})
                continue
            if holder is not None:  # the site's old node is gone: it reconnected (e.g. a restarted SuperNode)
                log.warning("site %s reconnected as node %s (was node %s)", p["site"], nid, holder)
                del self.profiles[holder]
            elif server_round:
                log.warning("site %s joined at round %d", p["site"], server_round)
            self.profiles[nid] = SiteProfile(**p)

    def check_profile(self, profile: dict[str, Any]) -> None:
        """A method's own admission rule for a site's profile (M-Fed: its task group); raise BadReply to refuse it."""

    # ------------------------------------------------------------- payloads
    def payload(self, node_id: int) -> dict[str, np.ndarray]:
        """What this site may receive: shared tensors + its own group's tensors."""
        group = self.profiles[node_id].group
        return {**self.shared, **self.group_arrays.get(group, {})}

    def extra_config(self, node_id: int, server_round: int) -> dict:
        """Per-site config entries a method adds (none by default)."""
        return {}

    def extra_arrays(self, node_id: int, server_round: int) -> dict[str, np.ndarray]:
        """Non-model arrays a method sends under ``extra`` (none by default; FedHB sends its precision)."""
        return {}

    def _message(self, node_id: int, mtype: str, server_round: int, stats: RoundStats) -> Message:
        arrays = C.to_record(self.payload(node_id))
        config = replace(self.job, round=server_round).to_config()
        config[C.COMPLETED] = self.completed.get(self.profiles[node_id].site, 0)
        for k, v in self.extra_config(node_id, server_round).items():
            config[k] = v
        content = RecordDict({C.ARRAYS: arrays, C.CONFIG: config})
        stats.bytes_down += arrays.count_bytes()
        extra = self.extra_arrays(node_id, server_round)
        if extra:
            content[C.EXTRA] = C.to_record(extra)
            stats.bytes_down += content[C.EXTRA].count_bytes()
        if mtype == MessageType.TRAIN:
            stats.sent[node_id] = tuple(arrays.keys())
        else:
            stats.eval_sent.add(node_id)
        return Message(content, dst_node_id=node_id, message_type=mtype)

    def server_state(self) -> dict[str, np.ndarray]:
        """Server-side method state a checkpoint keeps besides the model tensors (FedHB: its precision)."""
        return {}

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`server_state` returned (a method with server state overrides both)."""
        if arrays:
            raise ValueError(f"{type(self).__name__} keeps no server state, but the checkpoint holds "
                             f"{sorted(arrays)[:3]}: it was written by another method")

    # ------------------------------------------------------------- resume (server checkpoints)
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What a resumed server needs to go on exactly as if it had never stopped.

        Arrays: the shared tensors (``shared/<name>``), each group's (``group/<g>/<name>``) and the method's
        :meth:`server_state` (``server/<key>``). A small JSON-able dict: the last accepted round per site (sites
        check their state files against it), spent privacy budgets, central DP releases (its noise and epsilon
        follow from the count) and the sampling RNG, so the resumed run samples the sites it would have.
        A method with more server state extends both methods (and calls ``super()``).
        """
        arrays = {f"shared/{k}": v for k, v in self.shared.items()}
        for g, arrs in self.group_arrays.items():
            arrays.update({f"group/{g}/{k}": v for k, v in arrs.items()})
        arrays.update({f"server/{k}": v for k, v in self.server_state().items()})
        version, internal, gauss = self._rng.getstate()
        meta = {"completed": dict(self.completed), "budget_spent": dict(self.budget_spent),
                "central_releases": self.central_releases, "rng": [version, list(internal), gauss]}
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a strategy built from the same config; anything that does not fit
        (another model, split or method) raises ``ValueError`` naming it."""
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        known = ("shared/", "server/", *(f"group/{g}/" for g in self.group_arrays))
        stray = sorted(k for k in arrays if not k.startswith(known))
        if stray:
            raise ValueError(f"checkpoint tensors this strategy does not have: {stray[:3]}")
        self.shared = _restored(self.shared, part("shared/"), "shared")
        for g in self.group_arrays:
            self.group_arrays[g] = _restored(self.group_arrays[g], part(f"group/{g}/"), f"group {g!r}")
        self.load_server_state(part("server/"))
        self.completed = {str(k): int(v) for k, v in meta.get("completed", {}).items()}
        self.budget_spent = {str(k): int(v) for k, v in meta.get("budget_spent", {}).items()}
        self.central_releases = int(meta.get("central_releases", 0))
        if meta.get("rng") is not None:
            version, internal, gauss = meta["rng"]
            self._rng.setstate((version, tuple(internal), gauss))

    def sample(self, nodes: list[int]) -> list[int]:
        k = max(1, math.ceil(self.cfg.server.fraction_train * len(nodes)))
        return sorted(self._rng.sample(nodes, k)) if k < len(nodes) else nodes

    # ------------------------------------------------------------- Flower Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if arrays is not None and len(arrays):  # Strategy.start() hands back what aggregate_train returned
            self.shared.update(C.from_record(arrays))
        if grid is not None and self.profiles:
            self.refresh(grid, server_round)
        stats = self.rounds.setdefault(server_round, RoundStats())
        return [self._message(n, MessageType.TRAIN, server_round, stats)
                for n in self.sample(self._reachable(self.train_nodes(), server_round, stats))]

    def _reachable(self, nodes: list[int], server_round: int, stats: RoundStats) -> list[int]:
        """The nodes still connected (when the grid says); an offline site is logged, not waited for."""
        live = getattr(self, "_live", None)
        if live is None:
            return nodes
        for n in nodes:
            if n not in live and not any(r["site"] == self.profiles[n].site for r in stats.rejected):
                log.warning("round %d: site %s is offline; skipped", server_round, self.profiles[n].site)
                stats.rejected.append({"site": self.profiles[n].site, "reason": "offline (not connected)"})
        return [n for n in nodes if n in live]

    def reference_arrays(self) -> dict[str, np.ndarray]:
        """Every tensor the server sends (shared + all groups): the names, dtypes and shapes replies must match."""
        return {**self.shared, **{k: v for g in self.group_arrays.values() for k, v in g.items()}}

    def parse_update(self, reply: Message, expected: tuple[str, ...] | None) -> Update:
        """The reply as an accepted update, or :class:`BadReply` saying why it must be dropped."""
        if reply.has_error():
            raise BadReply(f"site error: {reply.error.reason}")
        nid = reply.metadata.src_node_id
        if expected is None or nid not in self.profiles:
            raise BadReply("reply from a site that was not asked to train this round")
        content = reply.content
        if C.ARRAYS not in content.array_records:
            raise BadReply("reply lacks its 'arrays' record")
        profile = self.profiles[nid]
        n, metrics = train_metrics(content, announced=profile.num_train)
        arrays = check_arrays(content[C.ARRAYS], self.reference_arrays(), expected)
        return Update(profile, arrays, n, metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        updates: list[Update] = []
        seen: set[int] = set()
        for r in replies:
            nid = r.metadata.src_node_id
            site = self.profiles[nid].site if nid in self.profiles else f"node-{nid}"
            try:
                if nid in seen:
                    raise BadReply("a second reply from this node in the same round")
                seen.add(nid)
                if r.has_error() and r.error.code == C.ERR_BUDGET and nid in self.profiles:
                    log.warning("round %d: %s declines to train from now on: %s", server_round, site, r.error.reason)
                    self.budget_spent.setdefault(site, server_round)
                    stats.declined.append({"site": site, "reason": r.error.reason})
                    continue
                update = self.parse_update(r, stats.sent.get(nid))
                stats.bytes_up += r.content[C.ARRAYS].count_bytes()
            except Exception as exc:  # noqa: BLE001 - no reply may raise in the server
                reason = str(exc) if isinstance(exc, BadReply) else f"malformed reply ({type(exc).__name__}: {exc})"
                log.warning("round %d: rejected update from %s: %s", server_round, site, reason)
                stats.rejected.append({"site": site, "reason": reason})
                continue
            updates.append(update)
            stats.train_metrics[site] = update.metrics
            self.completed[site] = server_round
        for n in sorted(set(stats.sent) - seen):
            log.warning("round %d: no reply from %s (timed out or disconnected)", server_round, self.profiles[n].site)
            stats.rejected.append({"site": self.profiles[n].site, "reason": "no reply"})
        # Replies arrive in any order; aggregate in site order so the model never depends on it
        # (float sums are order-sensitive in the last bits, integer buffers come from the first update).
        updates.sort(key=lambda u: u.profile.site)
        stats.accepted = len(updates)
        needed = math.ceil(self.cfg.server.min_reply_fraction * max(len(stats.sent) - len(stats.declined), 1))
        if len(updates) < needed:
            log.error("round %d: %d valid replies < %d needed; keeping the previous model", server_round, len(updates), needed)
            return None, None
        self.aggregate(updates)
        stats.aggregated = True
        total = sum(u.num_examples for u in updates)
        keys = set.intersection(*(set(u.metrics) for u in updates))
        agg = {k: sum(u.metrics[k] * u.num_examples for u in updates) / total for k in sorted(keys) if k != C.NUM_EXAMPLES}
        agg[C.NUM_EXAMPLES] = total
        return C.to_record(self.shared), MetricRecord(agg)

    def aggregate(self, updates: list[Update]) -> None:
        """Shared tensors over all updates; each group's tensors over its own sites."""
        if self.cfg.privacy.central:
            self.aggregate_central(updates)
            return
        server = self.cfg.server
        if server.aggregation == "norm_bound":  # a pre-step for every method: cap each update's change
            clipped = clip_to_median_norm([u.arrays for u in updates], self.reference_arrays(), server.norm_bound)
            updates = [replace(u, arrays=a) for u, a in zip(updates, clipped)]
        if self.shared:
            self.shared = self.aggregate_shared(updates)
        for g in self.group_arrays:
            members = [u for u in updates if u.profile.group == g]
            if members:
                names = self.group_arrays[g]
                self.group_arrays[g] = self.combine([{k: u.arrays[k] for k in names} for u in members],
                                                    self.weights(members))

    def aggregate_central(self, updates: list[Update]) -> None:
        """``privacy.central``: each part (shared, each group) becomes the noised uniform mean of clipped changes."""
        p = self.cfg.privacy
        self.central_releases += 1
        rng = np.random.default_rng([self.cfg.run.seed, 7919, self.central_releases])
        parts = [("", self.shared, updates)] + [(g, a, [u for u in updates if u.profile.group == g])
                                                  for g, a in self.group_arrays.items()]
        for g, ref, members in parts:
            if not ref or not members:
                continue
            new = central_dp_mean([{k: u.arrays[k] for k in ref} for u in members], ref, p.central_clip,
                                  p.central_noise_multiplier, rng)
            if g:
                self.group_arrays[g] = new
            else:
                self.shared = new

    def central_epsilon(self, releases: int | None = None) -> float:
        """Epsilon of the server's releases (RDP, no sampling amplification: Flower's choice)."""
        n = self.central_releases if releases is None else releases
        p = self.cfg.privacy
        return epsilon(p.accountant, [(p.central_noise_multiplier, 1.0, n)] if n else [], p.delta)

    def central_budget_left(self) -> bool:
        return not self.cfg.privacy.central or self.central_epsilon(self.central_releases + 1) <= self.cfg.privacy.target_epsilon

    def weights(self, updates: list[Update]) -> list[float]:
        """n-weighted by default (FedAvg)."""
        return [float(u.num_examples) for u in updates]

    def combine(self, arrays: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        """The method's weighted mean, or the operator's coordinate-wise robust rule (``server.aggregation``)."""
        server = self.cfg.server
        if server.aggregation == "trimmed_mean":
            return trimmed_mean(arrays, server.trim_fraction)
        if server.aggregation == "median":
            return coordinate_median(arrays)
        return weighted_mean(arrays, weights)

    def aggregate_shared(self, updates: list[Update]) -> dict[str, np.ndarray]:
        return self.combine([{k: u.arrays[k] for k in self.shared} for u in updates], self.weights(updates))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        return [self._message(n, MessageType.EVALUATE, server_round, stats)
                for n in self._reachable(self.eval_nodes(), server_round, stats)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        stats = self.rounds.setdefault(server_round, RoundStats())
        for r in replies:
            nid = r.metadata.src_node_id
            site = self.profiles[nid].site if nid in self.profiles else f"node-{nid}"
            try:
                if r.has_error():
                    raise BadReply(f"site error: {r.error.reason}")
                if nid not in stats.eval_sent:
                    raise BadReply("reply from a site that was not asked to evaluate")
                metrics = eval_metrics(r.content, announced_test=self.profiles[nid].num_test)
            except Exception as exc:  # noqa: BLE001
                reason = str(exc) if isinstance(exc, BadReply) else f"malformed reply ({type(exc).__name__}: {exc})"
                log.warning("round %d: evaluation from %s dropped: %s", server_round, site, reason)
                stats.rejected.append({"site": site, "reason": f"evaluate: {reason}"})
                continue
            stats.eval_metrics[site] = metrics
        if not stats.eval_metrics:
            return None
        out = {}
        for key in sorted({k for m in stats.eval_metrics.values() for k in m
                           if k.startswith(("personalized-", "global-")) and not k.endswith("-loss")}):
            vals = [m[key] for m in stats.eval_metrics.values() if key in m and not m.get("unseen")]
            if vals:
                out[key] = float(np.mean(vals))
        return MetricRecord(out)

    def summary(self) -> None:
        log.info("%s: %d shared, %d personal, %d group tensors", type(self).__name__, len(self.split.shared),
                 len(self.split.personal), sum(len(v) for v in self.split.groups.values()))
