"""Defensive parsing of everything a site sends, so that no reply can crash or steer the server.

A site is another organisation's machine: its replies are untrusted input. Every
field is parsed here, and anything unexpected raises :class:`BadReply`, which the
strategy logs as a rejection of that one reply:

* tensors: exactly the names the site was sent, each with the dtype and shape it
  was sent with, and finite values (so no int64 or float64 reply changes the
  model's dtype, and no complex NaN slips past a float-only check);
* ``num-examples``: a finite positive integer, at most what the site announced at
  discovery (so no site outweighs the others by claiming 1e12 examples);
* metrics: finite scalars; each task metric within its range (accuracy in [0, 1], perplexity >= 1,
  see ``kumiki/tasks.py``), losses >= 0;
* profiles: a safe site name, a known role and task, bounded example counts, an optional short
  printable domain.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from kumiki import contract as C
from kumiki.data.sites import SITE_NAME_PATTERN
from kumiki.tasks import TASKS, metric_of_key
from kumiki.npy import NpyError, expect, read_npy

#: Flower's ``Array.stype`` for numpy's .npy serialization (the only one a reply may use).
NUMPY_STYPE = "numpy.ndarray"
#: Upper bound on any example count a site may announce (a sanity bound, not a quota).
MAX_EXAMPLES = 10**9
SITE_NAME = re.compile(SITE_NAME_PATTERN)
ROLES = ("train", "unseen")
#: Longest camera/domain description a profile may carry (optional; shown in the report).
MAX_DOMAIN = 64
#: Longest input-scale description (site.json ``inputs`` and the data's range, ``kumiki/data/inputs.py``).
MAX_INPUTS = 200


class BadReply(ValueError):
    """A reply the server must drop; the message says why (it goes to the log and metrics.jsonl)."""


def rejection(exc: BaseException, what: str = "reply") -> str:
    """Why a reply is dropped: a :class:`BadReply`'s own words, else what broke while reading it."""
    return str(exc) if isinstance(exc, BadReply) else f"malformed {what} ({type(exc).__name__}: {exc})"


