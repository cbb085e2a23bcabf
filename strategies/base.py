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
  ``aggregate_shared`` (the math itself lives in ``strategies.aggregate``). A round's
  replies are read from their bytes without a copy and go through one pass in cache-sized
  blocks (``strategies.flat.Stack.read``) that checks each for NaN/inf and, where the round's
  update is the plain weighted mean, sums it; other rules get the replies as one K x P matrix.
  Nothing is computed tensor by tensor;
* **accounting**: bytes of every ArrayRecord sent and received, per round;
* **evaluation in the training message** (``configure_train(evaluate=k)``): each training site evaluates round
  k's model before it trains round k + 1 and replies with both (``take_evaluations``); the other sites get an
  evaluate message in the same exchange, so a round is one message per site.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from kumiki import contract as C, packing
from kumiki.accounting import epsilon
from kumiki.split import ParamSplit
from strategies.aggregate import (central_dp_mean, clip_to_median_norm, coordinate_median, joint_norms, noise_rng,
                                 trimmed_mean, weighted_mean)
from strategies.flat import Layout, Stack
from strategies.replies import (BadReply, check_arrays, check_packed, eval_metrics, parse_profile, rejection, site_seconds,
                               train_metrics)

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
    #: the scale of the site's inputs as it checked them ("[0, 1]", or its site.json ``inputs`` and the data's
    #: range); "" if the site did not say
    inputs: str = ""


def cap_examples(counts: list[int], cap: float) -> list[int]:
    """``min(n_k, floor(cap x median_{j != k} n_j))`` for each k (integers: a count keeps its exact weight).

    The median of the *others*: with two sites the plain median is their mean, which the attacker's own count
    would set. An honest site with up to ``cap`` times the typical count keeps its full weight."""
    n = np.asarray(counts, dtype=np.float64)
    out = []
    for k, nk in enumerate(counts):
        others = np.delete(n, k)
        out.append(int(min(nk, max(1, math.floor(cap * float(np.median(others)))))))
    return out


