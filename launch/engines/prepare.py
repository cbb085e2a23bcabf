"""What every engine prepares before it starts a run: the site folders, each site's node config, the run dir.

Its own module below the engines (``launch.engines`` dispatches to them, they all use this), so no engine
imports the package that imports it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kumiki.config import KumikiConfig, run_config_dict
from kumiki.data.sites import site_folders
from kumiki.data.prepare import materialize, partitioned_names


def prepare_sites(cfg: KumikiConfig, resume: bool = False) -> dict[str, Any]:
    """Materialize the run's site folders and give every site a fresh state dir.

    A new run starts from fresh site state; a resumed run (``resume``) keeps every site's state dir, as a real
    deployment does, and reuses the site folders it materialized. Returns the ``sim`` block sites use to find
    their folders (``site_dirs``: one folder name per site, training sites first).
    """
    run_dir = cfg.run_dir().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    state_root = run_dir / "state"
    if state_root.exists() and not resume:
        shutil.rmtree(state_root)
    if cfg.data.dataset == "site-folders":
        sites_root = Path(cfg.data.path).resolve()
        dirs = site_folders(sites_root, cfg.data.sites, cfg.data.unseen_sites)
    else:
        sites_root = run_dir / "sites"
        dirs = partitioned_names(cfg.data)
        if not (resume and all((sites_root / d / f).is_file() for d in dirs for f in ("site.json", "train.npz", "test.npz"))):
            materialize(cfg, sites_root)  # seeded: a resumed run would write the same folders
    # privacy ledgers outlive runs: every run over the same records adds to the same budget
    privacy_root = run_dir.parent / ".kumiki-privacy"
    return {"sites_root": str(sites_root), "state_root": str(state_root), "privacy_root": str(privacy_root),
            "site_dirs": dirs}


def process_run_dir(cfg: KumikiConfig, resume: bool) -> tuple[Path, Path, Path, dict[str, Any]]:
    """What an engine of real processes prepares in the run dir: (run dir, its logs/, summary.json, the resolved
    config with an absolute output_dir). A fresh run starts with empty logs; only this run's summary.json counts
    as its success, so an earlier one is removed."""
    run_dir = cfg.run_dir().resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in [] if resume else logs.glob("*.log"):
        old.unlink()
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    resolved = run_config_dict(cfg)
    resolved["run"]["output_dir"] = str(run_dir.parent)
    return run_dir, logs, summary_path, resolved


def _site_json_name(folder: Path) -> str:
    try:
        return str(json.loads((folder / "site.json").read_text()).get("name") or folder.name)
    except (OSError, ValueError):
        return folder.name  # the site itself reports the bad file when it loads it


def node_configs(cfg: KumikiConfig, sim: dict[str, Any]) -> list[dict[str, Any]]:
    """One node config per site, as a deployment would pass with --node-config.

    The site's name is the one its site.json gives (what a deployment's operator would pass as ``site``), so
    logs, metrics and the report name the factories as their folders do, never by position.
    """
    from kumiki import hierarchy

    dirs = sim.get("site_dirs") or partitioned_names(cfg.data)
    tree = hierarchy.resolve(cfg)
    out = []
    for d in dirs:
        name = _site_json_name(Path(sim["sites_root"]) / d)
        nc = {"site": name, "data-dir": f"{sim['sites_root']}/{d}", "state-dir": f"{sim['state_root']}/{name}"}
        if tree is not None and tree.group_of(name):  # the site's sub-federation, as an operator passes it
            nc["group"] = tree.group_of(name)
        if "privacy_root" in sim:
            nc["privacy-dir"] = f"{sim['privacy_root']}/{name}"
        out.append(nc)
    return out
