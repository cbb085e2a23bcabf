"""Local deployment engine: the real Flower deployment topology as processes on 127.0.0.1.

One ``flower-superlink``, one ``flower-supernode`` per site (each with its own
Runtime API port and a ``--node-config`` naming the site, its data dir and its
state dir), a SuperExec per SuperLink/SuperNode to run the ServerApp and the
ClientApps, then ``flwr run <repo> kumiki-local --stream`` submits the app with
``config='<run_dir>/resolved_config.json'`` as the only run_config key.
Everything runs under an isolated Flower home (``<run_dir>/flwr``: connection
config, SuperLink database, installed FABs) and logs to ``<run_dir>/logs/``.

Process hygiene: every process is started in its own process group (session),
whose id is the PID we recorded; stopping a group also stops the SuperExec,
``flwr-clientapp`` and ``flwr-serverapp`` children in it. ``_Cluster.stop_all``
runs in a ``finally:`` (errors, timeouts and Ctrl-C included): SIGTERM to each
group, a bounded wait, then SIGKILL.

Latency (see ``Tuning``; ``Tuning.stock()`` turns all of it off). A Flower 1.41
deployment round is dominated by fixed poll sleeps, retry back-offs and one
fresh ``flwr-clientapp`` interpreter per message (each imports flwr, torch and,
through ``torch.optim``, ``torch._dynamo``: ~5 s of CPU per training message).
What this engine does about it:

* ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (a knob flwr honours; default 1 s). Polls
  are HTTP requests that cost CPU even when idle, so intervals scale with the
  number of sites (``Tuning.resolved``).
* ``ReplyPollingGrid`` in ``server/app.py``: the ServerApp polls for replies every
  50-500 ms instead of HttpGrid's fixed 3 s.
* warm SuperExecs: the SuperLink and SuperNodes run with ``--isolation process``
  (the layout docker-compose.yml uses) and their SuperExec is flwr's own
  ``flower-superexec`` entry point started from a process that has torch/flwr
  imported; it forks each ``flwr-clientapp``/``flwr-serverapp`` (the stock CLI
  functions, same arguments) instead of exec'ing a new interpreter. The app is
  still installed from the FAB and imported fresh in every child.
* the SuperNode's fixed ``time.sleep(3)`` between idle Fleet pulls, its 0.5 s
  reply wait, and the 1 s initial back-off of object pulls (a message is pulled
  before its tensors have arrived, in every hop) have no flag in flwr 1.41; our
  launchers lower them at start-up (``_tune`` in ``_LAUNCHER``). Nothing under
  site-packages is modified; if the flwr internals change, they say so in the
  log and run stock.
* ``OMP_NUM_THREADS=1`` for site processes, so concurrent ClientApps do not
  oversubscribe a small machine.

TLS and SuperNode authentication are not implemented yet: ``security_args`` is
the single place that builds the insecure flags and will add ``--ssl-*``,
``--root-certificates``, ``--auth-supernode-private-key`` (plus the
``flwr supernode register`` step) when they land.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

from kumiki.config import KumikiConfig
from launch.engines import node_configs, prepare_sites

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("kumiki.local")
FEDERATION = "kumiki-local"  # the SuperLink connection name in $FLWR_HOME/config.toml
HOST = "127.0.0.1"

#: flwr 1.41 environment variables (names checked against the installed source).
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # flwr.supercore.telemetry
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # flwr.supercore.update_check
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # SuperLink: no `uv sync` of the app per run
}


@dataclass(frozen=True)
class Tuning:
    """Latency knobs of the local engine; ``None``/``False`` = Flower's own behaviour."""

    #: FLWR_SUPEREXEC_TASK_POLL_INTERVAL of the sites' SuperExecs (flwr: 1.0 s; min 0.01).
    #: "auto": 0.05 s x sites, within [0.1, 0.5]. Every poll is an HTTP request costing
    #: ~10 ms of server CPU, so the interval grows with the number of sites to keep the
    #: machine's total poll load roughly constant (idle: ~15% of one core for 2 sites).
    superexec_poll_s: float | Literal["auto"] | None = "auto"
    #: the same for the SuperLink's SuperExec (it waits for one ServerApp per run).
    server_superexec_poll_s: float | None = 0.5
    #: cap on the SuperNode's fixed idle Fleet-pull sleep (3 s) and reply wait (0.5 s);
    #: "auto": 0.1 s x sites, within [0.2, 1.0].
    supernode_poll_s: float | Literal["auto"] | None = "auto"
    #: initial back-off of object pulls (flwr: 1 s, doubling) in the processes we launch.
    pull_backoff_s: float | None = 0.05
    #: the ServerApp's longest wait between reply pulls (server/app.py ReplyPollingGrid;
    #: None: HttpGrid's own loop, a fixed 3 s).
    reply_poll_max_s: float | None = 0.5
    #: keep the SuperLink's state in ``$FLWR_HOME/superlink.db`` (SQLite). False (default):
    #: flwr's in-memory state, which here more than halves the round time: every message is
    #: ~40 objects and each object request is an SQL round trip in the single SuperLink
    #: process. Every local run starts a fresh Flower home, so the file would only serve a
    #: post-mortem; a long-lived deployment (docker-compose.yml) keeps its database.
    superlink_db: bool = False
    #: torch/OpenMP threads per site process (None: torch's default, all cores).
    client_threads: int | None = 1
    #: SuperLink/SuperNodes with ``--isolation process`` and our forking, pre-imported
    #: SuperExecs (False: each spawns the stock ``flower-superexec``, one fresh
    #: interpreter per ClientApp/ServerApp).
    warm_superexec: bool = True
    #: third-party modules a warm SuperExec imports once; never the app's own packages
    #: (those come from the FAB in every child). Missing ones are skipped.
    preload: tuple[str, ...] = (
        "numpy", "pydantic", "torch", "torch.nn", "torch.optim", "torch._dynamo",
        "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.cli.install",
    )

    @classmethod
    def stock(cls) -> Tuning:
        """Flower 1.41 exactly as shipped (stock executables, subprocess isolation)."""
        return cls(superexec_poll_s=None, server_superexec_poll_s=None, supernode_poll_s=None, pull_backoff_s=None,
                   reply_poll_max_s=None, client_threads=None, warm_superexec=False)

    @property
    def launcher_needed(self) -> bool:
        return self.warm_superexec or self.supernode_poll_s is not None or self.pull_backoff_s is not None

    def resolved(self, sites: int) -> Tuning:
        """``"auto"`` intervals made concrete for ``sites`` SuperNodes."""
        def auto(value, per_site: float, lo: float, hi: float):
            return round(min(hi, max(lo, per_site * sites)), 3) if value == "auto" else value

        return replace(self, superexec_poll_s=auto(self.superexec_poll_s, 0.05, 0.1, 0.5),
                       supernode_poll_s=auto(self.supernode_poll_s, 0.1, 0.2, 1.0))


