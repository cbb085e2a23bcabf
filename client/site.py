"""Who this site is and where its data and state live.

Deployment: the SuperNode's node config names everything::

    --node-config "site='factory-a' data-dir='/data' state-dir='/state' group='eu'"

(``state-dir`` defaults to ``<data-dir>/state``; ``site``, ``role`` default to
``site.json``). Simulation: Flower injects only ``partition-id``; the job's
``sim`` block says where the run materialized the site folders (``site_dirs``: partition i's folder).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from kumiki.data.sites import SiteData, check_against_model, load_site, site_name


@dataclass(frozen=True)
class SiteInfo:
    name: str
    role: str  # "train" | "unseen"
    group: str
    data_dir: Path
    state_dir: Path


#: folder -> (train.npz's mtime, its data), least recently used first; bounded by ``CACHE_BYTES``
_CACHE: OrderedDict[str, tuple[float, SiteData]] = OrderedDict()
#: Site data one process keeps in memory (a SuperNode holds one site; an in-process or simulation worker many)
CACHE_BYTES = int(os.environ.get("KUMIKI_SITE_CACHE_BYTES", 2 << 30))


def resolve(node_config: dict, sim: dict | None, model=None, method=None) -> tuple[SiteInfo, SiteData]:
    """Who this site is and its data; with ``model`` (a ModelSpec), the data must fit that model; with ``method``
    (a MethodConfig), the method fills in a group the site does not name (M-Fed: its task's group)."""
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"]))
        state_dir = Path(str(node_config.get("state-dir", data_dir / "state")))
    elif sim is not None and "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        dirs = sim.get("site_dirs")
        folder = dirs[pid] if dirs and 0 <= pid < len(dirs) else site_name(pid)
        data_dir = Path(sim["sites_root"]) / folder
        state_dir = Path(sim["state_root"]) / folder
    else:
        raise ValueError("this SuperNode has no data: start it with --node-config \"data-dir='/path/to/site'\"")
    data = load_cached(data_dir)
    group = str(node_config.get("group", data.meta.get("group", "")))
    info = SiteInfo(
        name=str(node_config.get("site", data.name)),
        role=str(node_config.get("role", data.role)),
        group=method.site_group(data.task, group) if method is not None else group,
        data_dir=data_dir,
        state_dir=state_dir,
    )
    if info.role not in ("train", "unseen"):
        raise ValueError(f"site {info.name}: role must be 'train' or 'unseen', not {info.role!r}")
    if model is not None:
        check_against_model(data, model.input_shape, model.num_classes, str(data_dir))
    return info, data


def load_cached(data_dir: Path) -> SiteData:
    """Site data is read-only; a process that serves many messages reads it once (again when the folder's
    train.npz changes). At most ``CACHE_BYTES`` of it stay in memory: the least recently used site goes first,
    so a process serving many runs or sites does not grow without bound."""
    meta = data_dir / "train.npz"
    key, mtime = str(data_dir.resolve()), meta.stat().st_mtime if meta.exists() else 0.0
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == mtime:
        _CACHE.move_to_end(key)
        return hit[1]
    data = load_site(data_dir)
    _CACHE[key] = (mtime, data)
    _CACHE.move_to_end(key)
    total = sum(_nbytes(d) for _, d in _CACHE.values())
    while total > CACHE_BYTES and len(_CACHE) > 1:
        _, (_, old) = _CACHE.popitem(last=False)
        total -= _nbytes(old)
    return data


def _nbytes(d: SiteData) -> int:
    return sum(getattr(a, "nbytes", 0) for a in (d.x_train, d.y_train, d.x_test, d.y_test))
