"""Engines run one validated config: ``inprocess`` (tests), ``simulation`` (Flower/Ray), ``local`` (real processes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kumiki.config import KumikiConfig
from kumiki.data.sites import materialize, site_name

ENGINES = ("simulation", "local", "inprocess")


def prepare_sites(cfg: KumikiConfig) -> dict[str, Any]:
    """Materialize the run's site folders and give every site a fresh state dir.

    A new run starts from fresh site state; a real deployment keeps its state dirs.
    Returns the ``sim`` block sites use to find their folders.
    """
    run_dir = cfg.run_dir().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    state_root = run_dir / "state"
    if state_root.exists():
        shutil.rmtree(state_root)
    if cfg.data.dataset == "site-folders":
        sites_root = Path(cfg.data.path).resolve()
    else:
        sites_root = run_dir / "sites"
        materialize(cfg, sites_root)
    # privacy ledgers outlive runs: every run over the same records adds to the same budget
    privacy_root = run_dir.parent / ".kumiki-privacy"
    return {"sites_root": str(sites_root), "state_root": str(state_root), "privacy_root": str(privacy_root)}


def node_configs(cfg: KumikiConfig, sim: dict[str, Any]) -> list[dict[str, Any]]:
    """One node config per site, as a deployment would pass with --node-config."""
    return [
        {"site": site_name(i), "data-dir": f"{sim['sites_root']}/{site_name(i)}", "state-dir": f"{sim['state_root']}/{site_name(i)}",
         **({"privacy-dir": f"{sim['privacy_root']}/{site_name(i)}"} if "privacy_root" in sim else {})}
        for i in range(cfg.total_sites)
    ]


def run(cfg: KumikiConfig, engine: str, quiet: bool = False, overwrite: bool = False,
        insecure: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on ``engine``; ``overwrite`` moves an earlier run with the same name aside first.

    ``insecure`` turns TLS and SuperNode authentication off in the ``local`` engine (the
    other engines open no Flower connection).
    """
    if engine == "inprocess":
        from launch.engines.inprocess import run_inprocess

        return run_inprocess(cfg, quiet=quiet, overwrite=overwrite)
    if engine == "simulation":
        from launch.engines.simulation import run_sim

        return run_sim(cfg, quiet=quiet, overwrite=overwrite)
    if engine == "local":
        from launch.engines.local import run_local

        return run_local(cfg, quiet=quiet, overwrite=overwrite, insecure=insecure)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
