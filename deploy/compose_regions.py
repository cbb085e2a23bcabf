"""WorldLM's deployment shape (b) in containers, with a run (`make compose-regions`, or compose_test.py --regions).

One SuperLink per sub-federation, as deploy/compose/region.yml describes, each host its own compose project:

    root server   deploy/compose/server.yml (the root SuperLink behind its proxy; the regions' aggregators
                  register there)
    region-0/1    deploy/compose/region.yml + deploy/regions/<region>.env: the region's SuperLink behind its own
                  proxy (Fleet-only port for its sites, Control on loopback with the region's operator.crt), its
                  ServerApp runner, its aggregator (a SuperNode of the root) and the aggregator's runner (the
                  bridge: it signs the region's app with the region's app-signing.key)
    site-N        deploy/compose/factory.yml with the region's proxy, the region's certificates (its sites verify
                  apps against the region's app-signing.pub) and KUMIKI_NODE_CONFIG="group='<region>'"

It makes the certificates (the root's, with one key per region; each region's, with one key per site) and the
sites' data (deploy/worldlm-regions.toml's synthetic tree: two regions of two sites), starts the root, registers
the aggregators through the root's Control port, starts both regions (healthy = each aggregator connected to the
root), registers every site through its region's Control port and starts it (healthy = connected to its region's
SuperLink), checks the protections of each region (from a site's container, Control API paths through the
region's Fleet port get nginx's 403 and `flwr ls` fails; on the host, the region's Control port refuses a client
without the region's operator.crt), then submits a WorldLM run at the root (`kumiki submit`, signed with the root's
key; --regions-rounds, default 1) and checks its summary.json: every region's sites trained with apps signed as
above. Everything is torn down at the end. The same shape as processes on one machine:
`kumiki run deploy/worldlm-regions.toml --engine regions` (tests/test_bridge.py, tests/test_worldlm_deploy.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "deploy/worldlm-regions.toml"


def region_sites(work: Path) -> dict[str, list[tuple[str, Path]]]:
    """deploy/worldlm-regions.toml's site folders under ``work`` (seeded), by region: {region: [(site, folder)]}."""
    from kumiki import hierarchy
    from kumiki.config import load_config
    from kumiki.data.prepare import materialize

    cfg = load_config(str(ROOT / CONFIG))
    tree = hierarchy.resolve(cfg)
    shutil.rmtree(work, ignore_errors=True)
    out: dict[str, list[tuple[str, Path]]] = {g: [] for g in tree.groups}
    for folder in materialize(cfg, work):
        site = json.loads((folder / "site.json").read_text()).get("name") or folder.name
        out[tree.group_of(site)].append((site, folder))
    return out


