"""KumikiStrategy: the common base every method's strategy subclasses.

It implements Flower's Message-API ``Strategy`` once for all methods:

* **per-site messages**: each site receives the shared tensors plus its own
  group's tensors, in a fresh ``RecordDict`` per node (Flower's FedAvg shares
  one across nodes; per-site content needs its own);
* **reply checks**: error replies, unexpected tensor names, wrong shapes,
  NaN/inf values and non-positive example counts are logged as rejections and
  dropped; a round with too few valid replies keeps the previous model;
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

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from kumiki import contract as C
from kumiki.split import ParamSplit
from strategies.aggregate import weighted_mean

log = logging.getLogger("kumiki.server")


@dataclass(frozen=True)
class SiteProfile:
    node_id: int
    site: str
    role: str
    group: str
    num_train: int
    num_test: int


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
    accepted: int = 0
    rejected: list[dict] = field(default_factory=list)
    aggregated: bool = False
    bytes_down: int = 0
    bytes_up: int = 0
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


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
        self.rounds: dict[int, RoundStats] = {}
        self._rng = random.Random(cfg.run.seed)

    # ------------------------------------------------------------- sites
    def train_nodes(self) -> list[int]:
        return sorted(n for n, p in self.profiles.items() if p.role == "train")

    def eval_nodes(self) -> list[int]:
        return sorted(self.profiles)

    def discover(self, grid: Grid, expected: int, timeout: float) -> dict[int, SiteProfile]:
        """Wait for ``expected`` sites (bounded), then ask each who it is (query.profile)."""
        deadline = time.monotonic() + timeout
        while len(ids := list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
            log.info("waiting for sites: %d of %d connected", len(ids), expected)
            time.sleep(1.0)
        if len(ids) < expected:
            log.warning("only %d of %d sites connected within %.0fs; going on with them", len(ids), expected, timeout)
        msgs = [
            Message(RecordDict({C.CONFIG: replace(self.job, round=0).to_config()}), dst_node_id=n,
                    message_type=f"{MessageType.QUERY}.{C.QUERY_PROFILE}")
            for n in ids
        ]
        for r in grid.send_and_receive(msgs, timeout=timeout):
            nid = r.metadata.src_node_id
            if r.has_error():
                log.error("site on node %s rejected the profile query: %s", nid, r.error.reason)
                continue
            p = r.content[C.PROFILE]
            self.profiles[nid] = SiteProfile(nid, str(p["site"]), str(p["role"]), str(p["group"]),
                                             int(p["num-train"]), int(p["num-test"]))
        names = [p.site for p in self.profiles.values()]
        if len(set(names)) != len(names):
            raise RuntimeError(f"two SuperNodes claim the same site name: {sorted(names)}")
        if not self.train_nodes():
            raise RuntimeError("no training site answered the profile query; nothing to train")
        log.info("sites: %s", ", ".join(f"{p.site}({p.role}{'/' + p.group if p.group else ''})"
                                          for p in sorted(self.profiles.values(), key=lambda p: p.site)))
        return self.profiles

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
        return Message(content, dst_node_id=node_id, message_type=mtype)

    def server_state(self) -> dict[str, np.ndarray]:
        """Server-side method state a checkpoint keeps besides the model tensors (FedHB: its precision)."""
        return {}

    def sample(self, nodes: list[int]) -> list[int]:
        k = max(1, math.ceil(self.cfg.server.fraction_train * len(nodes)))
        return sorted(self._rng.sample(nodes, k)) if k < len(nodes) else nodes

    # ------------------------------------------------------------- Flower Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if arrays is not None and len(arrays):  # Strategy.start() hands back what aggregate_train returned
            self.shared.update(C.from_record(arrays))
        stats = self.rounds.setdefault(server_round, RoundStats())
        return [self._message(n, MessageType.TRAIN, server_round, stats) for n in self.sample(self.train_nodes())]

    def check_reply(self, reply: Message, expected: tuple[str, ...] | None) -> str | None:
        """Why a training reply must be dropped, or None if it is acceptable."""
        if reply.has_error():
            return f"site error: {reply.error.reason}"
        if expected is None:
            return "reply from a site that was not asked to train this round"
        content = reply.content
        if C.ARRAYS not in content.array_records or C.METRICS not in content.metric_records:
            return "reply lacks 'arrays' or 'metrics'"
        arrays = content[C.ARRAYS]
        if set(arrays.keys()) != set(expected):
            return f"reply tensors differ from the ones sent: {sorted(set(arrays.keys()) ^ set(expected))[:5]}"
        ref = {**self.shared, **{k: v for g in self.group_arrays.values() for k, v in g.items()}}
        for k, a in arrays.items():
            v = a.numpy()
            if v.shape != ref[k].shape:
                return f"tensor {k}: shape {v.shape} != {ref[k].shape}"
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
                return f"tensor {k}: NaN or inf"
        n = content[C.METRICS].get(C.NUM_EXAMPLES, 0)
        if not isinstance(n, (int, float)) or n <= 0:
            return f"num-examples must be positive, got {n!r}"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        updates: list[Update] = []
        seen: set[int] = set()
        for r in replies:
            nid = r.metadata.src_node_id
            seen.add(nid)
            site = self.profiles[nid].site if nid in self.profiles else f"node-{nid}"
            reason = self.check_reply(r, stats.sent.get(nid))
            if reason:
                log.warning("round %d: rejected update from %s: %s", server_round, site, reason)
                stats.rejected.append({"site": site, "reason": reason})
                continue
            rec = r.content[C.ARRAYS]
            stats.bytes_up += rec.count_bytes()
            metrics = {k: float(v) for k, v in r.content[C.METRICS].items() if isinstance(v, (int, float))}
            updates.append(Update(self.profiles[nid], C.from_record(rec), int(metrics[C.NUM_EXAMPLES]), metrics))
            stats.train_metrics[site] = metrics
        for n in sorted(set(stats.sent) - seen):
            log.warning("round %d: no reply from %s (timed out or disconnected)", server_round, self.profiles[n].site)
            stats.rejected.append({"site": self.profiles[n].site, "reason": "no reply"})
        # Replies arrive in any order; aggregate in site order so the model never depends on it
        # (float sums are order-sensitive in the last bits, integer buffers come from the first update).
        updates.sort(key=lambda u: u.profile.site)
        stats.accepted = len(updates)
        needed = math.ceil(self.cfg.server.min_reply_fraction * max(len(stats.sent), 1))
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
        if self.shared:
            self.shared = self.aggregate_shared(updates)
        for g in self.group_arrays:
            members = [u for u in updates if u.profile.group == g]
            if members:
                names = self.group_arrays[g]
                self.group_arrays[g] = weighted_mean([{k: u.arrays[k] for k in names} for u in members],
                                                     self.weights(members))

    def weights(self, updates: list[Update]) -> list[float]:
        """n-weighted by default (FedAvg)."""
        return [float(u.num_examples) for u in updates]

    def aggregate_shared(self, updates: list[Update]) -> dict[str, np.ndarray]:
        return weighted_mean([{k: u.arrays[k] for k in self.shared} for u in updates], self.weights(updates))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        return [self._message(n, MessageType.EVALUATE, server_round, stats) for n in self.eval_nodes()]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        stats = self.rounds.setdefault(server_round, RoundStats())
        for r in replies:
            nid = r.metadata.src_node_id
            site = self.profiles[nid].site if nid in self.profiles else f"node-{nid}"
            if r.has_error():
                log.warning("round %d: evaluation failed on %s: %s", server_round, site, r.error.reason)
                stats.rejected.append({"site": site, "reason": f"evaluate: {r.error.reason}"})
                continue
            stats.eval_metrics[site] = {k: float(v) for k, v in r.content[C.METRICS].items()}
        if not stats.eval_metrics:
            return None
        out = {}
        for key in ("personalized-accuracy", "global-accuracy"):
            vals = [m[key] for m in stats.eval_metrics.values() if key in m and not m.get("unseen")]
            if vals:
                out[key] = float(np.mean(vals))
        return MetricRecord(out)

    def summary(self) -> None:
        log.info("%s: %d shared, %d personal, %d group tensors", type(self).__name__, len(self.split.shared),
                 len(self.split.personal), sum(len(v) for v in self.split.groups.values()))
