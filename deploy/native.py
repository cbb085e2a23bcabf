"""A long-lived Kumiki federation on one machine with Flower's own commands (the Flower-native path).

For a manual pilot or a rehearsal of deploy/README.md without Docker: a SuperLink, its ServerApp
runner, and one SuperNode + ClientApp runner per factory, all on 127.0.0.1, TLS and SuperNode
authentication on, every process in its own session with its PID recorded. Each command it runs
is printed first (``$ ...``): they are the exact Flower-native commands, which the runbook
shows, and ``tests/test_deploy_flags.py`` parses every one with the pinned Flower's own parsers.

    python deploy/native.py demo-data ROOT              rehearsal data: ROOT/factory-{a,b,c}/data (Fashion-MNIST)
    python deploy/native.py up --data ROOT [--dir D]    certificates, SuperLink, register + start every factory
    python deploy/native.py run deploy/factories.toml   kumiki validate, flwr run, its real status, the report
    python deploy/native.py status                      processes, `flwr supernode list`, `flwr ls`
    python deploy/native.py add-site factory-d --data ROOT     key, register, start (a new factory joins)
    python deploy/native.py remove-site factory-d              revoke (unregister) and stop it
    python deploy/native.py rotate factory-a                   new key, register it, restart, revoke the old
    python deploy/native.py down                        stop every recorded process (state, keys, database stay)

Secure by default as in docs/security.md: with nginx installed (``nginx-light``), the SuperLink listens
on loopback behind ``deploy/proxy.py``'s proxy: factories dial its Fleet-only listener (``--listen``,
default 127.0.0.1; 0.0.0.0 for factories on other hosts), the operator's ``flwr`` commands its
Control-only listener on loopback with the operator's client certificate (run through
``launch/fastpath.py flwr``, which presents it and signs the app ``flwr run`` submits), and every
SuperNode runs only apps signed with the operator's key (``KUMIKI_APP_SIGNING_PUB``).

``--dir`` (default ``$KUMIKI_NATIVE_DIR`` or ``~/kumiki-native``) holds ``certs/``, ``flwr/``
(the flwr CLI's ``config.toml``, connection ``kumiki-native``), ``superlink.db``,
``state/<site>/``, ``runs/<name>/``, ``logs/`` and ``processes.json``. The SuperLink keeps its
database, so registered factories survive ``down``/``up``. ``--insecure`` on ``up`` turns TLS and
authentication off (loudly). ``kumiki validate`` runs before anything is submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kumiki.atomic import atomic_json  # noqa: E402
from launch import fastpath  # noqa: E402
from launch.certs import DEFAULT_SITES, CertBundle, make_certs  # noqa: E402
from launch.engines import local  # noqa: E402

FEDERATION = "kumiki-native"
HOST = local.HOST
FASTPATH = str(Path(fastpath.__file__).resolve())
#: Flower's supported knob: how often the server's SuperExec asks for work (once per run)
SERVER_POLL_S = "0.5"


def site_polls(n_sites: int) -> dict[str, str]:
    """Poll intervals for ``n_sites`` factories on this one machine: the local engine's (``Tuning``).

    Every poll is an HTTP request that costs CPU, so on one machine the intervals grow with the
    number of sites; a factory on a host of its own keeps the images' defaults (0.2 s / 0.1 s)."""
    t = local.Tuning().resolved(n_sites)
    return {"KUMIKI_SUPERNODE_POLL_S": os.environ.get("KUMIKI_SUPERNODE_POLL_S", str(t.supernode_poll_s)),
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(t.superexec_poll_s)}


# --------------------------------------------------------------------------- the federation's files
class Deployment:
    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        self.certs = CertBundle(self.root / "certs", [])
        self.home = self.root / "flwr"
        self.logs = self.root / "logs"
        self.file = self.root / "processes.json"

    def load(self) -> dict:
        return json.loads(self.file.read_text()) if self.file.is_file() else {"processes": {}, "sites": {}}

    def save(self, info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_json(self.file, info, indent=2)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in local._TUNING_ENV}
        env.update(local.FLWR_ENV)
        env.update(FLWR_HOME=str(self.home), PYTHONUNBUFFERED="1",
                   PATH=f"{local.venv_bin()}{os.pathsep}{env.get('PATH', '')}")
        return env

    def operator_env(self, info: dict) -> dict[str, str]:
        """The operator's flwr commands: the client certificate and the app-signing key (secure mode)."""
        return local.operator_env(self.env(), None if info.get("insecure") else self.certs)