def smoke(r) -> str:
    """Run shape (b) with ``r`` (a deploy.compose_test.Runner); always tears its projects down."""
    ct = sys.modules[type(r).__module__]  # deploy/compose_test.py, however it was started
    StepFailed, chown_tree, free_port, wait_until = ct.StepFailed, ct.chown_tree, ct.free_port, ct.wait_until

    work = r.work / "regions"
    work.mkdir(parents=True, exist_ok=True)
    sites = region_sites(work / "data")
    regions = list(sites)
    root_port, root_control = free_port(), free_port()
    ports, controls = {g: free_port() for g in regions}, {g: free_port() for g in regions}
    root_certs, certs = work / "certs-root", {g: work / f"certs-{g}" for g in regions}
    homes = {"root": work / "flwr-root", **{g: work / f"flwr-{g}" for g in regions}}
    all_sites = [s for g in regions for s, _ in sites[g]]
    projects = {"root": f"{r.a.prefix}-regions-root", **{g: f"{r.a.prefix}-{g}" for g in regions},
                **{s: f"{r.a.prefix}-{s}" for s in all_sites}}

    def env(bundle: Path = root_certs, **kw: str) -> dict[str, str]:
        # an operator's flwr CLI (launch/fastpath.py flwr): its certificate for that proxy's Control listener, its
        # app-signing key (the root's: `kumiki submit` signs the root's app with it)
        return r.env(KUMIKI_CONFIGS=str(ROOT / "deploy"), KUMIKI_CLIENT_CERT=str(bundle / "operator.crt"),
                     KUMIKI_CLIENT_KEY=str(bundle / "operator.key"),
                     KUMIKI_APP_SIGNING_KEY=str(bundle / "app-signing.key"), **kw)

    def op(g: str | None) -> dict[str, str]:  # the root's operator, or region g's
        return env(FLWR_HOME=str(homes["root"])) if g is None else env(certs[g], FLWR_HOME=str(homes[g]))

    def flwr_home(home: Path, port: int, ca: Path, name: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
                                          f'address = "localhost:{port}"\nroot-certificates = "{ca}"\n')

    def register(g: str | None, pub: Path, site: str) -> None:
        r.sh([*ct.FLWR, "supernode", "register", str(pub), "kumiki" if g is None else "region", "--name", site],
             120, env=op(g))

    def online(g: str | None) -> int:
        out = r.sh([*ct.FLWR, "supernode", "list", "kumiki" if g is None else "region", "--format", "json"], 120,
                   env=op(g), quiet=True, check=False).stdout
        return out.count('"online"')

    root_env = env(KUMIKI_CERTS=str(root_certs), KUMIKI_RUNS=str(work / "runs"),
                   KUMIKI_SUPERLINK_PUBLISH=str(root_port), KUMIKI_CONTROL_PUBLISH=f"127.0.0.1:{root_control}")
    region_env = {g: env(KUMIKI_ROOT_CERTS=str(root_certs), KUMIKI_REGION_CERTS=str(certs[g]),
                         KUMIKI_ROOT_SUPERLINK=f"host.docker.internal:{root_port}",
                         KUMIKI_REGION_PUBLISH=str(ports[g]), KUMIKI_REGION_CONTROL_PUBLISH=f"127.0.0.1:{controls[g]}")
                  for g in regions}
    site_env = {s: env(KUMIKI_SITE=s, KUMIKI_CERTS=str(certs[g]), KUMIKI_SUPERLINK=f"host.docker.internal:{ports[g]}",
                       KUMIKI_DATA=str(folder), KUMIKI_LOCAL_SITES=str(len(all_sites)),
                       KUMIKI_NODE_CONFIG=f"group='{g}'") for g in regions for s, folder in sites[g]}
    files = {"root": ["-f", str(ROOT / "deploy/compose/server.yml")],
             **{g: ["-f", str(ROOT / "deploy/compose/region.yml"), "--env-file", str(ROOT / f"deploy/regions/{g}.env")]
                for g in regions},
             **{s: ["-f", str(ROOT / "deploy/compose/factory.yml")] for s in all_sites}}
    envs = {"root": root_env, **region_env, **site_env}

    def compose(key: str, *args: str) -> list[str]:
        return ["docker", "compose", "-p", projects[key], *files[key], *args]

    up = ["up", "-d", "--wait", "--wait-timeout", str(r.a.up_timeout)]

    def step(name: str, fn):  # each part of shape (b) timed on its own in compose_test.py's summary
        return r.step_value(f"regions:{name}", fn)

    def make_certs() -> str:
        kumiki = str(Path(sys.executable).parent / "kumiki")
        r.sh([kumiki, "certs", str(root_certs), "--host", "host.docker.internal",
              *sum((["--site", g] for g in regions), [])], 120)
        for g in regions:
            r.sh([kumiki, "certs", str(certs[g]), "--host", "host.docker.internal",
                  *sum((["--site", s] for s, _ in sites[g]), [])], 120)
        (work / "runs").mkdir(exist_ok=True)
        for p in (root_certs, *certs.values(), work / "runs", work / "data"):
            chown_tree(r, p)
        return (f"the root's (aggregator keys {', '.join(regions)}) and each region's (site keys); "
                f"data: {', '.join(f'{g}: {len(sites[g])} sites' for g in regions)}")

    def root_up() -> str:
        flwr_home(homes["root"], root_control, root_certs / "ca.crt", "kumiki")  # the root proxy's Control port
        r.sh(compose("root", *up), r.a.up_timeout + 60, env=root_env)
        wait_until("the root SuperLink answers", 120,
                   lambda: r.sh([*ct.FLWR, "supernode", "list", "kumiki"], 60, env=op(None), quiet=True,
                                check=False).returncode == 0)
        return f"project {projects['root']} healthy: Fleet :{root_port}, Control 127.0.0.1:{root_control}"

    def register_aggregators() -> str:
        for g in regions:  # each region is one site of the root
            register(None, root_certs / "sites" / f"{g}.pub", g)
        return f"{', '.join(regions)} registered at the root"

    def regions_up() -> str:
        r.parallel([(compose(g, *up), region_env[g]) for g in regions], r.a.up_timeout + 60)
        wait_until("both aggregators online at the root", 120, lambda: online(None) == len(regions))
        return f"{len(regions)} region projects healthy; both aggregators online at the root"

    def register_sites() -> str:
        for g in regions:  # the region operator, through the region proxy's Control port (mutual TLS)
            flwr_home(homes[g], controls[g], certs[g] / "ca.crt", "region")
            for s, _ in sites[g]:
                register(g, certs[g] / "sites" / f"{s}.pub", s)
        return f"{len(all_sites)} sites registered, each at its region's Control port"

    def sites_up() -> str:
        r.parallel([(compose(s, *up), site_env[s]) for s in all_sites], r.a.up_timeout + 60)
        for g in regions:
            wait_until(f"{g}'s sites online at its SuperLink", 120, lambda g=g: online(g) == len(sites[g]))
        return "; ".join(f"{g} proxy :{ports[g]} <- {', '.join(s for s, _ in sites[g])} online" for g in regions)

    def teardown() -> str:  # never raises: it runs after a failure too, and must not hide it
        with ThreadPoolExecutor(len(projects)) as pool:
            errors = [e for e in pool.map(lambda k: ct._try(lambda: r.sh(compose(k, "down", "-v", "--timeout", "5"),
                                                                          300, env=envs[k])), projects) if e]
        return f"{len(projects)} projects down -v" + (f"; errors: {errors}" if errors else "")

    try:
        step("certs", make_certs)
        step("root", root_up)
        step("register-aggregators", register_aggregators)
        step("regions", regions_up)
        step("register-sites", register_sites)
        step("sites", sites_up)
        step("protections", lambda: protections(r, ct, regions, sites, projects, ports, op, certs))
        return step("run", lambda: run(r, ct, work, regions, sites, root_env))
    except StepFailed:
        for key in projects:
            r.sh(["docker", "compose", "-p", projects[key], "logs", "--no-color", "--tail", "30"], 120, check=False,
                 env=envs[key])
        raise
    finally:
        step("teardown", teardown)