# --------------------------------------------------------------------------- helpers
def venv_bin() -> Path:
    """The bin dir of the interpreter running us (console scripts of the same venv)."""
    return Path(sys.executable).parent


def exe(name: str) -> str:
    path = venv_bin() / name
    if not path.is_file():
        raise RuntimeError(f"{name} not found next to {sys.executable}; install flwr in this environment")
    return str(path)


def toml_str(value: Any) -> str:
    """A TOML value for --node-config / --run-config (flwr splits on spaces outside quotes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    s = str(value)
    if "\n" in s or ("'" in s and ('"' in s or "\\" in s)):
        raise ValueError(f"cannot pass {s!r} as a Flower config value (quotes/newlines)")
    return f"'{s}'" if "'" not in s else f'"{s}"'


def config_arg(d: dict[str, Any]) -> str:
    """``{"site": "site-0", "data-dir": "/x"}`` -> ``site='site-0' data-dir='/x'``."""
    return " ".join(f"{k}={toml_str(v)}" for k, v in d.items())


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, without flwr's color codes."""
    try:
        with open(path, errors="replace") as f:
            return _ANSI.sub("", "".join(deque(f, maxlen=lines)))
    except OSError:
        return "(no log)\n"


def security_args(role: str, tls: bool) -> list[str]:
    """Transport/auth flags for ``role`` in {"superlink", "supernode", "superexec", "cli"}.

    Only the insecure variant exists today. TLS (``--ssl-certfile``/``--ssl-keyfile``/
    ``--ssl-ca-certfile`` on the SuperLink, ``--root-certificates`` on SuperNodes and
    SuperExecs, ``root-certificates`` in the CLI connection) and SuperNode authentication
    (``--enable-supernode-auth``; ``--auth-supernode-private-key`` + ``flwr supernode
    register``) plug in here and in ``_write_flwr_home``.
    """
    if tls:
        raise NotImplementedError("TLS and SuperNode authentication are not wired into the local engine yet")
    return [] if role == "cli" else ["--insecure"]