# --------------------------------------------------------------------------- the exact commands
def superlink_cmd(d: Deployment, port: int, secure: bool, database: bool = True) -> list[str]:
    sec = local.security_args("superlink", d.certs if secure else None, secret=secure)
    db = ["--database", str(d.root / "superlink.db")] if database else []
    return ["python", FASTPATH, "superlink", *sec, "--isolation", "process", "--host", HOST, "--port", str(port),
            *db, "--disable-runtime-dependency-installation"]


def server_superexec_cmd(d: Deployment, port: int, secure: bool) -> list[str]:
    sec = local.security_args("superexec-server", d.certs if secure else None, secret=secure)
    return ["python", FASTPATH, "superexec", *sec, "--runtime-api-address", f"{HOST}:{port}"]


def supernode_cmd(d: Deployment, site: str, link_port: int, port: int, data: Path, secure: bool,
                  local_sites: int = 1) -> list[str]:
    sec = local.security_args("supernode", d.certs if secure else None, site=site)
    if secure:
        sec += ["--superexec-auth-secret-file", str(d.certs.site_secret(site))]
    # local-sites: the factories share this machine's cores (client/threads.py)
    node_config = {"site": site, "data-dir": str(data), "state-dir": str(d.root / "state" / site),
                   "local-sites": local_sites}
    return ["python", FASTPATH, "supernode", *sec, "--superlink", f"{HOST}:{link_port}", "--isolation", "process",
            "--host", HOST, "--port", str(port), "--node-config", local.config_arg(node_config)]


def site_superexec_cmd(d: Deployment, site: str, port: int, secure: bool) -> list[str]:
    sec = ["--insecure"] + (["--superexec-auth-secret-file", str(d.certs.site_secret(site))] if secure else [])
    return ["python", FASTPATH, "superexec", *sec, "--runtime-api-address", f"{HOST}:{port}"]


def register_cmd(d: Deployment, site: str) -> list[str]:
    return ["flwr", "supernode", "register", str(d.certs.site_pub(site)), FEDERATION, "--name", site]


def unregister_cmd(node_id: int) -> list[str]:
    return ["flwr", "supernode", "unregister", str(node_id), FEDERATION]


def run_cmd(config: Path) -> list[str]:
    return ["flwr", "run", str(ROOT), FEDERATION, "--run-config", f"config={local.toml_str(str(config))}", "--stream"]


# --------------------------------------------------------------------------- processes
def _resolve(cmd: list[str]) -> list[str]:
    if cmd[0] == "flwr":  # through fastpath: presents the operator's certificate, signs what it submits
        return [*local.flwr_cli(), *cmd[1:]]
    head = {"python": sys.executable}.get(cmd[0]) or local.exe(cmd[0])
    return [head, *cmd[1:]]


def quote(arg: str) -> str:
    """Shell quoting that keeps Flower's ``k='v'`` configs readable: ``"site='a' data-dir='/x'"``."""
    import shlex

    if "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def show(cmd: list[str]) -> None:
    print("$ " + " ".join(quote(c) for c in cmd), flush=True)