def _number(value: Any) -> float | None:
    """The value as a float if it is a real scalar number (bool is not a number here), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def positive_int(value: Any, what: str, upper: int = MAX_EXAMPLES) -> int:
    v = _number(value)
    if v is None or not math.isfinite(v) or v != int(v) or v <= 0:
        raise BadReply(f"{what} must be a positive integer, got {value!r}")
    if v > upper:
        raise BadReply(f"{what} = {int(v)} exceeds {upper}")
    return int(v)


def parse_profile(node_id: int, content: Any) -> dict[str, Any]:
    """The fields of a ``query.profile`` reply, validated (site, role, group, num-train, num-test, optional domain
    and input scale)."""
    if C.PROFILE not in content.config_records:
        raise BadReply("profile reply lacks its 'profile' record")
    rec = content[C.PROFILE]
    site, role, group, task = rec.get("site"), rec.get("role"), rec.get("group", ""), rec.get("task", "classification")
    if not isinstance(site, str) or not SITE_NAME.match(site):
        raise BadReply(f"site name {site!r} is not a name (letters, digits, '_', '.', '-'; at most 64)")
    if role not in ROLES:
        raise BadReply(f"site {site}: role {role!r} is not one of {ROLES}")
    if not isinstance(group, str) or len(group) > 128:
        raise BadReply(f"site {site}: group must be a short string")
    if task not in TASKS:
        raise BadReply(f"site {site}: task {task!r} is not one of {tuple(TASKS)}")
    domain = rec.get("domain", "")
    if not isinstance(domain, str) or len(domain) > MAX_DOMAIN or not domain.isprintable():
        raise BadReply(f"site {site}: domain must be a short printable string (at most {MAX_DOMAIN} characters)")
    inputs = rec.get("inputs", "")
    if not isinstance(inputs, str) or len(inputs) > MAX_INPUTS or not inputs.isprintable():
        raise BadReply(f"site {site}: inputs must be a short printable string (at most {MAX_INPUTS} characters)")
    return {"node_id": node_id, "site": site, "role": role, "group": group, "task": task, "inputs": inputs,
            "num_train": positive_int(rec.get("num-train"), f"site {site}: num-train"),
            "num_test": positive_int(rec.get("num-test"), f"site {site}: num-test"),
            "domain": domain}


def check_arrays(arrays: Any, reference: Mapping[str, np.ndarray], expected: Iterable[str], *,
                 wire: Mapping[str, np.dtype] | None = None, finite: bool = True) -> dict[str, np.ndarray]:
    """The reply's tensors as read-only numpy views of its bytes (no copy), or BadReply: exactly the names
    sent, each in the dtype it was sent in (``wire``: name -> dtype; default the reference's) and with the
    reference's shape; finite values, unless ``finite=False`` (the server then checks a whole round's replies
    in one pass, ``Stack.nonfinite``). Complex tensors are always checked here."""
    names = set(arrays.keys())
    expected = set(expected)
    if names != expected:
        raise BadReply(f"reply tensors differ from the ones sent: {sorted(names ^ expected)[:5]}")
    out = {}
    for name in sorted(names):
        array, ref = arrays[name], reference[name]
        dtype = np.dtype(wire.get(name, ref.dtype)) if wire else ref.dtype
        stype = getattr(array, "stype", None)
        if stype != NUMPY_STYPE:
            raise BadReply(f"tensor {name}: serialization {stype!r} is not {NUMPY_STYPE!r}")
        try:
            value = read_npy(array.data, expect(dtype, ref.shape))
        except NpyError as exc:
            raise BadReply(f"tensor {name}: {exc}") from None
        if value.dtype != dtype:
            raise BadReply(f"tensor {name}: dtype {value.dtype} != {dtype} (as sent)")
        if value.shape != ref.shape:
            raise BadReply(f"tensor {name}: shape {value.shape} != {ref.shape}")
        if (value.dtype.kind == "c" or (finite and value.dtype.kind == "f")) and not np.isfinite(value).all():
            raise BadReply(f"tensor {name}: NaN or inf")
        out[name] = value
    return out


def scalar_metrics(rec: Any) -> dict[str, float]:
    """Finite real scalars of a MetricRecord (lists and non-finite values are dropped)."""
    out = {}
    for k, v in rec.items():
        f = _number(v)
        if f is not None and math.isfinite(f):
            out[str(k)] = f
    return out


def train_metrics(content: Any, announced: int) -> tuple[int, dict[str, float]]:
    """``num-examples`` (bounded by the site's announcement) and the scalar training metrics."""
    if C.METRICS not in content.metric_records:
        raise BadReply("reply lacks its 'metrics' record")
    rec = content[C.METRICS]
    n = positive_int(rec.get(C.NUM_EXAMPLES), "num-examples", upper=announced)
    return n, scalar_metrics(rec)


def eval_metrics(content: Any, announced_test: int, record: str = C.METRICS) -> dict[str, float]:
    """An evaluation's metrics (an evaluate reply's ``metrics``, or a train reply's ``evaluation``), range-checked:
    each task metric in its range, losses >= 0, a bounded count."""
    if record not in content.metric_records:
        raise BadReply(f"evaluation reply lacks its {record!r} record")
    rec = content[record]
    positive_int(rec.get(C.NUM_EXAMPLES), "num-examples", upper=announced_test)
    out = {}
    for k, v in rec.items():
        f = _number(v)
        if f is None or not math.isfinite(f):
            raise BadReply(f"metric {k!r} is not a finite number: {v!r}")
        task = metric_of_key(str(k))
        if task is not None and not task.low <= f <= task.high:
            raise BadReply(f"metric {k!r} = {f} is outside [{task.low:g}, {task.high:g}]")
        if k.endswith("-loss") and f < 0:
            raise BadReply(f"metric {k!r} = {f} is negative")
        if k == "safeguard-own" and f not in (0.0, 1.0):  # which model the site serves (client/safeguard.py)
            raise BadReply(f"metric {k!r} = {f} is neither 0 (joined) nor 1 (own)")
        out[str(k)] = f
    return out


#: Longest compute time (s) a reply may report; beyond it the figure is ignored (it only feeds benchmarks).
MAX_SECONDS = 7 * 24 * 3600.0


def site_seconds(reply: Any) -> float | None:
    """Seconds of compute a site reports for one message (``fit-time-s`` + ``eval-time-s``), or None when the reply
    reports none or nonsense. For the round's critical path in metrics.jsonl; never used to weigh anything."""
    try:
        if reply.has_error():
            return None
        total, found = 0.0, False
        for name, key in ((C.METRICS, "fit-time-s"), (C.METRICS, "eval-time-s"), (C.EVALUATION, "eval-time-s")):
            if name in reply.content.metric_records:
                v = _number(reply.content[name].get(key))
                if v is not None and math.isfinite(v) and 0.0 <= v <= MAX_SECONDS:
                    total, found = total + v, True
        return total if found else None
    except Exception:  # noqa: BLE001 - a malformed reply reports nothing
        return None
