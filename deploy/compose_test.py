"""`make compose-test`: deploy/README.md followed with real containers, step for step, then torn down.

On a machine with a Docker engine and Compose v2 (../shared/tools/docker-engine.sh installs both, and
stand-ins for Flower's base images, where no registry is reachable):

    python deploy/compose_test.py                    # the whole runbook, then everything removed
    python deploy/compose_test.py --keep             # leave the four projects up (then: --down)
    python deploy/compose_test.py --regions          # also WorldLM's shape (b): one SuperLink per region, a run

What it does (each step bounded, timed, summarised at the end; the runbook section in brackets; deploy/README.md
"Test this runbook" lists the same steps, tests/test_compose.py checks that):
  preflight the engine and Compose v2 answer, Docker's root has room for the containers
  images    deploy/images.sh wheelhouse (only when deploy/wheelhouse/ holds no wheel), deploy/images.sh build  [2]
  certs     kumiki certs WORK/certs --host host.docker.internal, owned by the containers' uid 49999         [3]
  data      python deploy/native.py demo-data WORK/data: rehearsal site folders for the three factories     [1]
  server    the server host's project kumiki-server (the root docker-compose.yml), healthy: the SuperLink on an
            internal network, the proxy publishing the Fleet port (factories) and the Control port on the
            host's loopback (the operator, mutual TLS)                                                      [4]
  register  flwr supernode register, one per factory, through the Control port with operator.crt           [5, 6]
  factories three projects kumiki-factory-{a,b,c}, each on its own network; a factory reaches only the
            proxy's Fleet port (checked: the SuperLink's and the proxy's container addresses and the Control
            port are unreachable from it); "healthy" = connected to the SuperLink                          [7]
  security:control-api   from factory-a's container, as an attacker there would: Control API paths through
            the Fleet port (with the CA and with verification off) get nginx's 403, `flwr ls` and
            `flwr supernode register` fail, the Control port does not answer; on the host, the Control port
            refuses a client without operator.crt and one with another CA's certificate; no key was added
  security:unsigned-app  an app whose ClientApp writes a marker into each site's state volume, submitted
            unsigned and signed with another key: no marker at any site, every SuperNode logs the refusal,
            the attacker's ServerApp gets only errors back, the factories stay online (and the operator's run,
            next, completes)                                                                               [security]
  run+crash kumiki validate + kumiki submit deploy/factories.toml; mid-run one factory's SuperNode is
            killed (SIGKILL, a crash) and comes back by its restart policy with the same node id          [8, 9]
  report    summary.json status, every round recorded, report.html; kumiki report renders it again        [10]
  down/up   every project down and up: registrations and the factories' state survive
  rerun     the same run.name again: refused with a non-zero exit, then --overwrite: a second run     [8]
  teardown  every project down -v, WORK removed
With --regions (after rerun, the four projects down first) or --regions-only (after images): WorldLM's shape (b),
deploy/compose_regions.py, its parts steps of their own (regions:certs ... regions:teardown).

--security-only stops after the two security steps (both run even if the first fails), then tears down.
--unprotected starts the server and the factories as they were wired before issue 22 (deploy/compose/
unprotected-*.yml: no proxy, the SuperLink's one port published for the factories and the operator; no app
verification at the factories): with --security-only it shows that both security steps FAIL there (exit 1),
the evidence that they test what the protections add.
WORK is a fresh temporary folder (--work to choose one). The projects carry a prefix (--prefix, default
`kumiki`, so the names are the runbook's). Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES = ("factory-a", "factory-b", "factory-c")
UID = 49999  # the images' user (app)
BIN = Path(sys.executable).parent
PYTORCH_INDEX = "https://download.pytorch.org/whl/cpu"


class StepFailed(RuntimeError):
    pass


class Runner:
    """Runs the steps; each one timed, its commands printed, its failure named."""

    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.work = Path(args.work or tempfile.mkdtemp(prefix="kumiki-compose-test-")).resolve()
        self.times: list[tuple[str, float, str]] = []
        self.port = args.port or free_port()
        self.control_port = args.control_port or free_port()
        self.server = f"{args.prefix}-server"
        self.factories = {s: f"{args.prefix}-{s}" for s in SITES}
        self.node_ids: dict[str, int] = {}

    # ------------------------------------------------------------------ plumbing
    def env(self, **extra: str) -> dict[str, str]:
        certs = self.work / "certs"
        # the operator's flwr commands (launch/fastpath.py flwr, also under `kumiki submit`): the client
        # certificate the proxy's Control listener asks for, the key that signs every app submitted
        env = {**os.environ, "FLWR_HOME": str(self.work / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
               "FLWR_DISABLE_UPDATE_CHECK": "1", "KUMIKI_CERTS": str(certs),
               "KUMIKI_CLIENT_CERT": str(certs / "operator.crt"), "KUMIKI_CLIENT_KEY": str(certs / "operator.key"),
               "KUMIKI_APP_SIGNING_KEY": str(certs / "app-signing.key"),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.update(extra)
        return env

    def sh(self, cmd: list[str], timeout: float, check: bool = True, env: dict | None = None, quiet: bool = False,
           input_: str | None = None) -> subprocess.CompletedProcess:
        if not quiet:
            print("$ " + " ".join(_q(c) for c in cmd), flush=True)
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env or self.env(), capture_output=True, text=True, timeout=timeout,
                               input=input_, stdin=None if input_ is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise StepFailed(f"timed out after {timeout:.0f}s: {' '.join(cmd)}\n{_text(e.stdout)}{_text(e.stderr)}")
        out = _strip(r.stdout + r.stderr)
        if not quiet and out.strip():
            print(_indent(out.strip()[-4000:]), flush=True)
        if check and r.returncode != 0:
            raise StepFailed(f"exit {r.returncode}: {' '.join(cmd)}\n{out[-3000:]}")
        return r

    def step(self, name: str, fn, *args) -> None:
        self.step_value(name, fn, *args)

    def step_value(self, name: str, fn, *args):
        """Run one step, timed; its return value is the summary's note (and returned)."""
        print(f"\n===== {name}", flush=True)
        t0 = time.monotonic()
        try:
            value = fn(*args)
        except BaseException:
            self.times.append((name, time.monotonic() - t0, "FAILED"))
            raise
        self.times.append((name, time.monotonic() - t0, str(value or "")))
        return value

    def compose_server(self, *args: str) -> list[str]:
        # the runbook's `docker compose up -d` (the root docker-compose.yml = server.yml + server.env)
        if self.a.unprotected:  # the same server.yml with the pre-issue-22 override (an include cannot be overridden)
            return ["docker", "compose", "-p", self.server, "-f", str(ROOT / "deploy/compose/server.yml"),
                    "-f", str(ROOT / "deploy/compose/unprotected-server.yml"),
                    "--env-file", str(ROOT / "deploy/server.env"), *args]
        return ["docker", "compose", "-p", self.server, "-f", str(ROOT / "docker-compose.yml"), *args]

    def compose_factory(self, site: str, *args: str) -> list[str]:
        extra = ["-f", str(ROOT / "deploy/compose/unprotected-factory.yml")] if self.a.unprotected else []
        return ["docker", "compose", "-p", self.factories[site], "-f", str(ROOT / "deploy/compose/factory.yml"),
                *extra, "--env-file", str(ROOT / f"deploy/sites/{site}.env"), *args]

    def server_env(self) -> dict[str, str]:
        # what an operator sets in deploy/server.env: absolute paths, the published port
        return self.env(KUMIKI_RUNS=str(self.work / "runs"), KUMIKI_SUPERLINK_PUBLISH=str(self.port),
                        KUMIKI_CONTROL_PUBLISH=f"127.0.0.1:{self.control_port}")

    def factory_env(self, site: str) -> dict[str, str]:
        # what an operator sets in deploy/sites/<site>.env; three factories share this host's cores
        return self.env(KUMIKI_SUPERLINK=f"host.docker.internal:{self.port}",
                        KUMIKI_DATA=str(self.work / "data" / site / "data"), KUMIKI_LOCAL_SITES=str(len(SITES)))

    def flwr(self, *args: str, timeout: float = 120, check: bool = True, quiet: bool = False, env: dict | None = None):
        """The operator's flwr CLI (through launch/fastpath.py: it presents operator.crt and signs apps)."""
        return self.sh([*FLWR, *args], timeout, check=check, quiet=quiet, env=env)

    def kumiki(self, *args: str, timeout: float = 120, check: bool = True):
        return self.sh([str(BIN / "kumiki"), *args], timeout, check=check)

    def container(self, project: str, service: str) -> str:
        r = self.sh(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
                     "--filter", f"label=com.docker.compose.service={service}"], 60, quiet=True)
        ids = r.stdout.split()
        if not ids:
            raise StepFailed(f"no container for {project}/{service}")
        return ids[0]

    def health(self, cid: str) -> str:
        r = self.sh(["docker", "inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
                     cid], 60, quiet=True, check=False)
        return r.stdout.strip()

    # ------------------------------------------------------------------ steps
    def preflight(self) -> str:
        info = self.sh(["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}} {{.DockerRootDir}}"], 60)
        _, driver, root = (info.stdout.split() + ["", "", ""])[:3]
        regions = self.a.regions or self.a.regions_only
        if root and (short := disk_shortfall(driver, shutil.disk_usage(root).free, self.a.min_free_gb, regions)):
            raise RuntimeError(f"{root}: {short}")
        v = self.sh(["docker", "compose", "version", "--short"], 60)
        self.work.mkdir(parents=True, exist_ok=True)
        return f"work {self.work}, port {self.port}, compose {v.stdout.strip()}, storage driver {driver}"

    def images(self) -> str:
        env = self.env(PYTHON=str(BIN / "python"))
        if "PIP_EXTRA_INDEX_URL" not in os.environ and not reachable(PYTORCH_INDEX):
            env["PIP_EXTRA_INDEX_URL"] = ""  # images.sh: empty = no extra index (the default one is unreachable)
            print(f"note: {PYTORCH_INDEX} is unreachable from here: PIP_EXTRA_INDEX_URL='' (the configured index only)")
        repaired = repair_stand_in_bases(self)
        wheels = list((ROOT / "deploy" / "wheelhouse").glob("*.whl"))
        if not wheels:
            self.sh(["deploy/images.sh", "wheelhouse"], self.a.build_timeout, env=env)
        t0 = time.monotonic()
        self.sh(["deploy/images.sh", "build"], self.a.build_timeout, env=env)
        sizes = self.sh(["docker", "images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}", "kumiki/*"], 60)
        return (f"{repaired}wheelhouse {'reused' if wheels else 'downloaded'}, build {time.monotonic() - t0:.0f}s; "
                + ", ".join(line for line in sizes.stdout.splitlines() if line.strip()))

    def certs(self) -> str:
        self.kumiki("certs", str(self.work / "certs"), "--host", "host.docker.internal")
        chown_tree(self, self.work / "certs")
        # the operator's flwr CLI: runbook section 5 (the proxy's Control port, on this host's loopback)
        home = self.work / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "kumiki"\n\n[superlink.kumiki]\naddress = "localhost:{self.control_port}"\n'
            f'root-certificates = "{self.work / "certs" / "ca.crt"}"\n')
        return ("CA, SuperLink certificate, three factory keys, operator certificate, app-signing key; "
                f"flwr connection 'kumiki' (localhost:{self.control_port})")

    def data(self) -> str:
        self.sh([str(BIN / "python"), "deploy/native.py", "demo-data", str(self.work / "data")], 600)
        (self.work / "runs").mkdir(exist_ok=True)
        chown_tree(self, self.work / "runs")
        return "rehearsal site folders"

    def server_up(self) -> str:
        self.sh(self.compose_server("up", "-d", "--wait", "--wait-timeout", str(self.a.up_timeout)),
                self.a.up_timeout + 60, env=self.server_env())
        self.sh(self.compose_server("ps"), 60, env=self.server_env())
        # one project whatever the command (runbook section 4): the other documented form names the same project
        names = {json.loads(self.sh(["docker", "compose", *form, "config", "--format", "json"], 60, quiet=True,
                                    env=self.server_env()).stdout)["name"]
                 for form in (["-f", "docker-compose.yml"],
                              ["-f", "deploy/compose/server.yml", "--env-file", "deploy/server.env"])}
        if names != {"kumiki-server"}:
            raise StepFailed(f"the two ways to start the server name different projects: {names}")
        wait_until("the flwr CLI reaches the SuperLink", 120,
                   lambda: self.flwr("supernode", "list", "kumiki", check=False, quiet=True).returncode == 0)
        return (f"SuperLink healthy behind the proxy: Fleet :{self.port}, Control 127.0.0.1:{self.control_port} "
                f"(mutual TLS), project {self.server}")

    def register(self) -> str:
        for site in SITES:
            r = self.flwr("supernode", "register", str(self.work / "certs/sites" / f"{site}.pub"), "kumiki",
                          "--name", site)
            m = re.search(r"SuperNode (\d+) registered", _strip(r.stdout + r.stderr))
            if not m:
                raise StepFailed(f"no node id in the register output for {site}")
            self.node_ids[site] = int(m.group(1))
        self.flwr("supernode", "list", "kumiki", "--format", "json")
        return "node ids " + ", ".join(f"{s}={n}" for s, n in self.node_ids.items())

    def factories_up(self) -> str:
        def up(site: str) -> None:
            self.sh(self.compose_factory(site, "up", "-d", "--wait", "--wait-timeout", str(self.a.up_timeout)),
                    self.a.up_timeout + 60, env=self.factory_env(site))

        with ThreadPoolExecutor(len(SITES)) as pool:
            list(pool.map(up, SITES))
        online = self.online()
        if set(online) != set(self.node_ids.values()):
            raise StepFailed(f"online node ids {online}, registered {self.node_ids}")
        for site in SITES:  # runbook section 7's two checks; "healthy" says it: connected as its registered node id
            self.sh(self.compose_factory(site, "ps"), 60, env=self.factory_env(site))
            r = self.sh(self.compose_factory(site, "exec", "-T", "supernode", "python", "/opt/kumiki/fastpath.py",
                                             "alive"), 60, env=self.factory_env(site))
            if f"node {self.node_ids[site]}" not in r.stdout:
                raise StepFailed(f"{site}'s health check names another node: {r.stdout}")
        return f"3 factories healthy and online; {self.isolation()}"

    def addresses(self, project: str, service: str) -> list[str]:
        cid = self.container(project, service)
        return self.sh(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", cid],
                       60, quiet=True).stdout.split()

    def isolation(self) -> str:
        """A factory reaches the server only through the proxy's published Fleet port: not the SuperLink's or the
        proxy's container addresses, not the Control port (published on the server host's loopback only)."""
        targets = [f"{a}:{p}" for a in self.addresses(self.server, "superlink") for p in (8000,)]
        if not self.a.unprotected:  # --unprotected: no proxy
            targets += [f"{a}:{p}" for a in self.addresses(self.server, "proxy") for p in (8000, 8001)]
        targets.append(f"host.docker.internal:{self.control_port}")
        node = self.container(self.factories["factory-a"], "supernode")
        probe = ("import socket, sys\nfor t in sys.argv[1:]:\n    a, p = t.rsplit(':', 1)\n    try:\n"
                 "        socket.create_connection((a, int(p)), 3)\n        print('REACHED', t)\n"
                 "    except OSError as e:\n        print('refused', t, e)")
        r = self.sh(["docker", "exec", node, "python", "-c", probe, *targets], 120)
        if "REACHED" in r.stdout:
            raise StepFailed(f"factory-a reaches the server other than through the Fleet port: {r.stdout}")
        return f"factory-a reaches none of {', '.join(targets)}"

    def online(self) -> list[int]:
        out = self.flwr("supernode", "list", "kumiki", "--format", "json", quiet=True).stdout
        nodes = json.loads(out[out.index("{"):]).get("nodes", [])
        return sorted(int(n["node-id"]) for n in nodes if n.get("status") == "online")

    # ------------------------------------------------------------------ security (issue 22): the proxy, signed apps
    def attacker_certs(self) -> Path:
        """The attacker's own `kumiki certs`: a CA with an "operator" certificate, an app-signing key, a node key."""
        d = self.work / "attacker"
        if not (d / "app-signing.key").is_file():
            self.kumiki("certs", str(d), "--site", "intruder")
        return d

    def security_control_api(self) -> str:
        """From a factory's network, as an attacker inside factory-a's SuperNode container would try it: Control API
        paths through the Fleet port (with the federation's CA, and with verification off) get nginx's own 403 and
        never reach the SuperLink; `flwr ls` and `flwr supernode register` fail; the Control port does not answer.
        On the server host, the Control port refuses a client without operator.crt and one presenting another CA's
        "operator" certificate. Afterwards no key was added, and the factories are still online."""
        attacker = self.attacker_certs()
        before_nodes, before_runs = self.registered(), self.run_ids()
        node = self.container(self.factories["factory-a"], "supernode")
        fleet = "host.docker.internal"
        paths = ("/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run", "/health")
        plan = {"http": [[fleet, self.port, path, verify] for path in paths for verify in (True, False)]
                + [[fleet, self.control_port, "/v1/control/list-runs", False]],
                "address": f"{fleet}:{self.port}", "pub": (attacker / "sites" / "intruder.pub").read_text()}
        print(f"$ docker exec {node[:12]} python -c ATTACK_CONTROL   # deploy/compose_test.py: {len(plan['http'])} "
              "requests, then flwr ls / flwr supernode register from factory-a's SuperNode container", flush=True)
        r = self.sh(["docker", "exec", node, "python", "-c", ATTACK_CONTROL, json.dumps(plan)], 300, quiet=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(_indent(json.dumps(res)[-3000:]), flush=True)
        wrong = [h for h in res["http"] if h[1] == self.port and not (h[4] == 403 and "nginx" in h[5])]
        wrong += [h for h in res["http"] if h[1] == self.control_port and h[4] != "unreachable"]
        wrong += [f for f in res["flwr"] if f[1]]
        # on the server host: the Control port without the operator's certificate, and with another CA's
        host = []
        for who, extra in (("no client certificate", {"KUMIKI_CLIENT_CERT": "", "KUMIKI_CLIENT_KEY": ""}),
                           ("another CA's operator certificate",
                            {"KUMIKI_CLIENT_CERT": str(attacker / "operator.crt"),
                             "KUMIKI_CLIENT_KEY": str(attacker / "operator.key")})):
            for args in (("ls", "kumiki", "--format", "json"),
                         ("supernode", "register", str(attacker / "sites" / "intruder.pub"), "kumiki", "--format",
                          "json")):
                out = self.flwr(*args, check=False, quiet=True, env=self.env(**extra))
                text = _strip(out.stdout + out.stderr)
                if out.returncode == 0 and '"success": false' not in text:
                    wrong.append([who, " ".join(args[:2]), text[-300:]])
                host.append(f"{who}: {args[0]} refused")
        if wrong:
            raise StepFailed("the Control API answered from where it must not:\n" + json.dumps(wrong, indent=1))
        after_nodes, after_runs = self.registered(), self.run_ids()
        if after_nodes != before_nodes or after_runs != before_runs:
            raise StepFailed(f"the attempts changed the SuperLink: nodes {before_nodes} -> {after_nodes}, "
                             f"runs {before_runs} -> {after_runs}")
        access = self.sh(["docker", "exec", self.container(self.server, "proxy"), "cat",
                          "/tmp/kumiki-proxy/access.log"], 60, quiet=True).stdout
        if '"POST /v1/control/register-node HTTP/1.1" 403' not in access:
            raise StepFailed("the proxy's access log has no 403 for the factory's register-node")
        if set(self.online()) != set(self.node_ids.values()):
            raise StepFailed(f"a factory went offline: {self.online()}")
        n = len(res["http"]) - 1
        return (f"from factory-a: {n} Control/health requests through the Fleet port -> nginx 403 (CA and no "
                f"verification), flwr ls/register refused, Control port unreachable; on the host: {len(host)} "
                "attempts without operator.crt refused; no key added, factories online")

    def run_ids(self) -> set[int]:
        out = self.flwr("ls", "kumiki", "--format", "json", quiet=True).stdout
        return {int(r["run-id"]) for r in json.loads(out[out.index("{"):]).get("runs", [])}

    def security_unsigned_app(self) -> str:
        """The attacker's app (with Control access: here the operator's certificate, as a stolen one would be),
        submitted unsigned and signed with another key. Its ClientApp writes a marker into the site's state volume
        at import time: no marker at any site, each SuperNode logs `kumiki app-verify: refused app`, the attacker's
        ServerApp gets only error replies, and the factories stay online for the operator's run (the next step)."""
        attacker = self.attacker_certs()
        app = _attacker_app().write(self.work / "attacker-app", ATTACKER_CLIENT, ATTACKER_SERVER)
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 5))
        runs = []
        for label, key in (("unsigned", None), ("signed with another key", attacker / "app-signing.key")):
            env = self.env()
            env.pop("KUMIKI_APP_SIGNING_KEY")
            if key is not None:
                env["KUMIKI_APP_SIGNING_KEY"] = str(key)
            r = self.flwr("run", str(app), "kumiki", env=env, timeout=180)
            m = re.search(r"Successfully started run (\d+)", _strip(r.stdout + r.stderr))
            if not m:
                raise StepFailed(f"the attacker's {label} app was not submitted (the Control API refused it?)")
            runs.append(int(m.group(1)))
        answers_dir = self.work / "runs"
        wait_until("the attacker's two ServerApps to have their answers", 240,
                   lambda: len(list(answers_dir.glob("attacker-*.json"))) >= 2, every=2)
        wait_until("the attacker's runs to end", 120, lambda: all(
            not re.match(r"(pending|starting|running)", self.run_status(rid)) for rid in runs), every=2)
        answers = [json.loads(f.read_text()) for f in sorted(answers_dir.glob("attacker-*.json"))]
        problems = []
        if not all(len(a) == len(SITES) and "ok" not in a for a in answers):
            problems.append(f"the attacker's ServerApp got these replies: {answers}")
        for site in SITES:
            ls = self.sh(["docker", "exec", self.container(self.factories[site], "superexec"), "ls", "-a",
                          "/app/state"], 60, quiet=True)
            marks = [f for f in ls.stdout.split() if f.startswith("kumiki-attacker")]
            if marks:
                problems.append(f"{site}: the attacker's ClientApp ran there ({marks})")
            log = self.sh(["docker", "logs", "--since", since, self.container(self.factories[site], "supernode")], 60,
                          quiet=True)
            text = _strip(log.stdout + log.stderr)
            for needle in ("refused app", "it is not signed", "its signature is not the operator key"):
                if needle not in text:
                    problems.append(f"{site}: no '{needle}' in its SuperNode's log")
        if problems:
            raise StepFailed("an app the operator did not sign was not refused:\n" + "\n".join(problems))
        if set(self.online()) != set(self.node_ids.values()):
            raise StepFailed(f"a factory went offline after the refusals: {self.online()}")
        return (f"runs {runs[0]} (unsigned) and {runs[1]} (another key): refused at all {len(SITES)} factories "
                f"(logged, no marker in any state volume, replies {answers[0]}); factories online")

    def run_status(self, run_id: int) -> str:
        out = self.flwr("ls", "kumiki", "--run-id", str(run_id), "--format", "json", quiet=True, check=False).stdout
        try:
            runs = json.loads(out[out.index("{"):]).get("runs") or []
        except ValueError:
            return "unknown"
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def pilot_with_a_crash(self) -> str:
        self.kumiki("validate", "deploy/factories.toml")
        cmd = [str(BIN / "kumiki"), "submit", "deploy/factories.toml", "kumiki",
               "--timeout-s", str(self.a.run_timeout)]
        print("$ " + " ".join(cmd), flush=True)
        log = open(self.work / "run1.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        metrics = self.work / "runs" / "factories" / "metrics.jsonl"
        try:
            wait_until("round 2 of the first run", self.a.run_timeout,
                       lambda: rounds_done(metrics) >= 2 or proc.poll() is not None)
            if proc.poll() is not None:
                raise StepFailed(f"the run ended before round 2:\n{(self.work / 'run1.log').read_text()[-3000:]}")
            victim = "factory-b"
            cid = self.container(self.factories[victim], "supernode")
            t0 = time.monotonic()
            crash(self, cid)
            wait_until(f"{victim}'s SuperNode restarted by its policy and healthy", 240,
                       lambda: self.health(cid) == "healthy" and self.restarts(cid) >= 1, every=2)
            back = time.monotonic() - t0
            if self.node_ids[victim] not in self.online():
                raise StepFailed(f"{victim} came back with another node id: {self.online()}")
            proc.wait(timeout=self.a.run_timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            log.close()
        out = (self.work / "run1.log").read_text()
        print(_indent(_strip(out)[-2500:]))
        if proc.returncode != 0:
            raise StepFailed(f"kumiki submit exited {proc.returncode}")
        summary = self.check_run("factories", 10)
        return f"{victim} back in {back:.0f}s (same node id); status {summary['status']}; {self.per_round(summary)}"

    def restarts(self, cid: str) -> int:
        r = self.sh(["docker", "inspect", "-f", "{{.RestartCount}}", cid], 60, quiet=True, check=False)
        return int(r.stdout.strip() or 0)

    def per_round(self, summary: dict) -> str:
        t = summary.get("time") or {}
        return f"{t['per_round_s']:.1f} s per round" if t.get("per_round_s") else "-"

    def check_run(self, name: str, rounds: int) -> dict:
        run = self.work / "runs" / name
        summary = json.loads((run / "summary.json").read_text())
        if summary.get("status") not in ("ok", "incomplete"):
            raise StepFailed(f"{run}/summary.json: status {summary.get('status')!r}")
        if rounds_done(run / "metrics.jsonl") != rounds:
            raise StepFailed(f"{run}: {rounds_done(run / 'metrics.jsonl')} rounds recorded, expected {rounds}")
        if not (run / "report.html").is_file():
            raise StepFailed(f"{run}: no report.html")
        summary.setdefault("rounds", rounds)
        return summary

    def report(self) -> str:
        self.kumiki("report", str(self.work / "runs" / "factories"))
        return "report.html rendered again on the operator's side"

    def down_up(self) -> str:
        envs = {self.server: self.server_env(), **{p: self.factory_env(s) for s, p in self.factories.items()}}
        self.parallel([(self.compose_factory(s, "down"), envs[p]) for s, p in self.factories.items()], 300)
        self.sh(self.compose_server("down"), 300, env=envs[self.server])
        self.server_up()
        wait_until("registrations kept", 60, lambda: self.registered() == set(self.node_ids.values()))
        self.parallel([(self.compose_factory(s, "up", "-d", "--wait", "--wait-timeout", str(self.a.up_timeout)),
                        envs[p]) for s, p in self.factories.items()], self.a.up_timeout + 60)
        wait_until("the three factories online with their node ids", 120,
                   lambda: set(self.online()) == set(self.node_ids.values()))
        return "down/up: registrations and node ids kept"

    def registered(self) -> set[int]:
        out = self.flwr("supernode", "list", "kumiki", "--format", "json", quiet=True, check=False).stdout
        try:
            nodes = json.loads(out[out.index("{"):]).get("nodes", [])
        except ValueError:
            return set()
        return {int(n["node-id"]) for n in nodes if n.get("status") in ("registered", "online", "offline")}

    def rerun(self) -> str:
        # the same run.name without --overwrite: refused, and the exit status says so (flwr run alone exits 0)
        r = self.kumiki("submit", "deploy/factories.toml", "kumiki", "--timeout-s", "300", timeout=400, check=False)
        if r.returncode == 0:
            raise StepFailed("a second run under the same run.name exited 0")
        if not (self.work / "runs" / "factories" / "summary.json").is_file():
            raise StepFailed("the refused rerun touched the first run's outputs")
        rounds = self.a.rerun_rounds
        self.kumiki("submit", "deploy/factories.toml", "kumiki", "--overwrite", "--set", f"run.rounds={rounds}",
                    "--timeout-s", str(self.a.run_timeout), timeout=self.a.run_timeout + 60)
        summary = self.check_run("factories", rounds)
        aside = sorted(p.name for p in (self.work / "runs").glob("factories.replaced-*"))
        if not aside:
            raise StepFailed("--overwrite did not keep the earlier run aside")
        kept = []
        for site in SITES:  # each factory moved the earlier run's state aside, in its own volume
            cid = self.container(self.factories[site], "superexec")
            ls = self.sh(["docker", "exec", cid, "ls", "/app/state/previous-runs"], 60, check=False, quiet=True)
            if ls.returncode != 0 or not ls.stdout.split():
                raise StepFailed(f"{site}: no previous-runs/ in its state volume after the second run")
            kept.append(f"{site}: {len(ls.stdout.split())}")
        return (f"same name refused (exit {r.returncode}); --overwrite ran ({aside[0]} kept), status "
                f"{summary['status']}; previous-runs/ {', '.join(kept)}")

    def parallel(self, jobs: list[tuple[list[str], dict]], timeout: float) -> None:
        with ThreadPoolExecutor(max(1, len(jobs))) as pool:
            list(pool.map(lambda j: self.sh(j[0], timeout, env=j[1]), jobs))

    def teardown_projects(self) -> list[str]:
        """`down -v` for the server and every factory project, in parallel; the errors, if any."""
        jobs = [(self.compose_factory(s, "down", "-v", "--timeout", "5"), self.factory_env(s)) for s in SITES]
        jobs.append((self.compose_server("down", "-v", "--timeout", "5"), self.server_env()))
        errors = []
        with ThreadPoolExecutor(len(jobs)) as pool:
            for j, e in zip(jobs, pool.map(lambda j: _try(lambda: self.sh(j[0], 300, env=j[1])), jobs)):
                if e:
                    errors.append(f"{j[0][3]}: {e}")
        return errors

    def teardown(self) -> str:
        # --regions-only started none of the runbook's four projects (shape (b) tore its own down)
        errors = [] if self.a.regions_only else self.teardown_projects()
        if not self.a.work:
            shutil.rmtree(self.work, ignore_errors=True)
        if errors:
            raise StepFailed("; ".join(errors))
        return (("" if self.a.regions_only else "4 projects down -v")
                + ("" if self.a.work else ", work folder removed")).lstrip(", ")

    # ------------------------------------------------------------------ WorldLM shape (b)
    def regions(self) -> str:
        import importlib.util

        spec = importlib.util.spec_from_file_location("kumiki_compose_regions", ROOT / "deploy" / "compose_regions.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.smoke(self)

    def summary(self, ok: bool) -> None:
        print("\n===== summary (deploy/compose_test.py)")
        for name, secs, note in self.times:
            print(f"{name:<14} {secs:7.1f}s  {note}")
        total = sum(t for _, t, _ in self.times)
        print(f"{'total':<14} {total:7.1f}s  {'PASSED' if ok else 'FAILED'}")


# ---------------------------------------------------------------------- the attacker's tools
#: the operator's flwr CLI: through launch/fastpath.py (client certificate, app signing)
FLWR = [sys.executable, str(ROOT / "launch" / "fastpath.py"), "flwr"]

#: run inside a factory's SuperNode container: Control API requests through the Fleet port, then the flwr CLI
ATTACK_CONTROL = r"""
import json, os, ssl, subprocess, sys, urllib.error, urllib.request
plan, ca = json.loads(sys.argv[1]), "/run/secrets/ca.crt"
res = {"http": [], "flwr": []}
for host, port, path, verify in plan["http"]:
    ctx = ssl.create_default_context(cafile=ca) if verify else ssl._create_unverified_context()
    req = urllib.request.Request(f"https://{host}:{port}{path}", data=b"", method="POST",
                                 headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            res["http"].append([host, port, path, verify, r.status, r.headers.get("Server", "")])
    except urllib.error.HTTPError as e:
        res["http"].append([host, port, path, verify, e.code, e.headers.get("Server", "")])
    except (OSError, ssl.SSLError) as e:
        res["http"].append([host, port, path, verify, "unreachable", str(e)[:160]])
home = "/tmp/kumiki-attacker"
os.makedirs(home, exist_ok=True)
open(home + "/intruder.pub", "w").write(plan["pub"])
open(home + "/config.toml", "w").write('[superlink]\ndefault = "x"\n[superlink.x]\naddress = "%s"\n'
                                       'root-certificates = "%s"\n' % (plan["address"], ca))
env = {**os.environ, "FLWR_HOME": home}
for args in (["ls", "x", "--format", "json"],
             ["supernode", "register", home + "/intruder.pub", "x", "--format", "json"]):
    p = subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    res["flwr"].append([" ".join(args[:2]), p.returncode == 0 and '"success": false' not in out, out[-300:]])
print(json.dumps(res))
"""

#: at import (the earliest point any of its code runs at a site) it marks the site's state volume
ATTACKER_CLIENT = """from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

Path("/app/state/kumiki-attacker-imported").write_text("the attacker's code ran at this site")
app = ClientApp()


@app.query()
def query(msg, context):
    Path(f"/app/state/kumiki-attacker-ran-{context.node_id}").write_text("pwned")
    return Message(RecordDict(), reply_to=msg)
"""
#: on the server: asks every node, writes the reply codes where the test reads them (the runs volume)
ATTACKER_SERVER = """import json
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=90))
    codes = [r.error.code if r.has_error() else "ok" for r in replies]
    Path(f"/app/runs/attacker-{context.run_id}.json").write_text(json.dumps(codes))
"""


# ---------------------------------------------------------------------- helpers
def _attacker_app():
    """deploy/attacker_app.py (the attacker app's pyproject and folder, shared with tests/test_security.py), loaded
    by path: this script runs as a file (make compose-test) and is loaded by path (bench/compose_rounds.py)."""
    import importlib.util

    name = "kumiki_attacker_app"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / "attacker_app.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


BASES = ("flwr/superlink:1.41.0", "flwr/supernode:1.41.0", "flwr/superexec:1.41.0-py3.11-ubuntu24.04")
#: base images (by image id) whose / was probed traversable on this machine: the probe starts a container, which on
#: Docker's vfs driver copies the whole image (minutes on a loaded host); an image id never changes its content
PROBED = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kumiki" / "compose-test-bases-ok"


def repair_stand_in_bases(r: Runner) -> str:
    """The base images must run as their user (app, uid 49999). The stand-ins that docker-engine.sh builds from a
    debootstrap root imported with `docker import` can have `/` at mode 0700 (its temporary folder's mode): then
    nothing starts as app ("stat /bin/sh: permission denied"). A layer cannot change the mode of `/`, so such a
    base is flattened here (`docker export`), its `/` set to 0755, and imported again under the same tag with the
    same user, workdir, environment and entrypoint; this is said in the output. Flower's official images never
    need it (the fix belongs in docker-engine.sh: chmod 755 the debootstrap root before importing it)."""
    fixed = []
    for tag in BASES:
        label = r.sh(["docker", "image", "inspect", "-f", "{{index .Config.Labels \"kumiki.root-mode\"}}", tag], 60,
                     quiet=True, check=False).stdout.strip()
        if label == "0755":  # repaired here before: no container to start (each costs a copy of the image on vfs)
            continue
        image_id = r.sh(["docker", "image", "inspect", "-f", "{{.Id}}", tag], 60, quiet=True).stdout.strip()
        probed = PROBED / image_id.replace(":", "-")
        if probed.is_file():  # this very image was probed fine on this machine before: no container either
            continue
        # bounded by the build's timeout: on a loaded host a container of a 600 MB image on vfs takes minutes
        probe = r.sh(["docker", "run", "--rm", "--user", "0", "--entrypoint", "stat", tag, "-c", "%a", "/"],
                     r.a.build_timeout, quiet=True)
        if int(probe.stdout.strip()[-1]) & 1:  # others may traverse /
            probed.parent.mkdir(parents=True, exist_ok=True)
            probed.write_text(f"{tag}: / is 0{probe.stdout.strip()}\n")
            continue
        print(f"note: {tag} cannot start as its user (its / is 0{probe.stdout.strip()}): flattening it with / at 0755")
        cfg = json.loads(r.sh(["docker", "image", "inspect", "-f", "{{json .Config}}", tag], 60, quiet=True).stdout)
        changes = ["LABEL kumiki.root-mode=0755", f"USER {cfg.get('User') or 'app'}", f"WORKDIR {cfg.get('WorkingDir') or '/app'}",
                   f"ENTRYPOINT {json.dumps(cfg.get('Entrypoint'))}", *[f"ENV {e}" for e in cfg.get("Env") or []]]
        cid = r.sh(["docker", "create", tag], 600, quiet=True).stdout.strip()
        try:
            export = subprocess.Popen(["docker", "export", cid], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            imp = subprocess.Popen(["docker", "import", *sum((["--change", c] for c in changes), []), "-", tag],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            _root_0755(export.stdout, imp.stdin)
            imp.stdin.close()
            out = imp.stdout.read().decode(errors="replace")
            if export.wait(timeout=60) != 0 or imp.wait(timeout=900) != 0:
                raise StepFailed(f"re-importing {tag} failed: {out}")
        finally:
            _try(lambda: r.sh(["docker", "rm", cid], 600, check=False, quiet=True))  # slow on vfs; never fatal
        fixed.append(tag.split(":")[0])
    return f"repaired stand-in bases ({', '.join(fixed)}: / was 0700); " if fixed else ""


def _root_0755(src, dst) -> None:
    """Copy a tar stream, with its root entry (added if absent) at mode 0755."""
    import tarfile

    with tarfile.open(fileobj=src, mode="r|") as tin, tarfile.open(fileobj=dst, mode="w|") as tout:
        root = tarfile.TarInfo("./")
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        tout.addfile(root)
        for m in tin:
            if m.name in (".", "./", ""):
                continue
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)


def crash(r: Runner, cid: str) -> None:
    """SIGKILL the container's main process from the host: a crash, so the restart policy applies (a
    `docker kill` counts as a manual stop, which the policy leaves alone)."""
    pid = int(r.sh(["docker", "inspect", "-f", "{{.State.Pid}}", cid], 60, quiet=True).stdout.strip())
    if os.geteuid() == 0 and pid > 0:
        print(f"$ kill -9 {pid}   # {cid[:12]}'s SuperNode, from the host")
        os.kill(pid, signal.SIGKILL)
    else:  # not root: the nearest an unprivileged operator gets; compose starts it again
        r.sh(["docker", "kill", cid], 60)
        r.sh(["docker", "start", cid], 60)


def chown_tree(r: Runner, path: Path) -> None:
    """Readable/writable by the containers' user (runbook: `sudo chown -R 49999:49999`)."""
    if os.geteuid() == 0:
        for p in [path, *path.rglob("*")]:
            os.chown(p, UID, UID)
        return
    r.sh(["docker", "run", "--rm", "--user", "0", "--entrypoint", "chown", "-v", f"{path}:/x",
          "kumiki/superlink:0.1.0", "-R", f"{UID}:{UID}", "/x"], 120)


def rounds_done(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    n = 0
    for line in lines:
        try:
            n += json.loads(line).get("kind") == "round"
        except ValueError:
            pass
    return n


def wait_until(what: str, timeout: float, ok, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def disk_shortfall(driver: str, free_bytes: int, min_free_gb: float | None = None,
                   regions: bool = False) -> str | None:
    """Why the Docker root cannot hold the test's containers, or None. On the ``vfs`` storage driver (the shared
    script's, where overlay is unavailable) every container is a full copy of its image: the server host and three
    factories took about 25 GB beyond the images on this machine (a loaded run ran out at 9 and at 13 GB free, in its
    factories step with Docker's bare "no space left on device"). WorldLM's shape (b) starts 21 containers (nine on
    the 2 GB superexec image): a ``--regions-only`` run that started with about 30 GB free filled the disk while its
    four sites came up, so it needs 45 GiB there."""
    vfs_need = 45.0 if regions else 28.0
    need = min_free_gb if min_free_gb is not None else (vfs_need if driver == "vfs" else 4.0)
    if free_bytes >= need * 2**30:
        return None
    return (f"{free_bytes / 2**30:.1f} GiB free, the test needs about {need:.0f} GiB on the {driver or '?'} storage "
            "driver: free space (`docker system prune`, old clones, run outputs) or pass --min-free-gb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def reachable(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=10)
        return True
    except Exception:  # noqa: BLE001 - any failure means: do not send pip there
        return False


def _try(fn) -> str | None:
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001
        return str(e).splitlines()[0]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip(s: str) -> str:
    return _ANSI.sub("", s)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _indent(s: str) -> str:
    return "\n".join("    " + line for line in s.splitlines())


def _q(s: str) -> str:
    import shlex

    return shlex.quote(s)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", help="the test's folder (default: a fresh temporary one, removed at the end)")
    ap.add_argument("--prefix", default="kumiki", help="compose project prefix (default kumiki: the runbook's names)")
    ap.add_argument("--port", type=int, help="the proxy's published Fleet port, factories' side (default: a free one)")
    ap.add_argument("--control-port", type=int, help="the proxy's Control port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--quick", action="store_true",
                    help="the runbook up to the first run and its report (no down/up, no rerun): a loaded machine's check")
    ap.add_argument("--security-only", action="store_true",
                    help="stop after the two security steps (both run, even if the first fails)")
    ap.add_argument("--unprotected", action="store_true",
                    help="the pre-issue-22 wiring (deploy/compose/unprotected-*.yml: no proxy, no app verification):\n"
                         "with --security-only, both security steps are expected to FAIL (exit 1)")
    ap.add_argument("--keep", action="store_true", help="leave everything up (no teardown)")
    ap.add_argument("--regions", action="store_true", help="also start WorldLM's shape (b) (deploy/compose_regions.py)")
    ap.add_argument("--regions-only", action="store_true", help="only the images and WorldLM's shape (b)")
    ap.add_argument("--regions-rounds", type=int, default=1, help="rounds of shape (b)'s WorldLM run (default 1)")
    ap.add_argument("--rerun-rounds", type=int, default=3, help="rounds of the second run (default 3)")
    ap.add_argument("--build-timeout", type=float, default=1800)
    ap.add_argument("--up-timeout", type=int, default=300)
    ap.add_argument("--min-free-gb", type=float, default=None,
                    help="refuse to start below this much free space in Docker's root (default 28 on vfs, else 4)")
    ap.add_argument("--run-timeout", type=float, default=1200)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    r = Runner(a)
    ok = False
    try:
        r.step("preflight", r.preflight)
        r.step("images", r.images)
        if a.regions_only:  # shape (b) makes its own certificates and data
            r.regions()  # its parts are steps of their own (regions:certs, regions:root, ...)
        else:
            r.step("certs", r.certs)
            r.step("data", r.data)
            r.step("server", r.server_up)
            r.step("register", r.register)
            r.step("factories", r.factories_up)
            failed = []
            for name, fn in (("security:control-api", r.security_control_api),
                             ("security:unsigned-app", r.security_unsigned_app)):
                try:
                    r.step(name, fn)
                except StepFailed as e:
                    if not a.security_only:
                        raise
                    print(f"\nFAILED: {e}", file=sys.stderr)
                    failed.append(name)
            if failed:
                raise StepFailed(f"{', '.join(failed)} failed")
            if not a.security_only:
                r.step("run+crash", r.pilot_with_a_crash)
                r.step("report", r.report)
                if not a.quick:
                    r.step("down/up", r.down_up)
                    r.step("rerun", r.rerun)
                if a.regions:  # the runbook's projects first down: shape (b) alone holds nine SuperExec copies
                    r.step("down (for regions)", lambda: "; ".join(r.teardown_projects()) or "4 projects down -v")
                    r.regions()  # its parts are steps of their own (regions:certs, regions:root, ...)
        ok = True
    except StepFailed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        for p in [r.server, *r.factories.values()]:  # what each project logged, for the CI log
            subprocess.run(["docker", "compose", "-p", p, "logs", "--no-color", "--tail", "40"], cwd=ROOT,
                           env=r.env(), timeout=120, check=False, stdin=subprocess.DEVNULL)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        if not a.keep:
            try:
                r.step("teardown", r.teardown)
            except StepFailed as e:
                print(f"teardown: {e}", file=sys.stderr)
                ok = False
        r.summary(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
