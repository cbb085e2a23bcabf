"""The ``regions`` engine: WorldLM's deployment shape (b) as real processes on 127.0.0.1.

One SuperLink for the root and one per sub-federation, each with its own Flower home, certificates and
registered keys (TLS and SuperNode authentication on unless ``insecure``)::

    root SuperLink  <- one aggregator SuperNode per sub-federation (node config names its region)
    region SuperLink g  <- g's sites' SuperNodes (ordinary Kumiki sites: data dir, state dir, group)

Each aggregator answers the root by running one Flower run per root message on its region's SuperLink
(``client/bridge.py``, ``server/region.py``); its region's state lives in ``<run_dir>/regions/<g>/state``.
With TLS on, apps are signed as in the compose deployment (deploy/compose/region.yml): the root's with the root's
``app-signing.key`` (the aggregators run nothing else), each region's by its bridge with the region's key (its
sites run nothing else). The region SuperLinks are not behind the proxy here (compose puts them behind it).
The root's run is started with ``flwr run`` as on the local engine, and its summary.json comes back (one
entry per sub-federation; the per-site records are each region's ``state/metrics.jsonl``). Every process
is stopped when the run ends, fails or is interrupted (``launch.engines.local._Cluster``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from kumiki import hierarchy
from kumiki.config import KumikiConfig
from launch import fastpath
from launch.certs import make_certs
from launch.engines.prepare import node_configs, prepare_sites, process_run_dir
from launch.engines.local import (FEDERATION, FLWR_ENV, HOST, INSECURE_BANNER, REPO_ROOT, Tuning, _Cluster, _Proc,
                                  _flwr_run, _flwr_status, _log_has, _logs_of, _TUNING_ENV, _wait, _write_flwr_home,
                                  config_arg, default_timeout_s, exe, free_ports, operator_env, port_open,
                                  register_sites, security_args, venv_bin)

REGION_FEDERATION = "region"


def run_regions(cfg: KumikiConfig, quiet: bool = False, *, overwrite: bool = False, resume: bool = False,
                **kw: Any) -> dict[str, Any]:
    from launch.rundir import claim_run_dir

    with claim_run_dir(cfg, overwrite, resume):
        return _run_regions(cfg, quiet, resume=resume, **kw)


def _run_regions(cfg: KumikiConfig, quiet: bool = False, *, insecure: bool = False, timeout_s: float | None = None,
                 ready_timeout_s: float = 120.0, on_start=None, resume: bool = False) -> dict[str, Any]:
    if cfg.federation.superlinks != "per_group":
        raise ValueError("the regions engine runs federation.superlinks = 'per_group' configs")
    tree = hierarchy.resolve(cfg)
    sim = prepare_sites(cfg, resume)
    run_dir, logs, summary_path, resolved = process_run_dir(cfg, resume)
    config_path = run_dir / "resolved_config.json"
    config_path.write_text(json.dumps(resolved, indent=2))

    groups = list(tree.groups)
    sites = {g: [nc for nc in node_configs(cfg, sim) if tree.group_of(nc["site"]) == g] for g in groups}
    tuning = Tuning().resolved(cfg.total_sites + len(groups))
    root_home = run_dir / "flwr"
    homes = {g: run_dir / "regions" / g / "flwr" for g in groups}
    for h in [root_home, *homes.values()]:
        shutil.rmtree(h, ignore_errors=True)
    ports = iter(free_ports(1 + len(groups) + cfg.total_sites + len(groups)))
    root_port, link_ports = next(ports), {g: next(ports) for g in groups}
    root_certs = None if insecure else make_certs(root_home / "certs", groups)
    certs = {g: None if insecure else make_certs(homes[g] / "certs", [nc["site"] for nc in sites[g]]) for g in groups}
    if insecure and not quiet:
        print(f"\n{INSECURE_BANNER}\n", file=sys.stderr)
    _write_flwr_home(root_home, root_port, root_certs)
    for g in groups:
        _write_flwr_home(homes[g], link_ports[g], certs[g], federation=REGION_FEDERATION,
                         note=f"Sub-federation {g}'s SuperLink (written by launch.engines.regions).")

    env = {k: v for k, v in os.environ.items() if k not in _TUNING_ENV}
    env.update(FLWR_ENV)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({"KUMIKI_SUPERNODE_POLL_S": str(tuning.supernode_poll_s), "KUMIKI_PULL_BACKOFF_S": str(tuning.pull_backoff_s),
                "KUMIKI_FORK": "1", "KUMIKI_PRELOAD": ",".join(tuning.preload),
                "KUMIKI_REPLY_POLL_MAX_S": str(tuning.reply_poll_max_s)})
    link_env = {**env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(tuning.server_superexec_poll_s)}
    site_env = {**env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(tuning.superexec_poll_s), "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1"}
    launcher = [sys.executable, str(Path(fastpath.__file__).resolve())]
    cluster = _Cluster(logs)
    if timeout_s is None:  # every root round runs two region runs (train, evaluate) per sub-federation
        timeout_s = default_timeout_s(cfg) + 60.0 * cfg.run.rounds

    def start_link(name: str, port: int, home: Path, crt) -> list[_Proc]:
        e = {**link_env, "FLWR_HOME": str(home)}
        link = cluster.start(name, [exe("flower-superlink"), *security_args("superlink", crt, secret=True),
                                    "--isolation", "process", "--host", HOST, "--port", str(port),
                                    "--disable-runtime-dependency-installation"], e)
        execu = cluster.start(f"superexec-{name}", [*launcher, "superexec", *security_args("superexec-server", crt,
                                                                                           secret=True),
                                                    "--runtime-api-address", f"{HOST}:{port}"], e)
        return [link, execu]

    def start_node(name: str, link_port: int, port: int, home: Path, crt, site: str, nc: dict,
                   signer=None) -> list[_Proc]:
        """A SuperNode of ``crt``'s SuperLink and its SuperExec. With TLS on, the SuperNode runs only apps signed
        with ``crt``'s operator key (launch/fastpath.py app-verify); ``signer`` (a bundle): the SuperExec's
        ClientApps sign what they submit with its key (the bridge's `flwr run` on its region)."""
        e = {**site_env, "FLWR_HOME": str(home)}
        node_env = e if crt is None else {**e, "KUMIKI_APP_SIGNING_PUB": str(crt.app_signing_pub)}
        exec_env = e if signer is None else {**e, "KUMIKI_APP_SIGNING_KEY": str(signer.app_signing_key)}
        node = cluster.start(name, [*launcher, "supernode", *security_args("supernode", crt, site=site, secret=True),
                                    "--isolation", "process", "--superlink", f"{HOST}:{link_port}", "--host", HOST,
                                    "--port", str(port), "--node-config", config_arg(nc)], node_env)
        execu = cluster.start(f"superexec-{name}", [*launcher, "superexec", *security_args("superexec-site", crt,
                                                                                           secret=True),
                                                    "--runtime-api-address", f"{HOST}:{port}"], exec_env)
        node.site = execu.site = site
        return [node, execu]

    try:
        daemons = start_link("superlink-root", root_port, root_home, root_certs)
        for g in groups:
            daemons += start_link(f"superlink-{g}", link_ports[g], homes[g], certs[g])
        for port in [root_port, *link_ports.values()]:
            _wait(f"a SuperLink on {HOST}:{port}", lambda p=port: port_open(p), daemons, ready_timeout_s)
        if root_certs is not None:
            register_sites(root_certs, groups, {**env, "FLWR_HOME": str(root_home)})
            for g in groups:
                register_sites(certs[g], [nc["site"] for nc in sites[g]], {**env, "FLWR_HOME": str(homes[g])},
                               federation=REGION_FEDERATION)
        nodes = []
        for g in groups:
            for nc in sites[g]:
                Path(nc["state-dir"]).mkdir(parents=True, exist_ok=True)
                procs = start_node(f"supernode-{nc['site']}", link_ports[g], next(ports), homes[g], certs[g],
                                   nc["site"], nc)
                nodes.append(procs[0])
                daemons += procs
            region_dir = run_dir / "regions" / g / "state"
            region_dir.mkdir(parents=True, exist_ok=True)
            # the bridge's flwr CLI is launch/fastpath.py flwr (client/bridge.py): it signs the region's app with the
            # region's key, the only key the region's sites accept; the aggregator accepts only the root's
            bridge = {"site": g, "region-federation": REGION_FEDERATION, "region-flwr-home": str(homes[g]),
                      "region-config": str(config_path), "region-dir": str(region_dir), "region-app": str(REPO_ROOT),
                      "region-timeout-s": cfg.server.round_timeout_s}
            procs = start_node(f"aggregator-{g}", root_port, next(ports), root_home, root_certs, g, bridge,
                               signer=certs[g])
            procs[0].site = procs[1].site = None  # an aggregator that dies ends the run (its region's state is safe)
            nodes.append(procs[0])
            daemons += procs
        for p in nodes:
            _wait(f"{p.name} to connect", _log_has(p, "SuperNode ID:"), daemons, ready_timeout_s)
        if not quiet:
            print(f"regions engine: root SuperLink {HOST}:{root_port}; "
                  + "; ".join(f"{g}: SuperLink {HOST}:{link_ports[g]}, {len(sites[g])} sites" for g in groups)
                  + f"; logs in {logs}", file=sys.stderr)
        if on_start is not None:
            on_start([p.popen.pid for p in cluster.procs])
        root_env = operator_env({**env, "FLWR_HOME": str(root_home)}, root_certs)  # signs the root's app
        run_id = _flwr_run(cluster, root_env, config_path, quiet, timeout_s, daemons, None, resume)
        status = _flwr_status(root_env, run_id, federation=FEDERATION) if run_id is not None else "not started"
        recorded = json.loads(summary_path.read_text()).get("status") if summary_path.is_file() else None
        if status != "finished:completed" or recorded in (None, "failed"):
            raise RuntimeError(f"the root's Flower run {run_id} ended with status {status!r}"
                               f"{' and wrote no summary.json' if recorded is None else f', recorded as {recorded!r}'}"
                               f"; logs in {logs}\n" + _logs_of([p for p in cluster.procs if p.name == "flwr-run"], 40)
                               + _logs_of([p for p in cluster.procs if p.name.startswith(("aggregator", "superexec-ag"))],
                                          15))
        return json.loads(summary_path.read_text())
    finally:
        cluster.stop_all()