#: inside a region's site container: Control API paths through the region's Fleet port, then `flwr ls` there
PROBE = r"""
import json, os, ssl, subprocess, sys, urllib.error, urllib.request
host, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context(cafile="/run/secrets/ca.crt")
res = []
for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run"):
    req = urllib.request.Request(f"https://{host}:{port}{path}", data=b"", method="POST",
                                 headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            res.append([path, r.status, r.headers.get("Server", "")])
    except urllib.error.HTTPError as e:
        res.append([path, e.code, e.headers.get("Server", "")])
    except OSError as e:
        res.append([path, "unreachable", str(e)[:120]])
home = "/tmp/kumiki-attacker"
os.makedirs(home, exist_ok=True)
open(home + "/config.toml", "w").write('[superlink]\ndefault = "x"\n[superlink.x]\naddress = "%s:%d"\n'
                                       'root-certificates = "/run/secrets/ca.crt"\n' % (host, port))
p = subprocess.run(["flwr", "ls", "x", "--format", "json"], env={**os.environ, "FLWR_HOME": home},
                   capture_output=True, text=True, timeout=120)
ls_ok = p.returncode == 0 and '"success": false' not in p.stdout + p.stderr
print(json.dumps({"http": res, "flwr_ls": ls_ok}))
"""


def protections(r, ct, regions, sites, projects, ports, op, certs) -> str:
    """Each region is guarded as the root is: from one of its sites' containers, Control API paths through the
    region's Fleet port get nginx's own 403 and `flwr ls` fails; on the host, the region's Control port refuses a
    client without the region's operator certificate (and one with another region's)."""
    wrong = []
    for i, g in enumerate(regions):
        site = sites[g][0][0]
        cid = r.container(projects[site], "supernode")
        out = r.sh(["docker", "exec", cid, "python", "-c", PROBE, "host.docker.internal", str(ports[g])], 300,
                   quiet=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"    {g}, from {site}'s container: {json.dumps(res)}", flush=True)
        wrong += [[g, site, *h] for h in res["http"] if not (h[1] == 403 and "nginx" in h[2])]
        if res["flwr_ls"]:
            wrong.append([g, site, "flwr ls through the Fleet port answered"])
        other = regions[(i + 1) % len(regions)]
        for who, extra in (("no client certificate", {"KUMIKI_CLIENT_CERT": "", "KUMIKI_CLIENT_KEY": ""}),
                           (f"{other}'s operator certificate", {"KUMIKI_CLIENT_CERT": str(certs[other] / "operator.crt"),
                                                                "KUMIKI_CLIENT_KEY": str(certs[other] / "operator.key")})):
            if other == g:
                continue
            p = r.sh([*ct.FLWR, "ls", "region", "--format", "json"], 120, env={**op(g), **extra}, quiet=True,
                     check=False)
            if p.returncode == 0 and '"success": false' not in p.stdout + p.stderr:
                wrong.append([g, f"the Control port answered a client with {who}"])
    if wrong:
        raise ct.StepFailed("a region's Control API answered from where it must not:\n" + json.dumps(wrong, indent=1))
    return (f"each region: Control paths via its Fleet port -> nginx 403, flwr ls there refused, its Control port "
            "refuses other certificates")


