"""Flower's simulation engine (Ray): the same ServerApp logic and ClientApp, virtual SuperNodes.

Flower injects only ``partition-id`` into a virtual node's config, so each
message's job carries the ``sim`` block (where the run's site folders are);
site ``partition-id = i`` reads ``site-i``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.threads import site_threads, usable_cores
from launch.engines.prepare import prepare_sites

log = logging.getLogger("kumiki")


def run_sim(cfg, quiet: bool = False, overwrite: bool = False, resume: bool = False) -> dict:
    from launch.rundir import claim_run_dir

    with claim_run_dir(cfg, overwrite, resume):
        return _run_sim(cfg, quiet, resume)


#: Ray 2.55 binds its GCS, raylet and worker gRPC servers to all interfaces and has no option to keep them
#: on loopback (checked: ``_node_ip_address = 127.0.0.1`` moves the advertised address, not the binds).
RAY_EXPOSURE = ("the simulation engine's Ray services listen on all network interfaces (Ray offers no loopback-only "
                "option); use it on a trusted network, or use --engine inprocess (no sockets) or local (127.0.0.1)")


#: Environment variable naming an existing Ray cluster to run on (``ray start --head`` on one machine,
#: ``ray start --address=HEAD:6379`` on the others): "auto", "HEAD:6379" or "ray://HEAD:10001". Unset, the engine
#: starts a private Ray instance on this machine. docs/performance.md, "Past one machine".
RAY_ADDRESS_ENV = "KUMIKI_RAY_ADDRESS"


def ray_init_args() -> dict:
    """``ray.init`` arguments: this machine's CPUs, or the cluster ``KUMIKI_RAY_ADDRESS`` names (its nodes bring
    their own CPUs; Flower places one virtual site per CPU across them)."""
    address = os.environ.get(RAY_ADDRESS_ENV)
    if address:
        return {"address": address, "logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}
    return {"num_cpus": os.cpu_count() or 2, "logging_level": "ERROR", "log_to_driver": False,
            "_node_ip_address": "127.0.0.1", "include_dashboard": False}


def _run_sim(cfg, quiet: bool, resume: bool = False) -> dict:
    from flwr.simulation import run_simulation

    log.warning(RAY_EXPOSURE)

    from client.app import app as client_app
    from server.federation import run_federation

    sim = prepare_sites(cfg, resume)
    # Ray runs one virtual site per CPU it is given: each gets its share of the cores (client/threads.py),
    # and Ray, given that many CPUs per site, runs as many sites at once as fit.
    sim["local_sites"] = min(cfg.total_sites, usable_cores())
    threads = site_threads(None, sim)
    # Ray's AF_UNIX sockets live under RAY_TMPDIR and must stay under 107 bytes: keep it short.
    if "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="kray-", dir="/tmp")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    server_app = ServerApp()
    result: dict = {}

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result.update(run_federation(grid, cfg, sim=sim, engine="simulation", quiet=quiet, resume=resume))

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.total_sites,
        backend_config={"client_resources": {"num_cpus": threads, "num_gpus": 0.0}, "init_args": ray_init_args()},
    )
    if not result:
        summary = cfg.run_dir() / "summary.json"
        if not summary.is_file():
            raise RuntimeError("the simulation ended without writing summary.json; see the log above")
        result = json.loads(summary.read_text())
    return result
