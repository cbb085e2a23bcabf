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
group, a bounded wait, then SIGKILL. Where no ``finally:`` runs (``kill -9``, the
OOM killer) the run still dies with its launcher: each direct child has a
parent-death signal, and ``launch/reaper.py`` (started first, holding the run
dir's lock) stops every process carrying the run's token in its environment,
grandchildren included. A ServerApp that dies outright is noticed within a
second (``server/lifecycle.py``) and the run is recorded as failed.

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
* warm SuperExecs and the fixed waits with no flag in flwr 1.41 (the SuperNode's 3 s
  idle sleep and 0.5 s reply wait, the 1 s initial back-off of object pulls): the
  SuperNodes and SuperExecs run through ``launch/fastpath.py``, the same module the
  Docker images and the documented Flower-native commands use (its docstring says what
  each patch does). With ``--isolation process`` (the compose layout) their SuperExecs
  fork each ``flwr-clientapp``/``flwr-serverapp`` from a pre-warmed process instead of
  exec'ing a new interpreter. If the flwr internals change, they say so in the log and
  run stock; ``tests/test_fastpath.py`` fails.
* each site computes with its share of the cores (``client/threads.py``: the node config
  ``local-sites`` says how many sites share this machine), so concurrent ClientApps do
  not oversubscribe it.

Security (``security_args``): TLS on the SuperLink's one port (Fleet, Control and
Runtime API), SuperNode authentication with one registered key per site, and
SuperExec authentication (a shared secret) on every Runtime API, all on by default;
``insecure=True`` (``kumiki run/pilot --insecure``) turns them off, loudly. With nginx
installed, the SuperLink sits behind ``deploy/proxy.py``'s proxy: the sites dial a
Fleet-only listener, the ``flwr`` commands a Control-only listener that wants the
operator's client certificate. The app ``flwr run`` submits is signed with the
operator's key and every SuperNode runs only apps signed with it (``launch/fastpath.py``,
app-sign / app-verify). docs/security.md says what each party can and cannot do.
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
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

from kumiki.config import KumikiConfig
from launch import fastpath, reaper
from launch.certs import CertBundle, make_certs
from launch.engines.prepare import node_configs, prepare_sites, process_run_dir
from server.lifecycle import PID_FILE, serverapp_died
from kumiki.atomic import atomic_json

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
    #: long polling (``launch/fastpath.py`` superlink-wait / supernode-wait): an empty Fleet pull, reply pull or
    #: task poll is held up to this long for the message that would fill it, instead of answered empty at once
    #: and asked again after a sleep; None: Flower's immediate answers (the SuperLink then runs stock).
    long_poll_s: float | None = 5.0
    #: the ServerApp's longest wait between reply pulls (server/app.py ReplyPollingGrid;
    #: None: HttpGrid's own loop, a fixed 3 s).
    reply_poll_max_s: float | None = 0.5
    #: keep the SuperLink's state in ``$FLWR_HOME/superlink.db`` (SQLite). False (default):
    #: flwr's in-memory state, which here more than halves the round time: every message is
    #: ~40 objects and each object request is an SQL round trip in the single SuperLink
    #: process. Every local run starts a fresh Flower home, so the file would only serve a
    #: post-mortem; a long-lived deployment (docker-compose.yml) keeps its database.
    superlink_db: bool = False
    #: torch threads per site process: "auto" = ``client/threads.py``'s rule (usable cores // sites on this
    #: machine, via the node config ``local-sites``); a number (node config ``threads``); None: torch's
    #: default (all cores in every site process).
    client_threads: int | Literal["auto"] | None = "auto"
    #: SuperLink/SuperNodes with ``--isolation process`` and our forking, pre-imported
    #: SuperExecs (False: each spawns the stock ``flower-superexec``, one fresh
    #: interpreter per ClientApp/ServerApp).
    warm_superexec: bool = True
    #: third-party modules a warm SuperExec imports once; never the app's own packages
    #: (those come from the FAB in every child). Missing ones are skipped.
    preload: tuple[str, ...] = fastpath.DEFAULT_PRELOAD

    @classmethod
    def stock(cls) -> Tuning:
        """Flower 1.41 exactly as shipped (stock executables, subprocess isolation)."""
        return cls(superexec_poll_s=None, server_superexec_poll_s=None, supernode_poll_s=None, pull_backoff_s=None,
                   long_poll_s=None, reply_poll_max_s=None, client_threads=None, warm_superexec=False)

    @property
    def launcher_needed(self) -> bool:
        return (self.warm_superexec or self.supernode_poll_s is not None or self.pull_backoff_s is not None
                or self.long_poll_s is not None)

    def resolved(self, sites: int) -> Tuning:
        """``"auto"`` intervals made concrete for ``sites`` SuperNodes."""
        def auto(value, per_site: float, lo: float, hi: float):
            return round(min(hi, max(lo, per_site * sites)), 3) if value == "auto" else value

        return replace(self, superexec_poll_s=auto(self.superexec_poll_s, 0.05, 0.1, 0.5),
                       supernode_poll_s=auto(self.supernode_poll_s, 0.1, 0.2, 1.0))