@dataclass
class Update:
    """One accepted training reply (``arrays``: read-only views of the reply's bytes, then of its row in the
    round's :class:`~strategies.flat.Stack`)."""

    profile: SiteProfile
    arrays: Mapping[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass
class RoundStats:
    #: node -> the tensors sent to it for training, each with the dtype it travelled in (its reply must match)
    sent: dict[int, Mapping[str, np.dtype]] = field(default_factory=dict)
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
    #: the round's wall time (its messages, aggregation and any evaluation sent in it; set by the round driver)
    round_s: float = 0.0
    #: the slowest site's compute (seconds it reported) summed over the round's exchanges: the critical path
    compute_s: float = 0.0
    #: central DP releases after this round (its row reports their epsilon)
    central_releases: int = 0
    #: the method's own facts of the round (``record``), taken when it aggregated: its row may be written later
    method_record: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-able (a checkpoint keeps the stats of a round whose row waits for its evaluation)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["sent"] = {str(n): list(names) for n, names in self.sent.items()}
        d["eval_sent"] = sorted(self.eval_sent)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RoundStats:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["sent"] = {int(n): tuple(names) for n, names in d.get("sent", {}).items()}
        d["eval_sent"] = {int(n) for n in d.get("eval_sent", [])}
        return cls(**d)


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
        #: site -> {round: epsilon its DP-SGD ledger reported with that round's update} (never goes down)
        self.site_epsilon: dict[str, dict[int, float]] = {}
        #: rounds evaluated on the sites' whole test splits (the run's last; set by the round driver), the others
        #: on each site's fixed sample (``eval.sample``)
        self.full_eval_rounds: set[int] = set()

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
            raise RuntimeError(f"no training site answered the profile query within {timeout:.0f} s; nothing to train "
                               "(a slow or busy machine needs a larger server.discovery_timeout_s)")
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
                reason = rejection(exc, "profile")
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

    def _cache(self, kind: str) -> tuple[dict, dict]:
        """The serialized tensors of one kind ("wire": as sent, "model": the model as it is, "extra"), kept from
        call to call: a tensor is serialized once while it stays the same array, however many sites and
        messages carry it (with float32 transport the model's and the wire's are the same)."""
        if kind == "model" and self.cfg.server.transport_dtype == "float32":
            kind = "wire"
        caches = self.__dict__.setdefault("_serialized", {})
        return caches.setdefault(kind, ({}, {}))

    def _message(self, node_id: int, mtype: str, server_round: int, stats: RoundStats,
                 evaluate: int | None = None) -> Message:
        packed, index, wire = self._packed(self.payload(node_id))
        config = replace(self.job, round=server_round).to_config()
        config[C.COMPLETED] = self.completed.get(self.profiles[node_id].site, 0)
        if evaluate is not None:  # the site evaluates what it receives (round `evaluate`'s model) before training
            config[C.EVALUATE_ROUND] = evaluate
            self.rounds.setdefault(evaluate, RoundStats()).eval_sent.add(node_id)
        evaluated = evaluate if evaluate is not None else (server_round if mtype != MessageType.TRAIN else None)
        if evaluated is not None and evaluated in self.full_eval_rounds:  # the run's last round: the whole split
            config[C.EVAL_FULL] = True
        for k, v in self.extra_config(node_id, server_round).items():
            config[k] = v
        content = RecordDict({C.CONFIG: config})
        packing.attach(content, packed, index)  # one array and its index (kumiki/packing.py)
        stats.bytes_down += content[C.ARRAYS].count_bytes()
        extra = self.extra_arrays(node_id, server_round)
        if extra:
            content[C.EXTRA], _ = self._record(extra, self._cache("extra"), convert=False)
            stats.bytes_down += content[C.EXTRA].count_bytes()
        if mtype == MessageType.TRAIN:
            stats.sent[node_id] = wire
        else:
            stats.eval_sent.add(node_id)
        return Message(content, dst_node_id=node_id, message_type=mtype)

    def expected_nodes(self) -> int:
        """How many nodes a complete run hears from (every site; a bridged WorldLM root: every sub-federation)."""
        return self.cfg.total_sites

    def record(self, rnd: int) -> dict[str, Any]:
        """Method-specific facts of round ``rnd`` for its metrics.jsonl row (``"method"``; none by default)."""
        return {}

    def privacy_record(self) -> dict[str, Any] | None:
        """Privacy a method applies beyond ``[privacy]`` (WorldLM's per-sub-federation DP), for summary.json."""
        return None

    def _record(self, arrays: dict[str, np.ndarray], cache: tuple[dict, dict], convert: bool) -> tuple[ArrayRecord, dict]:
        """``arrays`` as an ArrayRecord, and name -> the dtype each tensor travels in (what its reply must use).

        ``convert``: floating tensors travel in ``server.transport_dtype`` (float16 halves the bytes; integer
        buffers never change). A tensor with values beyond float16's range travels in its own dtype (logged).
        Each (name, array) is serialized once per ``cache`` (see :meth:`_cache`): every site gets the same
        ``Array`` objects, so sending to many sites costs one serialization and one copy of the bytes.
        """
        tensors, wires = cache
        rec = ArrayRecord()
        for k, v in arrays.items():
            hit = tensors.get(k)
            if hit is None or hit[0] is not v:  # the entry holds v: its id cannot be reused while cached
                wire = self._to_wire(k, v) if convert else np.asarray(v)
                hit = tensors[k] = (v, C.to_array(wire), wire.dtype)
                if isinstance(v, np.ndarray):
                    v.flags.writeable = False  # cached bytes stand for v: an in-place change must fail, not go stale
            rec[k] = hit[1]
        key = tuple((k, tensors[k][2]) for k in arrays)
        if key not in wires:  # one name -> dtype mapping per payload composition, shared by its sites
            wires[key] = dict(key)
        return rec, wires[key]

    #: packed payloads kept (one per payload composition: the shared tensors, and each group's with them)
    KEEP_PACKS = 16

    def _packed(self, arrays: dict[str, np.ndarray]) -> tuple[Any, str, dict]:
        """``arrays`` as one packed Array, its index and name -> the dtype each tensor travels in (what its reply
        must use). Floating tensors travel in ``server.transport_dtype`` (see :meth:`_to_wire`). Each tensor is
        converted once while it stays the same array, and each payload composition is packed once: every site
        that gets the same tensors gets the same Array (one copy of the bytes, however many sites)."""
        tensors, packs = self.__dict__.setdefault("_packs", ({}, {}))
        wired = {}
        for k, v in arrays.items():
            hit = tensors.get(k)
            if hit is None or hit[0] is not v:  # the entry holds v: its id cannot be reused while cached
                hit = tensors[k] = (v, self._to_wire(k, v))
                if isinstance(v, np.ndarray):
                    v.flags.writeable = False  # cached bytes stand for v: an in-place change must fail, not go stale
            wired[k] = hit[1]
        key = tuple((k, id(w)) for k, w in wired.items())
        hit = packs.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], wired.values())):
            array, index = packing.pack(wired)
            hit = packs[key] = (tuple(wired.values()), array, index, {k: w.dtype for k, w in wired.items()})
            while len(packs) > self.KEEP_PACKS:
                packs.pop(next(iter(packs)))
        return hit[1], hit[2], hit[3]

    def _to_wire(self, name: str, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        if self.cfg.server.transport_dtype != "float16" or value.dtype.kind != "f" or value.dtype == np.float16:
            return value
        with np.errstate(over="ignore"):
            half = value.astype(np.float16)
        if np.isfinite(half).all() or not np.isfinite(value).all():
            return half
        log.warning("tensor %s has values beyond float16's range (max |x| = %.3g); it travels as %s",
                    name, float(np.abs(value).max()), value.dtype)
        return value

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
                "central_releases": self.central_releases, "rng": [version, list(internal), gauss],
                "site_epsilon": {s: {str(r): e for r, e in v.items()} for s, v in self.site_epsilon.items()},
                "run_id": self.job.run_id}
        if self.rounds:  # its row may wait for its evaluation (next round's messages): a resume writes it then
            last = max(self.rounds)
            meta["round_stats"] = {"round": last, **self.rounds[last].to_json()}
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
        self.site_epsilon = {str(s): {int(r): float(e) for r, e in v.items()}
                             for s, v in meta.get("site_epsilon", {}).items()}
        self.job = replace(self.job, run_id=str(meta.get("run_id", "")))  # the sites' state belongs to this run
        if meta.get("rng") is not None:
            version, internal, gauss = meta["rng"]
            self._rng.setstate((version, tuple(internal), gauss))
        if meta.get("round_stats"):
            stats = dict(meta["round_stats"])
            self.rounds[int(stats.pop("round"))] = RoundStats.from_json(stats)

    def sample(self, nodes: list[int]) -> list[int]:
        k = max(1, math.ceil(self.cfg.server.fraction_train * len(nodes)))
        return sorted(self._rng.sample(nodes, k)) if k < len(nodes) else nodes

    # ------------------------------------------------------------- Flower Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid, evaluate: int | None = None) -> Iterable[Message]:
        """Training messages; ``evaluate = k``: each also asks its site to evaluate round k's model (the one it
        receives, nothing has been aggregated since) before training (``take_evaluations`` reads the replies)."""
        if arrays is not None and len(arrays):  # Strategy.start() hands back what aggregate_train returned
            self.shared.update(C.from_record(arrays))
        if grid is not None and self.profiles:
            self.refresh(grid, server_round)
        stats = self._stats(server_round)
        return [self._message(n, MessageType.TRAIN, server_round, stats, evaluate)
                for n in self.sample(self._reachable(self.train_nodes(), server_round, stats))]

    #: rounds whose RoundStats are kept (the current one and the one before): the recorder writes each round's
    #: row right after it, so older stats would only grow the server's memory with every round
    KEEP_ROUNDS = 2

    def _stats(self, server_round: int) -> RoundStats:
        """This round's stats; those of rounds before the last ``KEEP_ROUNDS`` are dropped."""
        for old in [r for r in self.rounds if r <= server_round - self.KEEP_ROUNDS]:
            del self.rounds[old]
        return self.rounds.setdefault(server_round, RoundStats())

    def take_evaluations(self, eval_round: int, replies: Iterable[Message]) -> list[int]:
        """Round ``eval_round``'s evaluations from training replies (``configure_train(evaluate=...)``); returns the
        nodes that answered without one (an error, a declined round, a failed evaluation): send them an evaluate
        message before the model changes. A malformed evaluation is dropped and logged, as an evaluate reply's."""
        stats = self.rounds.setdefault(eval_round, RoundStats())
        again = []
        for r in replies:
            nid = r.metadata.src_node_id
            if nid not in stats.eval_sent or nid not in self.profiles or nid in again:
                continue
            site = self.profiles[nid].site
            if r.has_error() or C.EVALUATION not in r.content.metric_records:
                again.append(nid)
                continue
            try:
                stats.eval_metrics[site] = eval_metrics(r.content, self.profiles[nid].num_test, C.EVALUATION)
            except Exception as exc:  # noqa: BLE001 - no reply may raise in the server
                self._drop_evaluation(eval_round, stats, site, exc)
        return sorted(again)

    def note_compute(self, server_round: int, replies: Iterable[Message]) -> None:
        """Add one exchange's slowest site compute (what the sites report) to the round's critical path."""
        times = [t for r in replies if (t := site_seconds(r)) is not None]
        if times:
            self.rounds.setdefault(server_round, RoundStats()).compute_s += max(times)

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

    def parse_update(self, reply: Message, expected: Mapping[str, np.dtype] | None) -> Update:
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
        self.check_epsilon(profile.site, metrics)
        arrays = check_packed(content, self.reference_arrays(), expected, finite=False,
                              wire=expected if isinstance(expected, Mapping) else None)
        return Update(profile, arrays, n, metrics)

    def check_epsilon(self, site: str, metrics: Mapping[str, float]) -> None:
        """A DP site's update carries the epsilon its ledger has spent, and that never goes down: a site whose
        epsilon fell has restarted its budget (a ledger deleted or replaced), and its update is refused."""
        eps = metrics.get("train-epsilon")
        if eps is None:
            return
        seen = self.site_epsilon.get(site)
        last = seen[max(seen)] if seen else 0.0
        if eps < last - 1e-9:
            raise BadReply(f"its reported epsilon went down from {last:.4f} to {eps:.4f}: its privacy ledger was "
                           "reset, so its budget is not enforced; the site must restore its ledger (docs/privacy.md)")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self._stats(server_round)
        parsed: list[tuple[Update, int]] = []
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
                parsed.append((update, r.content[C.ARRAYS].count_bytes()))
            except Exception as exc:  # noqa: BLE001 - no reply may raise in the server
                self._reject(server_round, stats, site, exc)
        for n in sorted(set(stats.sent) - seen):
            log.warning("round %d: no reply from %s (timed out or disconnected)", server_round, self.profiles[n].site)
            stats.rejected.append({"site": self.profiles[n].site, "reason": "no reply"})
        # Replies arrive in any order; aggregate in site order so the model never depends on it
        # (float sums are order-sensitive in the last bits, integer buffers come from the first update).
        parsed.sort(key=lambda p: p[0].profile.site)
        parsed = self._cap_examples(server_round, parsed)
        updates = self._batch(server_round, stats, parsed)
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
        # the new model as Flower's API returns it; with float32 transport the next round sends these bytes
        return self._record(self.shared, self._cache("model"), convert=False)[0], MetricRecord(agg)

    def _cap_examples(self, server_round: int, parsed: list[tuple[Update, int]]) -> list[tuple[Update, int]]:
        """Each reply's ``num-examples`` capped at ``server.example_cap`` x the median of the round's *other*
        replies (``cap_examples``), before any method turns counts into weights: a site's own count is only
        bounded by its own announcement, so without this one site announcing 1e9 examples sets the model."""
        cap = self.cfg.server.example_cap
        if cap is None or len(parsed) < 2:
            return parsed
        counts = cap_examples([u.num_examples for u, _ in parsed], cap)
        out = []
        for (u, nbytes), n in zip(parsed, counts):
            if n != u.num_examples:
                log.warning("round %d: %s reports %d examples; weighted as %d (server.example_cap = %g x the median "
                            "of the other sites)", server_round, u.profile.site, u.num_examples, n, cap)
                u = replace(u, num_examples=n)
            out.append((u, nbytes))
        return out

    def _reject(self, server_round: int, stats: RoundStats, site: str, exc: BaseException) -> None:
        reason = rejection(exc)
        log.warning("round %d: rejected update from %s: %s", server_round, site, reason)
        stats.rejected.append({"site": site, "reason": reason})

    @staticmethod
    def _drop_evaluation(server_round: int, stats: RoundStats, site: str, exc: BaseException) -> None:
        """An evaluation that cannot be read (from an evaluate reply or a training reply): logged, recorded."""
        reason = rejection(exc)
        log.warning("round %d: evaluation from %s dropped: %s", server_round, site, reason)
        stats.rejected.append({"site": site, "reason": f"evaluate: {reason}"})

    def layout(self) -> Layout:
        """Where each tensor the server sends sits in a reply's row (shared, then each group's)."""
        ref = self.reference_arrays()
        key = tuple((k, v.shape, v.dtype) for k, v in ref.items())
        if getattr(self, "_layout_key", None) != key:
            self._layout_key, self._layout = key, Layout.of(ref)
        return self._layout

    def _batch(self, server_round: int, stats: RoundStats, parsed: list[tuple[Update, int]]) -> list[Update]:
        """The parsed updates (site order) as the round's :class:`Stack`, those with NaN or inf rejected; each
        accepted update's ``arrays`` become its row of it (a K x P matrix made only if some rule asks for rows)."""
        if not parsed:
            return []
        layout = self.layout()
        # where the round's update is the plain weighted mean (FedAvg and the methods that only choose weights),
        # its sum is taken in the same pass as the NaN/inf check and no K x P matrix is made
        plain = (self.cfg.server.aggregation == "mean" and not self.cfg.privacy.central
                 and type(self).aggregate_shared is KumikiStrategy.aggregate_shared
                 and type(self).combine is KumikiStrategy.combine)
        batch = Stack.read(layout, [u.arrays for u, _ in parsed], lambda: layout.flatten(self.reference_arrays()),
                           weights=self.weights([u for u, _ in parsed]) if plain else None)
        bad = batch.nonfinite()
        for k, name in sorted(bad.items()):
            self._reject(server_round, stats, parsed[k][0].profile.site, BadReply(f"tensor {name}: NaN or inf"))
        keep = [k for k in range(len(parsed)) if k not in bad]
        if bad:
            batch = batch.take(keep)
        updates = []
        for row, k in enumerate(keep):
            update, nbytes = parsed[k]
            update = replace(update, arrays=batch.row(row, tuple(n for n in layout.order if n in update.arrays)))
            updates.append(update)
            stats.bytes_up += nbytes
            stats.train_metrics[update.profile.site] = update.metrics
            self.completed[update.profile.site] = server_round
            if "train-epsilon" in update.metrics:
                self.site_epsilon.setdefault(update.profile.site, {})[server_round] = update.metrics["train-epsilon"]
        return updates

    @staticmethod
    def part(updates: list[Update], names: Iterable[str]) -> Stack:
        """The updates' tensors ``names`` as a :class:`Stack`: a view of the round's matrix where possible."""
        return Stack.of([u.arrays for u in updates], list(names))

    def aggregate(self, updates: list[Update]) -> None:
        """Shared tensors over all updates; each group's tensors over its own sites."""
        if self.cfg.privacy.central:
            self.aggregate_central(updates)
            return
        server = self.cfg.server
        if server.aggregation == "norm_bound":  # a pre-step for every method: cap each update's change
            clipped = clip_to_median_norm(self.part(updates, self.layout().order), self.reference_arrays(),
                                          server.norm_bound)
            updates = [replace(u, arrays=a) for u, a in zip(updates, clipped)]
        if self.shared:
            self.shared = self.aggregate_shared(updates)
        for g in self.group_arrays:
            members = [u for u in updates if u.profile.group == g]
            if members:
                self.group_arrays[g] = self.combine(self.part(members, self.group_arrays[g]), self.weights(members))

    def aggregate_central(self, updates: list[Update]) -> None:
        """``privacy.central``: each part (shared, each group) becomes the noised uniform mean of clipped changes.

        A site's parts are clipped jointly (its change over the shared tensors and its group's, one norm, one
        clip), so the round is one Gaussian release of sensitivity clip per site, however many parts it spans
        (M-Fed's encoder and decoder), and one accountant step counts it. The noise is the server's secret."""
        p = self.cfg.privacy
        self.central_releases += 1
        rng = noise_rng(p, self.cfg.run.seed, self.central_releases)
        parts = [("", self.shared, updates)] + [(g, a, [u for u in updates if u.profile.group == g])
                                                  for g, a in self.group_arrays.items()]
        parts = [(g, ref, members, self.part(members, ref)) for g, ref, members in parts if ref and members]
        joint = joint_norms([(stack, ref) for _, ref, _, stack in parts],
                            [[u.profile.site for u in members] for _, _, members, _ in parts])
        for g, ref, members, stack in parts:
            norms = np.array([joint[u.profile.site] for u in members])
            new = central_dp_mean(stack, ref, p.central_clip, p.central_noise_multiplier, rng, norms)
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

    def combine(self, arrays: Stack | list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        """The method's weighted mean, or the operator's coordinate-wise robust rule (``server.aggregation``)."""
        server = self.cfg.server
        if server.aggregation == "trimmed_mean":
            return trimmed_mean(arrays, server.trim_fraction)
        if server.aggregation == "median":
            return coordinate_median(arrays)
        return weighted_mean(arrays, weights)

    def aggregate_shared(self, updates: list[Update]) -> dict[str, np.ndarray]:
        return self.combine(self.part(updates, self.shared), self.weights(updates))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                           grid: Grid, skip: Iterable[int] = (), only: Iterable[int] | None = None) -> Iterable[Message]:
        """Evaluate messages for every site (``only``: those nodes), except ``skip`` (asked in a training message)."""
        stats = self._stats(server_round)
        skip = set(skip)
        nodes = [n for n in (self.eval_nodes() if only is None else sorted(set(only) & set(self.profiles)))
                 if n not in skip]
        return [self._message(n, MessageType.EVALUATE, server_round, stats)
                for n in self._reachable(nodes, server_round, stats)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        stats = self._stats(server_round)
        for r in replies:
            nid = r.metadata.src_node_id
            site = self.profiles[nid].site if nid in self.profiles else f"node-{nid}"
            try:
                if r.has_error():
                    raise BadReply(f"site error: {r.error.reason}")
                if nid not in stats.eval_sent:
                    raise BadReply("reply from a site that was not asked to evaluate")
                metrics = eval_metrics(r.content, announced_test=self.profiles[nid].num_test)
            except Exception as exc:  # noqa: BLE001 - no reply may raise in the server
                self._drop_evaluation(server_round, stats, site, exc)
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
