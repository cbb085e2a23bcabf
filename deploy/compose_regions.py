"""WorldLM's deployment shape (b) in containers: a smoke start (`make compose-regions`, or compose_test.py --regions).

One SuperLink per sub-federation, as deploy/compose/region.yml describes, each host its own compose project:

    root server   deploy/compose/server.yml (the root SuperLink; the aggregators of both regions register there)
    region-0/1    deploy/compose/region.yml + deploy/regions/<region>.env: the region's SuperLink, its ServerApp
                  runner, its aggregator (a SuperNode of the root) and the aggregator's runner
    site-0/2      deploy/compose/factory.yml with the region's SuperLink and KUMIKI_NODE_CONFIG="group='<region>'"

It makes the certificates (the root's, with one key per region; each region's, with one key per site), starts
the root, registers the aggregators, starts both regions (healthy = each aggregator connected to the root),
registers and starts one site per region (healthy = connected to its region's SuperLink), checks every node
online where it belongs, and tears everything down. A full WorldLM run on this shape runs on one machine with
`kumiki run deploy/worldlm-regions.toml --engine regions` (tests/test_bridge.py, tests/test_worldlm_deploy.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGIONS = {"region-0": "site-0", "region-1": "site-2"}  # one site of each region (deploy/worldlm-regions.toml)


def smoke(r) -> str:
    """Run the smoke start with ``r`` (a deploy.compose_test.Runner); always tears its projects down."""
    ct = sys.modules[type(r).__module__]  # deploy/compose_test.py, however it was started
    StepFailed, chown_tree, free_port, wait_until = ct.StepFailed, ct.chown_tree, ct.free_port, ct.wait_until

    work = r.work / "regions"
    work.mkdir(parents=True, exist_ok=True)
    root_port, root_control, ports = free_port(), free_port(), {g: free_port() for g in REGIONS}
    root_certs, certs = work / "certs-root", {g: work / f"certs-{g}" for g in REGIONS}
    homes = {"root": work / "flwr-root", **{g: work / f"flwr-{g}" for g in REGIONS}}
    projects = {"root": f"{r.a.prefix}-regions-root", **{g: f"{r.a.prefix}-{g}" for g in REGIONS},
                **{s: f"{r.a.prefix}-{s}" for s in REGIONS.values()}}

    def env(**kw: str) -> dict[str, str]:
        # the root's operator: its certificate for the root proxy's Control listener (launch/fastpath.py flwr)
        return r.env(KUMIKI_CONFIGS=str(ROOT / "deploy"), KUMIKI_CLIENT_CERT=str(root_certs / "operator.crt"),
                     KUMIKI_CLIENT_KEY=str(root_certs / "operator.key"),
                     KUMIKI_APP_SIGNING_KEY=str(root_certs / "app-signing.key"), **kw)

    def flwr_home(home: Path, port: int, ca: Path, name: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                                          f'address = "localhost:{port}"\nroot-certificates = "{ca}"\n')

    def register(home: Path, name: str, pub: Path, site: str) -> None:
        r.sh([*ct.FLWR, "supernode", "register", str(pub), name, "--name", site],
             120, env=env(FLWR_HOME=str(home)))

    def online(home: Path, name: str) -> int:
        out = r.sh([*ct.FLWR, "supernode", "list", name, "--format", "json"], 120,
                   env=env(FLWR_HOME=str(home)), quiet=True, check=False).stdout
        return out.count('"online"')

    root_env = env(KUMIKI_CERTS=str(root_certs), KUMIKI_RUNS=str(work / "runs"),
                   KUMIKI_SUPERLINK_PUBLISH=str(root_port), KUMIKI_CONTROL_PUBLISH=f"127.0.0.1:{root_control}")
    region_env = {g: env(KUMIKI_ROOT_CERTS=str(root_certs), KUMIKI_REGION_CERTS=str(certs[g]),
                         KUMIKI_ROOT_SUPERLINK=f"host.docker.internal:{root_port}",
                         KUMIKI_REGION_PUBLISH=str(ports[g])) for g in REGIONS}
    site_env = {s: env(KUMIKI_SITE=s, KUMIKI_CERTS=str(certs[g]), KUMIKI_SUPERLINK=f"host.docker.internal:{ports[g]}",
                       KUMIKI_DATA=str(r.work / "data" / "factory-a" / "data"), KUMIKI_LOCAL_SITES="2",
                       KUMIKI_NODE_CONFIG=f"group='{g}'") for g, s in REGIONS.items()}
    files = {"root": ["-f", str(ROOT / "deploy/compose/server.yml")],
             **{g: ["-f", str(ROOT / "deploy/compose/region.yml"), "--env-file", str(ROOT / f"deploy/regions/{g}.env")]
                for g in REGIONS},
             **{s: ["-f", str(ROOT / "deploy/compose/factory.yml")] for s in REGIONS.values()}}
    envs = {"root": root_env, **region_env, **site_env}

    def compose(key: str, *args: str) -> list[str]:
        return ["docker", "compose", "-p", projects[key], *files[key], *args]

    up = ["up", "-d", "--wait", "--wait-timeout", str(r.a.up_timeout)]
    try:
        kumiki = str(Path(sys.executable).parent / "kumiki")
        r.sh([kumiki, "certs", str(root_certs), "--host", "host.docker.internal",
              *sum((["--site", g] for g in REGIONS), [])], 120)
        for g, s in REGIONS.items():
            r.sh([kumiki, "certs", str(certs[g]), "--host", "host.docker.internal", "--site", s], 120)
        (work / "runs").mkdir(exist_ok=True)
        for p in (root_certs, *certs.values(), work / "runs"):
            chown_tree(r, p)
        flwr_home(homes["root"], root_control, root_certs / "ca.crt", "kumiki")  # the root proxy's Control port
        r.sh(compose("root", *up), r.a.up_timeout + 60, env=root_env)
        wait_until("the root SuperLink answers", 120,
                   lambda: r.sh([*ct.FLWR, "supernode", "list", "kumiki"], 60,
                                env=env(FLWR_HOME=str(homes["root"])), quiet=True, check=False).returncode == 0)
        for g in REGIONS:  # each region is one site of the root
            register(homes["root"], "kumiki", root_certs / "sites" / f"{g}.pub", g)
        r.parallel([(compose(g, *up), region_env[g]) for g in REGIONS], r.a.up_timeout + 60)
        wait_until("both aggregators online at the root", 120, lambda: online(homes["root"], "kumiki") == len(REGIONS))
        for g, s in REGIONS.items():
            flwr_home(homes[g], ports[g], certs[g] / "ca.crt", "region")
            register(homes[g], "region", certs[g] / "sites" / f"{s}.pub", s)
        r.parallel([(compose(s, *up), site_env[s]) for s in REGIONS.values()], r.a.up_timeout + 60)
        for g in REGIONS:
            wait_until(f"{REGIONS[g]} online at {g}'s SuperLink", 120, lambda g=g: online(homes[g], "region") == 1)
        return (f"root :{root_port} <- aggregators {', '.join(REGIONS)}; "
                + "; ".join(f"{g} :{ports[g]} <- {s}" for g, s in REGIONS.items()) + ": all connected")
    except StepFailed:
        for key in projects:
            r.sh(["docker", "compose", "-p", projects[key], "logs", "--no-color", "--tail", "30"], 120, check=False,
                 env=envs[key])
        raise
    finally:
        r.parallel([(compose(k, "down", "-v", "--timeout", "5"), envs[k]) for k in projects], 300)


if __name__ == "__main__":  # python deploy/compose_regions.py [compose_test.py options]
    os.execv(sys.executable, [sys.executable, str(ROOT / "deploy" / "compose_test.py"), "--regions-only",
                              *sys.argv[1:]])