def thread_config(tuning: Tuning, sites: int) -> dict[str, int]:
    """Node config entries that set each site's torch threads (``client/threads.py``): all ``sites`` share this
    machine (``local-sites``), or an explicit ``threads``; nothing for torch's default (``Tuning.stock()``)."""
    if tuning.client_threads == "auto":
        return {"local-sites": sites}
    return {} if tuning.client_threads is None else {"threads": int(tuning.client_threads)}


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


def security_args(role: str, certs: CertBundle | None, site: str | None = None, secret: bool = False) -> list[str]:
    """Transport and authentication flags of one Flower process; ``certs=None`` is the insecure mode.

    ``role``: ``superlink``; ``supernode`` (``site`` names its key); ``superexec-server`` (runs
    the ServerApp, dials the SuperLink's Runtime API over TLS); ``superexec-site`` (runs a
    site's ClientApps, dials its SuperNode's Runtime API on 127.0.0.1, plain HTTP as in
    Flower's own layouts). ``secret``: Flower's SuperExec authentication (process isolation
    only), so no other local process can take a task from our SuperLink or SuperNodes.
    """
    if certs is None:
        return ["--insecure"]
    auth = ["--superexec-auth-secret-file", str(certs.superexec_secret)] if secret else []
    if role == "superlink":
        return ["--ssl-ca-certfile", str(certs.ca_crt), "--ssl-certfile", str(certs.superlink_crt),
                "--ssl-keyfile", str(certs.superlink_key), "--enable-supernode-auth", *auth]
    if role == "supernode":
        assert site is not None
        return ["--root-certificates", str(certs.ca_crt), "--auth-supernode-private-key", str(certs.site_key(site)),
                *auth]
    if role == "superexec-server":
        return ["--root-certificates", str(certs.ca_crt), *auth]
    if role == "superexec-site":
        return ["--insecure", *auth]
    raise ValueError(f"unknown role {role!r}")


INSECURE_BANNER = ("*** INSECURE: TLS and SuperNode authentication are OFF (--insecure). Traffic is plain HTTP and any "
                   "process that reaches the SuperLink can join as a site. Use only for debugging. ***")


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
    """The processes of one run; each in its own process group (pgid == its PID), each with a parent-death
    signal; ``token`` (in every child's environment) and ``lock_fd`` (the run dir's lock, inherited by every
    child) are handed to the reaper, which outlives a killed launcher just long enough to stop the rest."""

    logs: Path
    procs: list[_Proc] = field(default_factory=list)
    _files: list[IO] = field(default_factory=list)
    token: str | None = None
    lock_fd: int | None = None
    reaper: subprocess.Popen | None = None
    #: seconds the reaper gives the run's processes between SIGTERM and SIGKILL
    reaper_grace_s: float = 10.0

    def start_reaper(self, env: dict[str, str]) -> None:
        """``launch/reaper.py`` with a pipe as stdin: it acts when the pipe closes (this process ended)."""
        assert self.token is not None
        out = open(self.logs / "reaper.log", "ab")
        self._files.append(out)
        clean = {k: v for k, v in env.items() if k != reaper.TOKEN_ENV}
        self.reaper = subprocess.Popen(
            [sys.executable, str(Path(reaper.__file__).resolve()), self.token, str(self.reaper_grace_s)],
            cwd=str(REPO_ROOT), env=clean, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=self._fds())

    def _fds(self) -> tuple[int, ...]:
        return () if self.lock_fd is None else (self.lock_fd,)

    def start(self, name: str, args: list[str], env: dict[str, str], pipe: bool = False) -> _Proc:
        log = self.logs / f"{name}.log"
        out: Any = subprocess.PIPE
        if not pipe:
            out = open(log, "ab")
            self._files.append(out)
        popen = subprocess.Popen(
            args, cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # own session and process group
            preexec_fn=reaper.parent_death_signal(), pass_fds=self._fds(),  # dies with us; holds the run dir
        )
        proc = _Proc(name, popen, log, list(args), dict(env))
        self.procs.append(proc)
        if self.reaper is not None:  # its group: the reaper stops every member of it too
            try:
                self.reaper.stdin.write(f"{popen.pid}\n".encode())  # type: ignore[union-attr]
                self.reaper.stdin.flush()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass
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
        if self.reaper is not None:  # closing its pipe: it stops whatever escaped the groups, then exits
            try:
                self.reaper.stdin.close()  # type: ignore[union-attr]
                self.reaper.wait(timeout=self.reaper_grace_s + 15)
            except (OSError, subprocess.TimeoutExpired):
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