def start(d: Deployment, info: dict, name: str, cmd: list[str], extra_env: dict[str, str] | None = None,
          cwd: Path | None = None) -> None:
    show(cmd)
    d.logs.mkdir(parents=True, exist_ok=True)
    with open(d.logs / f"{name}.log", "ab") as log:
        p = subprocess.Popen(_resolve(cmd), cwd=str(cwd or d.root), env={**d.env(), **(extra_env or {})},
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info["processes"][name] = {"pid": p.pid, "cmd": cmd}
    d.save(info)


alive = local._group_alive  # a recorded PID is its process group's id (start_new_session)


def stop(d: Deployment, info: dict, names: list[str], grace_s: float = 15.0) -> None:
    for n in names:
        local._signal_group(info["processes"][n]["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(info["processes"][n]["pid"]) for n in names):
        time.sleep(0.1)
    for n in names:
        local._signal_group(info["processes"][n]["pid"], signal.SIGKILL)
        print(f"stopped {n} (pid {info['processes'][n]['pid']})")
        del info["processes"][n]
    d.save(info)


def flwr(d: Deployment, cmd: list[str], check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        show(cmd)
    r = subprocess.run(_resolve(cmd), env=d.operator_env(d.load()), cwd=str(ROOT), capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    out = local._ANSI.sub("", r.stdout + r.stderr)
    if not quiet:
        print(out.rstrip())
    if check and (r.returncode != 0 or '"success": false' in out):
        sys.exit(f"error: {' '.join(cmd[:3])} failed")
    return r


def wait_for(what: str, ok, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            sys.exit(f"error: timed out waiting for {what}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- sites
def register(d: Deployment, info: dict, site: str) -> int:
    """Register ``site``'s public key (once: the SuperLink's database remembers it)."""
    if site in info["sites"] and info["sites"][site].get("node_id"):
        return info["sites"][site]["node_id"]
    show([*register_cmd(d, site), "--format", "json"])
    node_id = local.register_sites(d.certs, [site], d.operator_env(info), federation=FEDERATION)[site]
    print(f"registered {site}: node id {node_id}")
    info["sites"].setdefault(site, {})["node_id"] = node_id
    d.save(info)
    return node_id


def start_site(d: Deployment, info: dict, site: str, data: Path, n_sites: int) -> None:
    if not (data / "site.json").is_file():
        sys.exit(f"error: {data} is not a site folder (no site.json); see kumiki/data/sites.py or `demo-data`")
    secure = not info.get("insecure")
    if secure:
        make_certs(d.certs.root, [site])
        register(d, info, site)
    port = info["sites"].get(site, {}).get("port") or local.free_ports(1)[0]
    info["sites"].setdefault(site, {}).update(port=port, data=str(data))
    (d.root / "state" / site).mkdir(parents=True, exist_ok=True)
    polls = site_polls(n_sites)
    env = {"KUMIKI_SUPERNODE_POLL_S": polls["KUMIKI_SUPERNODE_POLL_S"]}
    if secure:  # only apps signed with the operator's key run here (launch/fastpath.py, app-verify)
        env["KUMIKI_APP_SIGNING_PUB"] = str(d.certs.app_signing_pub)
    log = d.logs / f"supernode-{site}.log"
    name = f"supernode-{site}"
    # A SuperNode that was killed (not stopped) stays "online" on the SuperLink until its heartbeat
    # expires (2 x 30 s in flwr 1.41); until then its key is refused ("Failed to activate SuperNode").
    deadline = time.monotonic() + 90
    while True:
        seen = log.stat().st_size if log.exists() else 0  # logs are appended to across up/down
        start(d, info, name, supernode_cmd(d, site, info.get("fleet_port") or info["superlink_port"], port, data,
                                           secure, n_sites), env)
        wait_for(f"{site} to connect (see {log})",
                 lambda: "SuperNode ID:" in log.read_bytes()[seen:].decode(errors="replace")
                 or not alive(info["processes"][name]["pid"]))
        if alive(info["processes"][name]["pid"]):
            break
        text = log.read_bytes()[seen:].decode(errors="replace")
        if "Failed to activate SuperNode" not in text or time.monotonic() > deadline:
            sys.exit(f"error: the SuperNode of {site} exited:\n{local.tail(log, 20)}")
        print(f"{site}: its previous session is still open on the SuperLink; retrying in 5 s (at most 90 s)")
        del info["processes"][name]
        time.sleep(5)
    start(d, info, f"superexec-{site}", site_superexec_cmd(d, site, port, secure),
          {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": polls["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]})
    print(f"{site} connected")


def start_proxy(d: Deployment, info: dict, nginx: str, link_port: int, listen: str, fleet_port: int,
                control_port: int) -> None:
    """nginx from deploy/proxy.py's config: factories on ``listen:fleet_port`` (Fleet API only), the operator on
    loopback ``control_port`` (Control API only, mutual TLS)."""
    conf = d.root / "proxy" / "nginx.conf"
    cmd = ["python", str(ROOT / "deploy" / "proxy.py"), "--certs", str(d.certs.root), "--superlink",
           f"{HOST}:{link_port}", "--fleet", f"{listen}:{fleet_port}", "--control", f"{HOST}:{control_port}",
           "--runtime-dir", str(d.root / "proxy"), "--out", str(conf)]
    if os.geteuid() == 0:
        cmd += ["--user", "root"]
    show(cmd)
    (d.root / "proxy").mkdir(parents=True, exist_ok=True)
    subprocess.run(_resolve(cmd), check=True, stdout=subprocess.DEVNULL)
    start(d, info, "proxy", [nginx, "-p", str(d.root / "proxy"), "-c", str(conf), "-e", str(d.root / "proxy" / "error.log")])


# --------------------------------------------------------------------------- commands
def cmd_up(d: Deployment, a) -> None:
    info = d.load()
    if any(alive(p["pid"]) for p in info["processes"].values()):
        sys.exit(f"error: {d.root} is already up (`status` / `down`)")
    info["processes"] = {}
    info["insecure"] = bool(a.insecure)
    info["state"] = a.state
    if a.state == "memory":  # a fresh SuperLink state knows no key: every factory is registered again
        for site in info["sites"].values():
            site.pop("node_id", None)
    sites = a.sites.split(",") if a.sites else list(info["sites"]) or list(DEFAULT_SITES)
    if a.insecure:
        print(f"\n{local.INSECURE_BANNER}\n", file=sys.stderr)
    else:
        print(f"certificates in {d.certs.root} (kumiki certs)")
        make_certs(d.certs.root, sites, a.host or [])
    port = a.port or info.get("superlink_port") or local.free_ports(1)[0]
    info["superlink_port"] = port
    nginx = None if a.insecure else local.nginx_exe()
    if not a.insecure and nginx is None:
        print("WARNING: nginx is not installed (apt-get install nginx-light): the SuperLink's Control API is not "
              "fenced off from the factories' port (docs/security.md)", file=sys.stderr)
    fleet_port = control_port = port
    if nginx:
        fleet_port = info.get("fleet_port") or a.fleet_port or local.free_ports(1)[0]
        control_port = info.get("control_port") or local.free_ports(1)[0]
    info.update(fleet_port=fleet_port, control_port=control_port)
    local._write_flwr_home(d.home, control_port, None if a.insecure else d.certs, FEDERATION,
                           "Written by deploy/native.py: the flwr CLI's connection to this federation.")
    start(d, info, "superlink", superlink_cmd(d, port, not a.insecure, database=a.state == "file"))
    if nginx:
        start_proxy(d, info, nginx, port, a.listen, fleet_port, control_port)
    wait_for(f"the SuperLink on {HOST}:{port}", lambda: all(map(local.port_open, {port, control_port}))
             and (a.listen != HOST or local.port_open(fleet_port)))
    start(d, info, "superexec-serverapp", server_superexec_cmd(d, port, not a.insecure),
          {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SERVER_POLL_S})
    data_root = Path(a.data).resolve()
    for site in sites:
        start_site(d, info, site, Path(info["sites"].get(site, {}).get("data") or data_root / site / "data"),
                   len(sites))
    print(f"\nup: SuperLink {HOST}:{port}"
          f"{f' behind nginx (factories {a.listen}:{fleet_port}, operator {HOST}:{control_port} with operator.crt)' if nginx else ''}"
          f" ({'INSECURE' if a.insecure else 'TLS + SuperNode authentication + signed apps'}), "
          f"{len(sites)} factories; FLWR_HOME={d.home} (connection {FEDERATION!r}); logs in {d.logs}")


def cmd_run(d: Deployment, a) -> None:
    from kumiki.config import ConfigError, load_config, run_config_dict

    info = d.load()
    if not alive(info["processes"].get("superlink", {}).get("pid", -1)):
        sys.exit(f"error: {d.root} is not up (`up` first)")
    # 1. validate before anything is submitted (`kumiki validate` is this same check)
    show(["kumiki", "validate", a.config, *sum((["--set", s] for s in a.set or []), [])])
    try:
        cfg = load_config(a.config, a.set)
    except ConfigError as e:
        sys.exit(f"config error (nothing was submitted):\n{e}")
    running = [s for s in info["sites"] if alive(info["processes"].get(f"supernode-{s}", {}).get("pid", -1))]
    if cfg.total_sites != len(running):
        sys.exit(f"config error (nothing was submitted): data.sites + data.unseen_sites = {cfg.total_sites}, but "
                 f"this federation has {len(running)} factories up ({', '.join(running)}); fix the config")
    out_dir = Path(cfg.run.output_dir)
    resolved = run_config_dict(cfg)
    resolved["run"]["output_dir"] = str(out_dir if out_dir.is_absolute() else d.root / out_dir)
    run_dir = Path(resolved["run"]["output_dir"]) / cfg.run.name
    if run_dir.exists():
        sys.exit(f"error (nothing was submitted): {run_dir} exists; a run never overwrites another: "
                 f"--set run.name=<new name>")
    configs = d.root / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    config_path = configs / f"{cfg.run.name}.json"
    config_path.write_text(json.dumps(resolved, indent=2))
    # 2. submit; flwr run exits 0 even when the run fails, so its status is read back afterwards
    cmd = run_cmd(config_path)
    show(cmd)
    proc = subprocess.Popen(_resolve(cmd), env=d.operator_env(info), cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run_id = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if run_id is None and (m := local._STARTED.search(line)):
            run_id = int(m.group(1))
    proc.wait()
    status = local._flwr_status(d.operator_env(info), run_id, federation=FEDERATION) if run_id else "not started"
    show(["flwr", "ls", FEDERATION, "--run-id", str(run_id), "--format", "json"])
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    print(f"Flower status: {status}; Kumiki status: {summary.get('status', 'no summary.json')}; outputs: {run_dir}")
    # 3. the report (the ServerApp may already have written it; rendering again is harmless)
    if (run_dir / "metrics.jsonl").is_file():
        show(["kumiki", "report", str(run_dir)])
        subprocess.run([str(local.venv_bin() / "kumiki"), "report", str(run_dir),
                        *([] if summary.get("status") == "ok" else ["--partial"])], check=False)
    if status != "finished:completed" or summary.get("status") != "ok":
        sys.exit(1 if summary.get("status") != "incomplete" else 3)


def cmd_status(d: Deployment, a) -> None:
    info = d.load()
    for name, p in info["processes"].items():
        print(f"{name:<28} pid {p['pid']:<8} {'running' if alive(p['pid']) else 'NOT RUNNING'}")
    if alive(info["processes"].get("superlink", {}).get("pid", -1)):
        flwr(d, ["flwr", "supernode", "list", FEDERATION], check=False)
        flwr(d, ["flwr", "ls", FEDERATION], check=False)


def cmd_add_site(d: Deployment, a) -> None:
    info = d.load()
    if f"supernode-{a.site}" in info["processes"]:
        sys.exit(f"error: {a.site} is already up")
    start_site(d, info, a.site, Path(a.data).resolve() / a.site / "data", len(info["sites"]) + 1)


def _revoke(d: Deployment, info: dict, site: str) -> None:
    node_id = info["sites"].get(site, {}).pop("node_id", None)
    if node_id is not None:
        flwr(d, unregister_cmd(node_id))
        d.save(info)


def cmd_remove_site(d: Deployment, a) -> None:
    info = d.load()
    stop(d, info, [n for n in (f"supernode-{a.site}", f"superexec-{a.site}") if n in info["processes"]])
    _revoke(d, info, a.site)
    info["sites"].pop(a.site, None)
    d.save(info)
    print(f"{a.site} removed: its key is unregistered (it can never connect with it again); its state stays in "
          f"{d.root / 'state' / a.site}")


def cmd_rotate(d: Deployment, a) -> None:
    info = d.load()
    site = info["sites"].get(a.site) or sys.exit(f"error: {a.site} is not part of this federation")
    old = site.get("node_id")
    show(["kumiki", "certs", str(d.certs.root), "--site", a.site, "--rotate", a.site])
    make_certs(d.certs.root, [a.site], rotate=[a.site])
    site.pop("node_id", None)
    stop(d, info, [n for n in (f"supernode-{a.site}", f"superexec-{a.site}") if n in info["processes"]])
    if old is not None:
        flwr(d, unregister_cmd(old))  # the old key (and node id) is dead from here on
    start_site(d, info, a.site, Path(site["data"]), len(info["sites"]))
    print(f"{a.site}: new key registered as node {info['sites'][a.site]['node_id']} (was {old}); old key revoked")


def cmd_down(d: Deployment, a) -> None:
    info = d.load()
    names = list(info["processes"])
    sites = [n for n in names if n.startswith(("supernode-", "superexec-")) and n != "superexec-serverapp"]
    stop(d, info, sites)  # first, so each SuperNode can sign off while the SuperLink still listens
    stop(d, info, [n for n in names if n not in sites])
    print(f"down: certificates, the SuperLink database, site state and runs stay in {d.root}")


def cmd_demo_data(d: Deployment, a) -> None:
    """Rehearsal data for the shipped factories: the pilot's garments, one folder per factory."""
    import shutil

    from kumiki.config import load_config
    from kumiki.data.prepare import materialize

    sites = a.sites.split(",") if a.sites else list(DEFAULT_SITES)
    cfg = load_config(str(ROOT / "deploy" / "pilot.toml"),
                      [f"data.sites={len(sites)}", "data.unseen_sites=0", f"data.site_names={json.dumps(sites)}"])
    out = Path(a.root).resolve()
    tmp = out / ".materialize"
    shutil.rmtree(tmp, ignore_errors=True)
    for i, folder in enumerate(materialize(cfg, tmp)):
        meta = json.loads((folder / "site.json").read_text())
        dest = out / sites[i] / "data"
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(dest)
        print(f"{dest}: {meta['domain']} camera, {cfg.data.dataset}")
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default=os.environ.get("KUMIKI_NATIVE_DIR", "~/kumiki-native"),
                    help="the federation's folder (default $KUMIKI_NATIVE_DIR or ~/kumiki-native)")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="certificates, SuperLink, register and start every factory")
    p.add_argument("--data", required=True, help="ROOT holding <site>/data for every factory")
    p.add_argument("--sites", help=f"comma-separated factories (default {','.join(DEFAULT_SITES)})")
    p.add_argument("--port", type=int, help="the SuperLink's port (default: a free one, kept across up/down)")
    p.add_argument("--fleet-port", type=int, help="the proxy's port for factories (default: a free one, kept)")
    p.add_argument("--listen", default=HOST, help="the address the factories' port binds (default 127.0.0.1; "
                                                    "0.0.0.0 for factories on other hosts)")
    p.add_argument("--host", action="append", help="another name for the SuperLink certificate (kumiki certs --host)")
    p.add_argument("--insecure", action="store_true", help="TLS and SuperNode authentication OFF (debugging only)")
    p.add_argument("--state", choices=("file", "memory"), default="file",
                   help="the SuperLink's link state: file (superlink.db: registrations and runs survive a restart; "
                        "default) or memory (faster rounds; every `up` registers the factories again)")
    p = sub.add_parser("run", help="validate CONFIG, submit it with flwr run, report its real status")
    p.add_argument("config")
    p.add_argument("--set", "-s", action="append", help="override a key: --set run.rounds=5")
    sub.add_parser("status", help="processes, registered SuperNodes, runs")
    p = sub.add_parser("add-site", help="a new factory: key, register, start")
    p.add_argument("site")
    p.add_argument("--data", required=True, help="ROOT holding <site>/data")
    p = sub.add_parser("remove-site", help="revoke a factory (unregister its key) and stop it")
    p.add_argument("site")
    p = sub.add_parser("rotate", help="a new key for a factory; the old one is revoked")
    p.add_argument("site")
    sub.add_parser("down", help="stop every recorded process")
    p = sub.add_parser("demo-data", help="rehearsal site folders ROOT/<site>/data from the pilot's dataset")
    p.add_argument("root")
    p.add_argument("--sites", help=f"comma-separated factories (default {','.join(DEFAULT_SITES)})")
    a = ap.parse_args(argv)
    d = Deployment(Path(a.dir))
    {"up": cmd_up, "run": cmd_run, "status": cmd_status, "add-site": cmd_add_site, "remove-site": cmd_remove_site,
     "rotate": cmd_rotate, "down": cmd_down, "demo-data": cmd_demo_data}[a.command](d, a)


if __name__ == "__main__":
    main()