# --------------------------------------------------------------------------- launchers
# Written to $FLWR_HOME/kumiki_launcher.py and run as `python kumiki_launcher.py <mode> [<preload>]
# <flwr CLI args...>`; imports nothing of Kumiki (the app comes from the FAB).
# _tune() lowers flwr 1.41's fixed waits that have no flag, in this process (and its forks) only.
_LAUNCHER = r'''
"""Kumiki local engine: start a flwr SuperNode or SuperExec with latency tuning (see launch/engines/local.py)."""
import importlib, os, sys, time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this file's folder ($FLWR_HOME) is no place to import from

def _tune():
    notes = []
    cap = os.environ.get("KUMIKI_SUPERNODE_POLL_S")
    if cap and sys.argv[1] == "supernode":
        sci = importlib.import_module("flwr.supernode.start_client_internal")
        if getattr(sci, "time", None) is time:
            class _CappedTime:  # the module's `time`, with sleeps capped
                def __getattr__(self, name):
                    return getattr(time, name)
                @staticmethod
                def sleep(s):
                    time.sleep(min(s, float(cap)))
            sci.time = _CappedTime()
        else:
            notes.append("SuperNode poll cap")
    backoff = os.environ.get("KUMIKI_PULL_BACKOFF_S")
    if backoff:
        iu = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
        for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
            kw = getattr(fn, "__kwdefaults__", None) or {}
            if "initial_backoff" in kw:
                kw["initial_backoff"] = float(backoff)
            else:
                notes.append(f"pull back-off of {fn.__name__}")
    if notes:
        print("kumiki: flwr internals changed; not applied: " + ", ".join(notes), file=sys.stderr)

mode = sys.argv[1]
if mode == "supernode":
    _tune()
    del sys.argv[1]
    from flwr.supernode.cli.flower_supernode import flower_supernode as main
    sys.argv[0] = "flower-supernode"
    sys.exit(main())

# mode == "superexec": flwr's flower-superexec whose executor forks the app processes
for name in [m for m in sys.argv[2].split(",") if m]:
    try:
        importlib.import_module(name)
    except Exception as e:  # optional: the child imports what it needs itself
        print(f"kumiki: warm SuperExec could not preload {name}: {e}", file=sys.stderr)
_tune()
del sys.argv[1:3]
import traceback
from flwr.supercore.constant import TaskType
from flwr.supercore.exit import exit_handler
from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
from flwr.superlink.cli.flwr_serverapp import flwr_serverapp
ENTRY = {TaskType.CLIENT_APP: ("flwr-clientapp", flwr_clientapp), TaskType.SERVER_APP: ("flwr-serverapp", flwr_serverapp)}

class ForkExecutor(SubprocessExecutor):
    """SubprocessExecutor, except that ClientApp/ServerApp tasks run in a fork of this process."""
    def launch(self, spec):
        if spec.task_type not in ENTRY:
            return super().launch(spec)
        cmd, entry = ENTRY[spec.task_type]
        argv = [cmd, "--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            argv.append("--insecure")
        elif spec.root_certificates_path is not None:
            argv += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            argv.append("--allow-runtime-dependency-installation")
        sys.stdout.flush(); sys.stderr.flush()
        if os.fork():
            return LaunchResult.accepted()
        code = 1
        try:
            exit_handler.registered_exit_handlers.clear()  # the parent's (its Runtime API client)
            sys.argv = argv
            entry()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)

    def reconcile(self):
        while True:  # reap finished children
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

importlib.import_module("flwr.supercore.superexec.run_superexec").get_executor = lambda *a, **k: ForkExecutor()
from flwr.supercore.cli import flower_superexec
sys.argv[0] = "flower-superexec"
sys.exit(flower_superexec())
'''


# --------------------------------------------------------------------------- processes
@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    #: a site's SuperNode or SuperExec: restarted if it dies (its state is on disk); else fatal
    site: str | None = None
    restarts: int = 0


