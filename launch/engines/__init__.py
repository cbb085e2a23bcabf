"""Engines run one validated config: ``inprocess`` (tests), ``simulation`` (Flower/Ray), ``local`` (real processes)."""

from __future__ import annotations

from typing import Any

from kumiki.config import KumikiConfig
from launch.engines.prepare import node_configs, prepare_sites, process_run_dir

__all__ = ["ENGINES", "node_configs", "prepare_sites", "process_run_dir", "run"]

ENGINES = ("simulation", "local", "inprocess", "regions")


def run(cfg: KumikiConfig, engine: str, quiet: bool = False, overwrite: bool = False,
        resume: bool = False, insecure: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on ``engine``; ``overwrite`` moves an earlier run with the same name aside first; ``resume``
    continues the run in ``cfg.run_dir()`` from its last server checkpoint (docs/user-guide.md, "Resuming a run").

    ``insecure`` turns TLS and SuperNode authentication off in the ``local`` engine (the
    other engines open no Flower connection).
    """
    if engine in ("local", "regions"):  # fail before any process starts
        from server.federation import check_reproducible_noise

        check_reproducible_noise(cfg, "deployment")
    bridged = cfg.federation.superlinks == "per_group"
    if bridged != (engine == "regions"):
        raise ValueError("federation.superlinks = 'per_group' runs on --engine regions (a SuperLink per "
                         "sub-federation), and --engine regions needs it" if bridged else
                         "--engine regions runs federation.superlinks = 'per_group' configs only")
    if engine == "regions":
        from launch.engines.regions import run_regions

        return run_regions(cfg, quiet=quiet, overwrite=overwrite, resume=resume, insecure=insecure)
    if engine == "inprocess":
        from launch.engines.inprocess import run_inprocess

        return run_inprocess(cfg, quiet=quiet, overwrite=overwrite, resume=resume)
    if engine == "simulation":
        from launch.engines.simulation import run_sim

        return run_sim(cfg, quiet=quiet, overwrite=overwrite, resume=resume)
    if engine == "local":
        from launch.engines.local import run_local

        return run_local(cfg, quiet=quiet, overwrite=overwrite, resume=resume, insecure=insecure)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