def run(r, ct, work: Path, regions, sites, root_env) -> str:
    """A WorldLM run at the root, through every region: it completes, and each region's sites trained."""
    rounds = r.a.regions_rounds
    timeout = r.a.run_timeout
    cmd = [str(Path(sys.executable).parent / "kumiki"), "submit", CONFIG, "kumiki", "--set", f"run.rounds={rounds}",
           "--timeout-s", str(timeout)]
    env = {**root_env, "FLWR_HOME": str(work / "flwr-root")}
    p = r.sh(cmd, timeout + 120, env=env, check=False)
    run_dir = work / "runs" / "worldlm-regions"
    if p.returncode != 0:
        raise ct.StepFailed(f"the WorldLM run at the root failed (exit {p.returncode}); its folder: "
                            f"{sorted(x.name for x in run_dir.iterdir()) if run_dir.is_dir() else 'none'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "ok" or ct.rounds_done(run_dir / "metrics.jsonl") != rounds:
        raise ct.StepFailed(f"{run_dir}: status {summary.get('status')!r}, "
                            f"{ct.rounds_done(run_dir / 'metrics.jsonl')} of {rounds} rounds")
    per = summary.get("time", {}).get("per_round_s")
    return (f"WorldLM run at the root: {rounds} round(s) through {len(regions)} regions, status ok"
            + (f", {per:.0f} s per round" if per else ""))


if __name__ == "__main__":  # python deploy/compose_regions.py [compose_test.py options]
    os.execv(sys.executable, [sys.executable, str(ROOT / "deploy" / "compose_test.py"), "--regions-only",
                              *sys.argv[1:]])