@dataclass
class _Cluster:
    """The processes of one run; each in its own process group (pgid == its PID)."""

    logs: Path
    procs: list[_Proc] = field(default_factory=list)
    _files: list[IO] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], pipe: bool = False) -> _Proc:
        log = self.logs / f"{name}.log"
        out: Any = subprocess.PIPE
        if not pipe:
            out = open(log, "ab")
            self._files.append(out)
        popen = subprocess.Popen(
            args, cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # own session and process group
        )
        proc = _Proc(name, popen, log, list(args), dict(env))
        self.procs.append(proc)
        return proc

    def restart(self, proc: _Proc) -> _Proc:
        """Start ``proc`` again with its own command, environment and log (appended); the old group is reaped."""
        _signal_group(proc.popen.pid, signal.SIGKILL)
        new = self.start(proc.name, proc.args, proc.env)
        new.site, new.restarts = proc.site, proc.restarts + 1
        return new

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process group we started, wait up to ``grace_s``, then SIGKILL."""
        for p in reversed(self.procs):
            _signal_group(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Children (SuperExec, flwr-clientapp, flwr-serverapp) share the groups: wait for them too.
        while time.monotonic() < deadline and any(_group_alive(p.popen.pid) for p in self.procs):
            time.sleep(0.05)
        for p in self.procs:
            if _group_alive(p.popen.pid):
                _signal_group(p.popen.pid, signal.SIGKILL)
            if p.popen.poll() is None:
                p.popen.kill()
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for f in self._files:
            f.close()
        self._files.clear()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# --------------------------------------------------------------------------- engine
def _logs_of(procs: list[_Proc], lines: int = 25) -> str:
    return "".join(f"--- {p.log} (last lines) ---\n{tail(p.log, lines)}" for p in procs)


def _wait(what: str, ok: Callable[[], bool], procs: list[_Proc], timeout_s: float) -> None:
    """Poll ``ok()`` until true; fail fast if one of ``procs`` exits, fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode} while waiting for {what}\n"
                                   + _logs_of([p], 40))
        if ok():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}\n" + _logs_of(procs, 15))
        time.sleep(0.1)


def _log_has(p: _Proc, text: str) -> Callable[[], bool]:
    return lambda: text in p.log.read_text(errors="replace")


def _write_flwr_home(home: Path, port: int, tls: bool) -> None:
    """$FLWR_HOME/config.toml with one SuperLink connection (flwr 1.41 has no federations in pyproject)."""
    home.mkdir(parents=True, exist_ok=True)
    conn = [f'address = "{HOST}:{port}"']
    if not tls:
        conn.append("insecure = true")  # with TLS: root-certificates = "<ca.crt>"
    (home / "config.toml").write_text(
        "# Written by launch.engines.local for one run.\n"
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n' + "\n".join(conn) + "\n"
    )


def _flwr_status(env: dict[str, str], run_id: int, timeout_s: float = 60.0) -> str:
    """``flwr ls --run-id N --format json`` -> the run's status (e.g. ``finished:completed``)."""
    try:
        out = subprocess.run(
            [exe("flwr"), "ls", FEDERATION, "--run-id", str(run_id), "--format", "json"],
            env=env, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout_s,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        runs = json.loads(out.stdout or "{}").get("runs") or []
        return str(runs[0].get("status", "unknown")) if runs else f"unknown ({out.stdout.strip()[:200]})"
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError) as exc:
        return f"unknown ({type(exc).__name__})"


def default_timeout_s(cfg: KumikiConfig) -> float:
    """Upper bound for a whole run: discovery + (train + evaluate) timeouts per round + 2 min."""
    return cfg.server.discovery_timeout_s + cfg.run.rounds * 2 * cfg.server.round_timeout_s + 120.0


def run_local(cfg: KumikiConfig, quiet: bool = False, *, overwrite: bool = False, resume: bool = False,
              **kw: Any) -> dict[str, Any]:
    """``_run_local`` inside the claimed run dir (``launch.rundir``): never over another run's outputs."""
    from launch.rundir import claim_run_dir

    with claim_run_dir(cfg, overwrite, resume):
        return _run_local(cfg, quiet, resume=resume, **kw)