def _write_flwr_home(home: Path, port: int, certs: CertBundle | None, federation: str = FEDERATION,
                     note: str = "Written by launch.engines.local for one run.") -> None:
    """$FLWR_HOME/config.toml with one SuperLink connection (flwr 1.41 has no federations in pyproject)."""
    home.mkdir(parents=True, exist_ok=True)
    conn = [f'address = "{HOST}:{port}"']
    conn.append("insecure = true" if certs is None else f'root-certificates = "{certs.ca_crt}"')
    (home / "config.toml").write_text(
        f"# {note}\n"
        f'[superlink]\ndefault = "{federation}"\n\n[superlink.{federation}]\n' + "\n".join(conn) + "\n"
    )


_NODE_ID = re.compile(r'"node-id":\s*(\d+)')


def flwr_cli() -> list[str]:
    """The ``flwr`` CLI, through ``launch/fastpath.py`` (mode ``flwr``): with ``KUMIKI_CLIENT_CERT``/``KEY`` in its
    environment it presents the operator's client certificate to the proxy's Control API listener."""
    exe("flwr")  # fails clearly if flwr is not installed here
    return [sys.executable, str(Path(fastpath.__file__).resolve()), "flwr"]


def operator_env(env: dict[str, str], certs: CertBundle | None) -> dict[str, str]:
    """``env`` for the operator's ``flwr`` commands: with the client certificate the proxy asks for, and the key
    that signs the app ``flwr run`` submits (``launch/fastpath.py``, app-sign)."""
    if certs is None:
        return dict(env)
    return {**env, "KUMIKI_CLIENT_CERT": str(certs.operator_crt), "KUMIKI_CLIENT_KEY": str(certs.operator_key),
            "KUMIKI_APP_SIGNING_KEY": str(certs.app_signing_key)}


