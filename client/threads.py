"""How many torch threads a site's process computes with: one rule, applied by the ClientApp in every engine.

A site gets its share of the machine: ``max(1, usable cores // sites computing at once on this machine)``,
where the usable cores are the ones this process may run on (its CPU affinity, and a container's CPU quota),
and the number of sites sharing the machine comes from whoever starts the sites:

* the node config ``local-sites`` (the local engine and ``deploy/native.py`` put all their sites on one
  machine; a compose factory sets it with ``KUMIKI_LOCAL_SITES`` when several factories share a host); in a
  simulation the run's ``sim`` block says how many virtual sites Ray runs at once (``local_sites``);
* nothing: the site is alone on its machine (a factory on its own host; the in-process engine, whose sites
  take turns in one process).

Explicit settings win: the node config ``threads`` (``KUMIKI_THREADS`` in compose; 0 = the rule), else
``OMP_NUM_THREADS`` in the process environment (what an operator sets, and what Ray sets for its actors).
Oversubscribing cores is the costly mistake: two sites with torch's default (all cores) each on a 2-core
machine ran a round 3x slower than with one thread each (issue 13).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers with ``cpus:``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), or None if it has none."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # cgroup v2: "<quota|max> <period>"
        if text and text[0] != "max":
            return max(1, math.ceil(int(text[0]) / int(text[1])))
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def _positive(value: Any, what: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0 or str(value).strip() != str(n):
        raise ValueError(f"{what} must be a whole number of at least 0 (got {value!r})")
    return n


def site_threads(node_config: Mapping[str, Any] | None = None, sim: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """Threads for one site's computations (module docstring): node config ``threads``, else
    ``OMP_NUM_THREADS``, else usable cores // sites computing at once on this machine."""
    node_config = node_config or {}
    env = os.environ if env is None else env
    explicit = _positive(node_config.get("threads", 0), "node config threads")
    if explicit:
        return explicit
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        n = _positive(omp, "OMP_NUM_THREADS")
        if n:
            return n
    local = node_config.get("local-sites", (sim or {}).get("local_sites", 1))
    return max(1, (cores or usable_cores()) // max(1, _positive(local, "node config local-sites")))


def apply_site_threads(node_config: Mapping[str, Any] | None = None, sim: Mapping[str, Any] | None = None) -> int:
    """Set torch's intra-op threads by :func:`site_threads` (at every message: cheap, and a process that serves
    several sites, like the in-process engine, gives each the same share). Returns the number."""
    import torch

    n = site_threads(node_config, sim)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