def _run_local(cfg: KumikiConfig, quiet: bool = False, *, tls: bool = False, timeout_s: float | None = None,
               ready_timeout_s: float = 90.0, tuning: Tuning | None = None,
               on_start: Callable[[list[int]], None] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on a real SuperLink + one SuperNode per site on 127.0.0.1; return summary.json.

    ``timeout_s`` bounds the ``flwr run`` (default ``default_timeout_s(cfg)``),
    ``ready_timeout_s`` each start-up wait. ``on_start(pids)`` is called with the PIDs (=
    process-group ids) of the daemons once they are up (tests use it to check clean-up).
    Raises ``RuntimeError`` (with the logs' last lines) if anything fails; all processes
    are stopped before it returns or raises. ``resume``: continue the run after its last server checkpoint
    (``resume=true`` in the run_config; the sites keep their state dirs, the logs are appended to).
    """
    tuning = (tuning or Tuning()).resolved(cfg.total_sites)
    sim = prepare_sites(cfg, resume)
    run_dir = cfg.run_dir().resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in [] if resume else logs.glob("*.log"):
        old.unlink()
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)  # only this run's summary counts as success

    resolved = json.loads(cfg.model_dump_json())
    resolved["run"]["output_dir"] = str(run_dir.parent)
    config_path = run_dir / "resolved_config.json"
    config_path.write_text(json.dumps(resolved, indent=2))

    home = run_dir / "flwr"  # fresh per run: a reused SuperLink database would list last run's nodes
    shutil.rmtree(home, ignore_errors=True)
    link_port, *node_ports = free_ports(1 + cfg.total_sites)
    _write_flwr_home(home, link_port, tls)

    env = {k: v for k, v in os.environ.items() if k not in _TUNING_ENV}
    env.update(FLWR_ENV)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"  # flwr spawns flower-superexec etc. by name
    env["PYTHONUNBUFFERED"] = "1"
    if tuning.supernode_poll_s is not None:
        env["KUMIKI_SUPERNODE_POLL_S"] = str(tuning.supernode_poll_s)
    if tuning.pull_backoff_s is not None:
        env["KUMIKI_PULL_BACKOFF_S"] = str(tuning.pull_backoff_s)
    env["KUMIKI_REPLY_POLL_MAX_S"] = str(tuning.reply_poll_max_s or 0)  # read by server/app.py
    link_env, site_env = dict(env), dict(env)
    if tuning.server_superexec_poll_s is not None:
        link_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(tuning.server_superexec_poll_s)
    if tuning.superexec_poll_s is not None:
        site_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(tuning.superexec_poll_s)
    if tuning.client_threads is not None:
        site_env["OMP_NUM_THREADS"] = site_env["MKL_NUM_THREADS"] = str(tuning.client_threads)
    isolation = ["--isolation", "process"] if tuning.warm_superexec else []
    preload = ",".join(tuning.preload)

    launcher = home / "kumiki_launcher.py"
    launcher.write_text(_LAUNCHER.lstrip())

    def superexec(name: str, port: int, env_: dict[str, str]) -> _Proc:
        return cluster.start(name, [sys.executable, str(launcher), "superexec", preload,
                                    *security_args("superexec", tls), "--runtime-api-address", f"{HOST}:{port}"], env_)

    if timeout_s is None:
        timeout_s = default_timeout_s(cfg)
    cluster = _Cluster(logs)
    try:
        link = cluster.start("superlink", [
            exe("flower-superlink"), *security_args("superlink", tls), *isolation,
            "--host", HOST, "--port", str(link_port),
            *(["--database", str(home / "superlink.db")] if tuning.superlink_db else []),
            "--disable-runtime-dependency-installation",
        ], link_env)
        daemons = [link]
        if tuning.warm_superexec:
            daemons.append(superexec("superexec-serverapp", link_port, link_env))
        _wait(f"the SuperLink on {HOST}:{link_port}", lambda: port_open(link_port), daemons, ready_timeout_s)

        nodes = []
        for nc, port in zip(node_configs(cfg, sim), node_ports):
            Path(nc["state-dir"]).mkdir(parents=True, exist_ok=True)
            args = [*security_args("supernode", tls), *isolation, "--superlink", f"{HOST}:{link_port}",
                    "--host", HOST, "--port", str(port), "--node-config", config_arg(nc)]
            cmd = ([sys.executable, str(launcher), "supernode"] if tuning.launcher_needed
                   else [exe("flower-supernode")])
            node = cluster.start(f"supernode-{nc['site']}", [*cmd, *args], site_env)
            node.site = nc["site"]
            nodes.append(node)
            daemons.append(node)
            if tuning.warm_superexec:
                daemons.append(superexec(f"superexec-{nc['site']}", port, site_env))
                daemons[-1].site = nc["site"]
        for p in nodes:
            _wait(f"{p.name} to connect", _log_has(p, "SuperNode ID:"), daemons, ready_timeout_s)
        # SuperExecs are not waited for: tasks queue until one acquires them, so their imports
        # overlap the FAB build and the ServerApp start-up; a SuperExec that dies fails the run.
        if not quiet:
            print(f"local engine: SuperLink {HOST}:{link_port}, {len(nodes)} SuperNodes"
                  f"{' (warm SuperExecs)' if tuning.warm_superexec else ''}; logs in {logs}", file=sys.stderr)
        if on_start is not None:
            on_start([p.popen.pid for p in cluster.procs])

        run_id = _flwr_run(cluster, env, config_path, quiet, timeout_s, daemons, resume)
        status = _flwr_status(env, run_id) if run_id is not None else "not started"
        recorded = json.loads(summary_path.read_text()).get("status") if summary_path.is_file() else None
        if status != "finished:completed" or recorded in (None, "failed"):
            run_log = [p for p in cluster.procs if p.name == "flwr-run"]  # has the ServerApp's traceback
            raise RuntimeError(
                f"Flower run {run_id} ended with status {status!r}"
                f"{' and wrote no summary.json' if recorded is None else f', recorded as {recorded!r}'}; logs in {logs}\n"
                + _logs_of(run_log, 40) + _logs_of([p for p in cluster.procs if p not in run_log], 12)
            )
        return json.loads(summary_path.read_text())
    finally:
        cluster.stop_all()


#: environment variables through which ``Tuning`` reaches our launchers and server/app.py
_TUNING_ENV = ("KUMIKI_SUPERNODE_POLL_S", "KUMIKI_PULL_BACKOFF_S", "KUMIKI_REPLY_POLL_MAX_S",
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "FLWR_HOME")

_STARTED = re.compile(r"Successfully started run (\d+)")
#: how often the local engine restarts one site's SuperNode (or SuperExec) that died during a run
MAX_RESTARTS = 3


def _flwr_run(cluster: _Cluster, env: dict[str, str], config_path: Path, quiet: bool, timeout_s: float,
              daemons: list[_Proc], resume: bool = False) -> int | None:
    """``flwr run <repo> kumiki-local --stream``, bounded by ``timeout_s``; returns the run id."""
    run_config = f"config={toml_str(str(config_path))}" + (" resume=true" if resume else "")
    proc = cluster.start("flwr-run", [
        exe("flwr"), "run", str(REPO_ROOT), FEDERATION, "--run-config", run_config, "--stream",
    ], env, pipe=True)
    run_id: list[int] = []

    def pump() -> None:  # copy the run's output to its log (and the terminal unless quiet)
        assert proc.popen.stdout is not None
        with open(proc.log, "a", errors="replace") as log:
            for raw in iter(proc.popen.stdout.readline, b""):
                line = raw.decode(errors="replace")
                log.write(line)
                log.flush()
                if not run_id and (m := _STARTED.search(line)):
                    run_id.append(int(m.group(1)))
                if not quiet:
                    sys.stderr.write(line)
                    sys.stderr.flush()

    reader = threading.Thread(target=pump, name="flwr-run-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    while proc.popen.poll() is None:
        for i, p in enumerate(daemons):
            if p.popen.poll() is None:
                continue
            if p.site is None or p.restarts >= MAX_RESTARTS:  # the SuperLink, the ServerApp's executor, or given up
                raise RuntimeError(f"{p.name} exited (code {p.popen.returncode}) during the run"
                                   f"{f' after {p.restarts} restarts' if p.restarts else ''}\n" + _logs_of([p, proc], 40))
            # A site's process died: the run goes on without it (server.min_reply_fraction decides each round)
            # and the engine brings it back; its personal state is on disk, so it resumes where it left off.
            log.warning("%s exited (code %s); restarting it (%d of %d)", p.name, p.popen.returncode,
                        p.restarts + 1, MAX_RESTARTS)
            daemons[i] = cluster.restart(p)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Flower run did not finish within {timeout_s:.0f}s\n" + _logs_of([proc], 40))
        time.sleep(0.1)
    reader.join(timeout=10)
    if proc.popen.returncode != 0:
        raise RuntimeError(f"flwr run exited with code {proc.popen.returncode}\n" + _logs_of([proc], 40))
    return run_id[0] if run_id else None