def nginx_exe() -> str | None:
    """Debian's nginx (``nginx-light``), if installed."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def unregister_sites(node_ids: list[int], env: dict[str, str], timeout_s: float = 60.0,
                     federation: str = FEDERATION) -> None:
    """``flwr supernode unregister <node-id> <federation>``: that key can never connect again."""
    for nid in node_ids:
        out = subprocess.run([*flwr_cli(), "supernode", "unregister", str(nid), federation], env=env, cwd=str(REPO_ROOT),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
                             start_new_session=True)
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode unregister {nid} failed: {_ANSI.sub('', out.stdout + out.stderr)[-400:]}")


def register_sites(certs: CertBundle, sites: list[str], env: dict[str, str], timeout_s: float = 60.0,
                   federation: str = FEDERATION) -> dict[str, int]:
    """``flwr supernode register <site>.pub <federation> --name <site>`` for every site (in parallel).

    With ``--enable-supernode-auth`` the SuperLink admits only registered keys, and the node
    id it returns here is the site's for good (a restarted SuperNode gets it back).
    """
    procs = {site: subprocess.Popen(
        [*flwr_cli(), "supernode", "register", str(certs.site_pub(site)), federation, "--name", site, "--format", "json"],
        env=env, cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True) for site in sites}
    ids, failed = {}, []
    for site, p in procs.items():
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        m = _NODE_ID.search(out or "")
        if p.returncode == 0 and m:
            ids[site] = int(m.group(1))
        else:
            failed.append(f"{site}: exit {p.returncode}: {_ANSI.sub('', out or '').strip()[-400:]}")
    if failed:
        raise RuntimeError("flwr supernode register failed for " + "; ".join(failed))
    return ids


def _flwr_status(env: dict[str, str], run_id: int, timeout_s: float = 60.0, federation: str = FEDERATION) -> str:
    """``flwr ls --run-id N --format json`` -> the run's status (e.g. ``finished:completed``)."""
    try:
        out = subprocess.run(
            [*flwr_cli(), "ls", federation, "--run-id", str(run_id), "--format", "json"],
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


def _run_local(cfg: KumikiConfig, quiet: bool = False, *, insecure: bool = False, timeout_s: float | None = None,
               ready_timeout_s: float = 90.0, tuning: Tuning | None = None,
               on_start: Callable[[list[int]], None] | None = None, resume: bool = False,
               proxy: bool | None = None) -> dict[str, Any]:
    """Run ``cfg`` on a real SuperLink + one SuperNode per site on 127.0.0.1; return summary.json.

    ``proxy`` (default: whenever TLS is on and nginx is installed): the SuperLink sits behind nginx
    (``deploy/proxy.py``): the SuperNodes dial its Fleet-only listener, the ``flwr`` commands its Control
    listener with the operator's client certificate; the SuperLink's own port serves the ServerApp's
    SuperExec (Runtime API) only.

    TLS and SuperNode authentication are on unless ``insecure``: a CA, the SuperLink's
    certificate and one key per site are made for the run (``launch.certs``, under
    ``<run_dir>/flwr/certs``), and every site's key is registered before its SuperNode starts.
    ``timeout_s`` bounds the ``flwr run`` (default ``default_timeout_s(cfg)``),
    ``ready_timeout_s`` each start-up wait. ``on_start(pids)`` is called with the PIDs (=
    process-group ids) of the daemons once they are up (tests use it to check clean-up).
    Raises ``RuntimeError`` (with the logs' last lines) if anything fails; all processes
    are stopped before it returns or raises. ``resume``: continue the run after its last server checkpoint
    (``resume=true`` in the run_config; the sites keep their state dirs, the logs are appended to).
    """
    tuning = (tuning or Tuning()).resolved(cfg.total_sites)
    sim = prepare_sites(cfg, resume)
    run_dir, logs, summary_path, resolved = process_run_dir(cfg, resume)
    config_path = run_dir / "resolved_config.json"
    config_path.write_text(json.dumps(resolved, indent=2))

    home = run_dir / "flwr"  # fresh per run: a reused SuperLink database would list last run's nodes
    shutil.rmtree(home, ignore_errors=True)
    link_port, fleet_port, control_port, *node_ports = free_ports(3 + cfg.total_sites)
    site_configs = node_configs(cfg, sim)
    for nc in site_configs:
        nc.update(thread_config(tuning, cfg.total_sites))
    certs = None if insecure else make_certs(home / "certs", [nc["site"] for nc in site_configs])
    if certs is None:
        log.warning(INSECURE_BANNER)
        if not quiet:
            print(f"\n{INSECURE_BANNER}\n", file=sys.stderr)
    nginx = nginx_exe()
    if proxy is None:
        proxy = certs is not None and nginx is not None
        if certs is not None and nginx is None:
            log.warning("nginx is not installed: the SuperLink's Control API is not fenced off from the sites' port "
                        "(apt-get install nginx-light; docs/security.md)")
    if proxy and (certs is None or nginx is None):
        raise RuntimeError("the proxy needs TLS (drop --insecure) and nginx (apt-get install nginx-light)")
    if not proxy:
        fleet_port = control_port = link_port
    _write_flwr_home(home, control_port, certs)
    # where each party dials (the sites: fleet; the operator's flwr: control; the ServerApp's SuperExec: superlink)
    (home / "endpoints.json").write_text(json.dumps({"superlink": f"{HOST}:{link_port}", "fleet": f"{HOST}:{fleet_port}",
                                                     "control": f"{HOST}:{control_port}", "proxy": bool(proxy)}))

    env = {k: v for k, v in os.environ.items() if k not in _TUNING_ENV}
    env.update(FLWR_ENV)
    env[reaper.TOKEN_ENV] = uuid.uuid4().hex  # every process of this run, grandchildren included, carries it
    env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"  # flwr spawns flower-superexec etc. by name
    env["PYTHONUNBUFFERED"] = "1"
    # launch/fastpath.py reads these; "off" where a knob is None (its defaults are for the images)
    env["KUMIKI_SUPERNODE_POLL_S"] = "off" if tuning.supernode_poll_s is None else str(tuning.supernode_poll_s)
    env["KUMIKI_PULL_BACKOFF_S"] = "off" if tuning.pull_backoff_s is None else str(tuning.pull_backoff_s)
    env["KUMIKI_LONG_POLL_S"] = "off" if tuning.long_poll_s is None else str(tuning.long_poll_s)
    env["KUMIKI_FORK"] = "1" if tuning.warm_superexec else "0"
    env["KUMIKI_PRELOAD"] = ",".join(tuning.preload)
    env["KUMIKI_REPLY_POLL_MAX_S"] = str(tuning.reply_poll_max_s or 0)  # read by server/app.py
    link_env, site_env = dict(env), dict(env)
    cli_env = operator_env(env, certs)  # the operator's flwr commands: with the client certificate
    if certs is not None:  # every site runs only apps signed with the operator's key (fastpath app-verify)
        site_env["KUMIKI_APP_SIGNING_PUB"] = str(certs.app_signing_pub)
    if tuning.server_superexec_poll_s is not None:
        link_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(tuning.server_superexec_poll_s)
    if tuning.superexec_poll_s is not None:
        site_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(tuning.superexec_poll_s)
    isolation = ["--isolation", "process"] if tuning.warm_superexec else []
    secret = tuning.warm_superexec  # SuperExec authentication exists for process isolation only
    launcher = [sys.executable, str(Path(fastpath.__file__).resolve())]

    def superexec(name: str, port: int, env_: dict[str, str], role: str) -> _Proc:
        return cluster.start(name, [*launcher, "superexec", *security_args(role, certs, secret=secret),
                                    "--runtime-api-address", f"{HOST}:{port}"], env_)

    if timeout_s is None:
        timeout_s = default_timeout_s(cfg)
    from launch.rundir import lock_fd

    cluster = _Cluster(logs, token=env[reaper.TOKEN_ENV], lock_fd=lock_fd(run_dir))
    (run_dir / PID_FILE).unlink(missing_ok=True)  # a marker left by an earlier ServerApp of this dir (resume)
    started = time.time()
    failure: BaseException | None = None
    try:
        cluster.start_reaper(env)
        # through the launcher for long polling (fastpath superlink-wait); stock otherwise
        link_cmd = [*launcher, "superlink"] if tuning.long_poll_s is not None else [exe("flower-superlink")]
        link = cluster.start("superlink", [
            *link_cmd, *security_args("superlink", certs, secret=secret), *isolation,
            "--host", HOST, "--port", str(link_port),
            *(["--database", str(home / "superlink.db")] if tuning.superlink_db else []),
            "--disable-runtime-dependency-installation",
        ], link_env)
        daemons = [link]
        if tuning.warm_superexec:
            daemons.append(superexec("superexec-serverapp", link_port, link_env, "superexec-server"))
        if proxy:
            assert certs is not None and nginx is not None
            daemons.append(start_proxy(cluster, nginx, home / "proxy", certs, link_port, fleet_port, control_port,
                                       env))
        _wait(f"the SuperLink on {HOST}:{link_port}", lambda: all(map(port_open, {link_port, fleet_port, control_port})),
              daemons, ready_timeout_s)
        node_ids: dict[str, int] = {}
        if certs is not None:
            node_ids = register_sites(certs, [nc["site"] for nc in site_configs], cli_env)
            (home / "registered.json").write_text(json.dumps(node_ids, indent=2))

        nodes = []
        for nc, port in zip(site_configs, node_ports):
            Path(nc["state-dir"]).mkdir(parents=True, exist_ok=True)
            args = [*security_args("supernode", certs, site=nc["site"], secret=secret), *isolation,
                    "--superlink", f"{HOST}:{fleet_port}", "--host", HOST, "--port", str(port),
                    "--node-config", config_arg(nc)]
            # through the launcher whenever apps are verified (Tuning.stock(): that patch only)
            cmd = [*launcher, "supernode"] if tuning.launcher_needed or certs else [exe("flower-supernode")]
            node = cluster.start(f"supernode-{nc['site']}", [*cmd, *args], site_env)
            node.site = nc["site"]
            nodes.append(node)
            daemons.append(node)
            if tuning.warm_superexec:
                daemons.append(superexec(f"superexec-{nc['site']}", port, site_env, "superexec-site"))
                daemons[-1].site = nc["site"]
        for p in nodes:
            _wait(f"{p.name} to connect", _log_has(p, "SuperNode ID:"), daemons, ready_timeout_s)
        # SuperExecs are not waited for: tasks queue until one acquires them, so their imports
        # overlap the FAB build and the ServerApp start-up; a SuperExec that dies fails the run.
        if not quiet:
            print(f"local engine: SuperLink {HOST}:{link_port}"
                  f"{f' behind nginx (sites {fleet_port}, operator {control_port})' if proxy else ''}, {len(nodes)} SuperNodes"
                  f"{' (warm SuperExecs)' if tuning.warm_superexec else ''}; logs in {logs}", file=sys.stderr)
        if on_start is not None:
            on_start([p.popen.pid for p in cluster.procs])

        def reregister(p: _Proc) -> None:
            """A killed SuperNode's session stays "online" on the SuperLink until its heartbeat expires
            (2 x 30 s in flwr 1.41), and its key cannot activate again before that. So the site gets a
            new key (an unregistered key is never accepted again), registered under a new node id: it
            is back at once, and the server maps the new node to the same site."""
            if certs is None or p.site is None or not p.name.startswith("supernode-"):
                return
            unregister_sites([node_ids.pop(p.site)], cli_env)
            make_certs(certs.root, [], rotate=[p.site])
            node_ids.update(register_sites(certs, [p.site], cli_env))
            (home / "registered.json").write_text(json.dumps(node_ids, indent=2))

        run_id = _flwr_run(cluster, cli_env, config_path, quiet, timeout_s, daemons, reregister, resume, run_dir)
        status = _flwr_status(cli_env, run_id) if run_id is not None else "not started"
        recorded = json.loads(summary_path.read_text()).get("status") if summary_path.is_file() else None
        if status != "finished:completed" or recorded in (None, "failed"):
            run_log = [p for p in cluster.procs if p.name == "flwr-run"]  # has the ServerApp's traceback
            raise RuntimeError(
                f"Flower run {run_id} ended with status {status!r}"
                f"{' and wrote no summary.json' if recorded is None else f', recorded as {recorded!r}'}; logs in {logs}\n"
                + _logs_of(run_log, 40) + _logs_of([p for p in cluster.procs if p not in run_log], 12)
            )
        return json.loads(summary_path.read_text())
    except BaseException as exc:
        failure = exc
        raise
    finally:
        cluster.stop_all()
        if failure is not None:
            record_failure(cfg, run_dir, started, failure)


def start_proxy(cluster: _Cluster, nginx: str, where: Path, certs: CertBundle, link_port: int, fleet_port: int,
                control_port: int, env: dict[str, str]) -> _Proc:
    """nginx in front of the SuperLink (``deploy/proxy.py``), both listeners on loopback; its workers keep the
    run's token (the reaper finds them) and, under root, run as root (the run dir may be private)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kumiki_deploy_proxy", REPO_ROOT / "deploy" / "proxy.py")
    proxy_conf = importlib.util.module_from_spec(spec)  # deploy/ is the operator's folder, not a package
    spec.loader.exec_module(proxy_conf)  # type: ignore[union-attr]
    user = "root" if os.geteuid() == 0 else None
    conf = proxy_conf.write_conf(where / "nginx.conf", superlink=f"{HOST}:{link_port}",
                                 fleet_listen=f"{HOST}:{fleet_port}", control_listen=f"{HOST}:{control_port}",
                                 certs=certs.root, runtime_dir=where, user=user, env=(reaper.TOKEN_ENV,))
    return cluster.start("proxy", [nginx, "-p", str(where), "-c", str(conf), "-e", str(where / "error.log")], env)


def stop_reason(exc: BaseException) -> str:
    """Why a run ended, in a line: the signal that stopped it (the CLI raises ``KeyboardInterrupt("SIGTERM")``;
    Ctrl-C is SIGINT), or the error's first line."""
    if isinstance(exc, KeyboardInterrupt):
        return f"stopped by {str(exc) or 'SIGINT'}"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


def record_failure(cfg: KumikiConfig, run_dir: Path, since: float, exc: BaseException) -> None:
    """After the processes are stopped: the ServerApp records how the run ended (a signal included); where it
    could not (killed outright, never started), write a ``failed`` summary.json saying why. Then the report of
    whatever rounds were recorded, where the ServerApp did not get to write it (it is stopped with a bounded
    grace, and its Flower log stream dies with the SuperLink)."""
    summary_path, report = run_dir / "summary.json", run_dir / "report.html"
    try:
        if not (summary_path.is_file() and summary_path.stat().st_mtime >= since):
            rows = []
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file():
                rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            rounds = max((r["round"] for r in rows if r.get("kind") == "round"), default=0)
            summary = {"method": cfg.method.name, "dataset": cfg.data.dataset, "rounds": rounds,
                       "sites": cfg.data.sites, "status": "failed", "error": stop_reason(exc),
                       "recorded_by": "launcher (the ServerApp could not)"}
            atomic_json(summary_path, summary, indent=2)
        if not report.is_file() or report.stat().st_mtime < summary_path.stat().st_mtime:
            from server.report import render_report

            render_report(run_dir)
    except Exception as e:  # noqa: BLE001 - recording the failure must not hide it
        log.warning("could not record the failed run in %s: %s", run_dir, e)


#: environment variables through which ``Tuning`` reaches our launchers and server/app.py
_TUNING_ENV = ("KUMIKI_SUPERNODE_POLL_S", "KUMIKI_PULL_BACKOFF_S", "KUMIKI_LONG_POLL_S", "KUMIKI_REPLY_POLL_MAX_S", "KUMIKI_FORK", "KUMIKI_PRELOAD",
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "FLWR_HOME", reaper.TOKEN_ENV, "KUMIKI_CLIENT_CERT",
               "KUMIKI_CLIENT_KEY", "KUMIKI_APP_SIGNING_KEY", "KUMIKI_APP_SIGNING_PUB")

_STARTED = re.compile(r"Successfully started run (\d+)")
#: how often the local engine restarts one site's SuperNode (or SuperExec) that died during a run
MAX_RESTARTS = 3


def _flwr_run(cluster: _Cluster, env: dict[str, str], config_path: Path, quiet: bool, timeout_s: float,
              daemons: list[_Proc], before_restart: Callable[[_Proc], None] | None = None,
              resume: bool = False, run_dir: Path | None = None) -> int | None:
    """``flwr run <repo> kumiki-local --stream``, bounded by ``timeout_s``; returns the run id.

    ``before_restart(proc)`` runs before a dead site process is started again; ``resume`` asks the
    ServerApp to continue the run from its checkpoint. ``run_dir``: watch its ServerApp's marker
    (``server/lifecycle.py``), so a ServerApp that dies outright fails the run within a second.
    """
    run_config = f"config={toml_str(str(config_path))}" + (" resume=true" if resume else "")
    proc = cluster.start("flwr-run", [
        *flwr_cli(), "run", str(REPO_ROOT), FEDERATION, "--run-config", run_config, "--stream",
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
            if before_restart is not None:
                before_restart(p)
            daemons[i] = cluster.restart(p)
        if run_dir is not None and (dead := serverapp_died(run_dir)) is not None:
            raise RuntimeError(f"the ServerApp (pid {dead}) died without ending the run (killed, or out of memory); "
                               "the run is stopped\n" + _logs_of([proc], 20))
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Flower run did not finish within {timeout_s:.0f}s\n" + _logs_of([proc], 40))
        time.sleep(0.1)
    reader.join(timeout=10)
    if proc.popen.returncode != 0:
        raise RuntimeError(f"flwr run exited with code {proc.popen.returncode}\n" + _logs_of([proc], 40))
    return run_id[0] if run_id else None
