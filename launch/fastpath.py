"""Kumiki's fast path: Flower 1.41's SuperLink, SuperNode and SuperExec without their fixed waits.

A Flower 1.41 deployment round is dominated by fixed sleeps and by one fresh
``flwr-clientapp`` interpreter per message (each imports flwr and torch, ~5 s of CPU).
Flower's supported knobs come first and are plain settings, not code:
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (how often a SuperExec asks for work) and the
ServerApp's reply polling (``server/app.py``, part of the app, so it runs everywhere).
What has no knob in 1.41 is done here, in this process and its forks only (nothing under
site-packages is modified):

``supernode-poll``
    ``flwr.supernode.start_client_internal`` sleeps a fixed 3 s between idle Fleet pulls
    and 0.5 s while waiting for a reply; its module-level ``time`` is replaced by one
    whose ``sleep`` is capped at ``KUMIKI_SUPERNODE_POLL_S`` (default 0.2 s).
``pull-backoff``
    Object pulls start at a 1 s back-off (a message is pulled before its tensors have
    arrived, at every hop); the ``initial_backoff`` keyword default of ``pull_objects`` and
    ``pull_and_inflate_object_from_tree`` becomes ``KUMIKI_PULL_BACKOFF_S`` (default 0.05 s).
``fork-executor``
    The SuperExec's executor (``run_superexec.get_executor``; 1.41 selects executors by a
    fixed enum, there is no plugin point) becomes ``ForkExecutor``: a ``SubprocessExecutor``
    that runs each ClientApp/ServerApp task in a fork of this pre-warmed process (torch
    already imported, ``KUMIKI_PRELOAD``), with exactly the command line Flower would have
    exec'ed. The app itself is still installed from the FAB and imported in every child.
``supernode-alive``
    Flower 1.41's SuperNode serves ``/health`` before it has reached the SuperLink, so a health
    check on it says nothing about the link. With ``KUMIKI_SUPERNODE_ALIVE_FILE`` set (the images
    set it), every Fleet pull that returns (at most once a second) touches that file, whose first
    line is the node id; ``python fastpath.py alive [MAX_AGE_S]`` exits 0 only while the last
    pull is younger than MAX_AGE_S (default 30): connected, authenticated and polling.
``superlink-wait`` / ``supernode-wait``
    Flower 1.41 moves every message by polling: a SuperNode asks the SuperLink for work (``PullMessages``), the
    ServerApp asks it for replies (``pull_messages``), a SuperExec asks its SuperNode for a task (``acquire_task``),
    and each empty answer is followed by a fixed sleep, so a waiting federation spends CPU on empty answers and a
    message that arrives waits out the rest of a sleep. Here an empty answer is held (long polling): the SuperLink
    and SuperNode wait, up to ``KUMIKI_LONG_POLL_S`` (default 5 s), for the event that would fill it (a message
    pushed for the sites, a reply pushed by a site, a message stored for a ClientApp, a run started for the
    ServerApp's SuperExec) and then answer at once; the
    asking side is unchanged (its sleep after an answer stays). Inside the SuperNode its wait for its ClientApp's
    reply (``time.sleep(0.5)`` loops) wakes when the ClientApp pushes a reply or an object. A wait is bounded, and
    every answer is Flower's own, taken again after the event, so a missed event costs at most one hold.
``superlink-objects``
    With ``--database`` (a long-lived SuperLink keeps its registered nodes and runs), Flower 1.41
    puts the message objects (every tensor of every message, several SQL round trips each) in
    the same SQLite file; the SuperLink's ``ObjectStoreFactory`` keeps them in memory instead
    (``KUMIKI_SUPERLINK_OBJECTS=memory``, the default; ``database`` for Flower's behaviour). The
    link state stays in the file. Objects are transient: a restarted SuperLink loses in-flight
    messages either way, since its runs do not survive it.

``superlink-nodes``
    Even with the objects in memory, Flower 1.41's SQLite link state costs SQL round trips on every poll and every
    message (``bench/linkstate_sql.py`` counts them). What must survive a restart is the registrations (which
    site keys may join, under which node ids; ``flwr supernode register``); a run's messages and tasks do not (its
    ServerApp does not survive the SuperLink). With ``--database`` and ``KUMIKI_SUPERLINK_MESSAGES=memory`` (the
    default; ``database`` for Flower's behaviour) the SuperLink's link state is Flower's in-memory one, except
    that registering and unregistering a node also write it to the ``--database`` file (through Flower's own
    ``SqlLinkState``), and a starting SuperLink reads the registered nodes back. Runs, messages, tasks and node
    liveness stay in memory; ``flwr ls`` after a restart lists no earlier runs.
``client-cert``
    The Control API sits behind a proxy that demands the operator's client certificate (mutual
    TLS; ``deploy/proxy.py``), and Flower 1.41's CLI has no setting for one: its HTTP client
    (``flwr.supercore.protobuf.client.ProtobufClient``) verifies the server only. In the ``flwr``
    mode, a client built with TLS on also presents ``KUMIKI_CLIENT_CERT`` / ``KUMIKI_CLIENT_KEY``.

``app-sign`` / ``app-verify``
    Factories run only apps the operator signed. Flower 1.41's own app verification
    (``flower-supernode --trusted-entities``) accepts only FABs whose verification records come
    from the Flower Hub: a FAB uploaded by ``flwr run <dir>`` carries none and is refused, so it
    cannot be used offline. What is kept of it: its ed25519 primitives, its message format
    (``create_message_to_sign(sha256(fab), signed_at)``), and its refusal path in the SuperNode
    (an ``INVALID_FAB`` error reply, logged, before any ClientApp starts). In the ``flwr`` mode with
    ``KUMIKI_APP_SIGNING_KEY`` (``kumiki certs``' ``app-signing.key``), the FAB ``flwr run`` builds is
    signed: the signature rides in the zip's archive comment (zip readers ignore it; the signed
    bytes are the FAB with an empty comment). In the ``supernode`` mode with ``KUMIKI_APP_SIGNING_PUB``
    (``app-signing.pub``), every FAB is checked against that key before anything of its run
    starts: unsigned, signed by another key, or altered after signing, it is refused.

Usage (standalone: this file imports only the standard library and flwr, so the images
copy it alone and the Flower-native commands run it from a checkout)::

    python launch/fastpath.py superlink  <flower-superlink arguments>
    python launch/fastpath.py supernode  <flower-supernode arguments>
    python launch/fastpath.py superexec  <flower-superexec arguments>
    python launch/fastpath.py flwr       <flwr CLI arguments>   # with KUMIKI_CLIENT_CERT/KEY: mutual TLS
    python launch/fastpath.py alive [MAX_AGE_S]   # the SuperNode's health check (supernode-alive)
    python launch/fastpath.py check      # apply every patch in a scratch process, report, exit 1 if one fails

Settings: ``KUMIKI_SUPERNODE_POLL_S``, ``KUMIKI_PULL_BACKOFF_S``, ``KUMIKI_LONG_POLL_S`` (a number, or ``off``),
``KUMIKI_SUPERNODE_ALIVE_FILE`` (a path; unset: no file),
``KUMIKI_SUPERLINK_OBJECTS`` and ``KUMIKI_SUPERLINK_MESSAGES`` (``memory`` or ``database``),
``KUMIKI_FORK`` (``0``: Flower's own executor), ``KUMIKI_PRELOAD`` (comma-separated modules),
``KUMIKI_FASTPATH_STRICT=1`` (exit 78 instead of running stock when a patch no longer applies; app-verify
always fails closed: with ``KUMIKI_APP_SIGNING_PUB`` set and the check not installable, the SuperNode exits 78).
A patch that no longer applies (a Flower upgrade moved a name) is reported on stderr and
the process runs stock Flower; ``tests/test_fastpath.py`` fails in that case.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

DEFAULTS = {"KUMIKI_SUPERNODE_POLL_S": "0.2", "KUMIKI_PULL_BACKOFF_S": "0.05", "KUMIKI_FORK": "1",
            "KUMIKI_SUPERLINK_OBJECTS": "memory", "KUMIKI_SUPERLINK_MESSAGES": "memory", "KUMIKI_LONG_POLL_S": "5"}
#: third-party modules a warm SuperExec imports once; never the app's own packages (those come
#: from the FAB in every child). Missing ones are skipped.
DEFAULT_PRELOAD = ("numpy", "pydantic", "torch", "torch.nn", "torch.optim", "torch._dynamo",
                   "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.cli.install")
EXIT_PATCH_FAILED = 78  # EX_CONFIG

SUPERNODE_MODULE = "flwr.supernode.start_client_internal"
INFLATABLE_MODULE = "flwr.supercore.inflatable.inflatable_utils"
SUPEREXEC_MODULE = "flwr.supercore.superexec.run_superexec"
CONFIG_LOADER_MODULE = "flwr.superlink.config_loader"
LINKSTATE_FACTORY_MODULE = "flwr.server.superlink.linkstate.linkstate_factory"
#: the Fleet API's handlers: both its transports (HTTP, the default, and gRPC-rere) call them by module attribute
FLEET_HANDLERS_MODULE = "flwr.superlink.servicer.fleet.fleet_handlers"
LINK_RUNTIME_MODULE = "flwr.superlink.servicer.runtime.runtime_handlers"
NODE_RUNTIME_MODULE = "flwr.supernode.servicer.runtime.runtime_handlers"
CONTROL_HANDLERS_MODULE = "flwr.superlink.servicer.control.control_handlers"
CORE_RUNTIME_MODULE = "flwr.supercore.servicer.runtime.runtime_handlers"
#: modules whose calls to the pull functions must rely on the keyword default we lower
PULL_CALLERS = (SUPERNODE_MODULE, "flwr.superlink.grid.http_grid", "flwr.supernode.runtime.run_clientapp")


@dataclass
class Patch:
    name: str
    applied: bool
    detail: str


def setting(name: str) -> float | None:
    """A seconds setting from the environment (``DEFAULTS`` if unset); ``None`` if ``off``."""
    raw = os.environ.get(name, DEFAULTS[name]).strip().lower()
    return None if raw in ("", "off", "none") else float(raw)


# --------------------------------------------------------------------------- supernode-poll
class CappedTime:
    """Stands in for the ``time`` module inside one flwr module: ``sleep`` is capped, the rest delegates.

    With ``wake`` (an ``Event``, set by ``supernode-wait``), a sleep also ends when it is set (and clears it): the
    sleeping loop looks again at once. The loops this serves re-check their condition before each sleep, so a stale
    event costs one extra look, never a missed message."""

    def __init__(self, cap_s: float, real: Any = time):
        self.cap_s, self._real = cap_s, real
        self.wake: threading.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        if self.wake is None:
            self._real.sleep(min(seconds, self.cap_s))
            return
        self.wake.wait(min(seconds, self.cap_s))
        self.wake.clear()


def patch_supernode_poll(cap_s: float) -> Patch:
    sci = importlib.import_module(SUPERNODE_MODULE)
    current = getattr(sci, "time", None)
    if isinstance(current, CappedTime):
        current.cap_s = cap_s
        return Patch("supernode-poll", True, f"cap {cap_s}s (updated)")
    if current is not time or "time.sleep(" not in inspect.getsource(sci):
        return Patch("supernode-poll", False, f"{SUPERNODE_MODULE} no longer sleeps through its module-level `time`")
    sci.time = CappedTime(cap_s)
    return Patch("supernode-poll", True, f"sleeps in {SUPERNODE_MODULE} capped at {cap_s}s")


# --------------------------------------------------------------------------- superlink-wait / supernode-wait
class Signal:
    """A counter that waiters watch: ``notify`` bumps it; ``wait(seen, t)`` returns once it is no longer ``seen``
    (or after ``t`` seconds). A waiter reads ``count`` before it looks, so an event between its look and its wait
    is never lost."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.count = 0

    def notify(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count != seen, timeout)


#: SuperLink: messages pushed for the sites (wakes held Fleet pulls); replies pushed by sites (wakes the ServerApp's);
#: a run started or a task created (wakes the ServerApp's SuperExec's held task poll)
TO_SITES, TO_SERVER, RUNS = Signal(), Signal(), Signal()
#: SuperNode: a message stored for a ClientApp (wakes a held acquire_task)
TASKS = Signal()
#: SuperNode: its ClientApp pushed a reply or an object (wakes the SuperNode's reply wait, see CappedTime)
REPLIED = threading.Event()


#: at most this many requests held at once in a process: a held request occupies a server thread (Flower's HTTP
#: APIs run on a pool of 40), so beyond it a poll is answered at once, as without the patch, and heartbeats and
#: pushes always find a thread
MAX_HELD = 16
_HOLDS = threading.BoundedSemaphore(MAX_HELD)


def held(inner: Callable[..., Any], empty: Callable[[Any], bool], signal: Signal, hold_s: float) -> Callable[..., Any]:
    """``inner``, but an ``empty`` answer waits (up to ``hold_s`` in all) for ``signal`` and asks ``inner`` again
    (unless ``MAX_HELD`` requests are already waiting: then it is answered at once)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + hold_s
        holding = False
        try:
            while True:
                seen = signal.count
                out = inner(*args, **kwargs)
                left = deadline - time.monotonic()
                if left <= 0 or not empty(out):
                    return out
                if not holding:
                    holding = _HOLDS.acquire(blocking=False)
                    if not holding:
                        return out
                signal.wait(seen, left)
        finally:
            if holding:
                _HOLDS.release()

    call.kumiki_held = inner  # type: ignore[attr-defined]
    return call


def notifying(inner: Callable[..., Any], *signals: Any) -> Callable[..., Any]:
    """``inner``, then every one of ``signals`` notified (a ``Signal``) or set (an ``Event``), even if it raised."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return inner(*args, **kwargs)
        finally:
            for s in signals:
                s.notify() if isinstance(s, Signal) else s.set()

    call.kumiki_notifying = inner  # type: ignore[attr-defined]
    return call


def _no_messages(resp: Any) -> bool:
    return len(resp.messages_list) == 0


def _no_task(resp: Any) -> bool:
    return not resp.HasField("task")


def _install(target: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    current = getattr(target, name)
    if not (getattr(current, "kumiki_held", None) or getattr(current, "kumiki_notifying", None)):
        setattr(target, name, wrap(current))


def patch_superlink_wait(hold_s: float) -> Patch:
    """Long polling in the SuperLink: empty Fleet pulls (SuperNodes) and reply pulls (ServerApp) are held."""
    try:
        fleet = importlib.import_module(FLEET_HANDLERS_MODULE)
        runtime = importlib.import_module(LINK_RUNTIME_MODULE)
        control = importlib.import_module(CONTROL_HANDLERS_MODULE)
        core = importlib.import_module(CORE_RUNTIME_MODULE)
        for obj, name in ((fleet, "pull_messages"), (fleet, "push_messages"), (runtime, "pull_messages"),
                          (runtime, "push_messages"), (runtime, "acquire_task"), (control, "start_run"),
                          (core, "create_task")):
            if not callable(getattr(obj, name, None)):
                raise AttributeError(f"{getattr(obj, '__name__', obj)}.{name} is gone")
    except (ImportError, AttributeError) as e:
        return Patch("superlink-wait", False, f"cannot hold the SuperLink's pulls: {e}")
    _install(fleet, "pull_messages", lambda f: held(f, _no_messages, TO_SITES, hold_s))
    _install(runtime, "push_messages", lambda f: notifying(f, TO_SITES))
    _install(runtime, "pull_messages", lambda f: held(f, _no_messages, TO_SERVER, hold_s))
    _install(fleet, "push_messages", lambda f: notifying(f, TO_SERVER))
    _install(runtime, "acquire_task", lambda f: held(f, _no_task, RUNS, hold_s))
    _install(control, "start_run", lambda f: notifying(f, RUNS))
    _install(core, "create_task", lambda f: notifying(f, RUNS))
    return Patch("superlink-wait", True, f"empty Fleet, reply and task pulls wait up to {hold_s}s for a message")


def patch_supernode_wait(hold_s: float) -> Patch:
    """Long polling in the SuperNode: its SuperExec's empty task polls are held until a message is stored; its own
    wait for a ClientApp's reply wakes when the reply (or an object of it) is pushed."""
    sci = importlib.import_module(SUPERNODE_MODULE)
    try:
        runtime = importlib.import_module(NODE_RUNTIME_MODULE)
        for name in ("acquire_task", "push_task_output", "push_messages", "push_object"):
            if not callable(getattr(runtime, name, None)):
                raise AttributeError(f"{NODE_RUNTIME_MODULE}.{name} is gone")
        if not callable(getattr(sci, PULL_FUNCTION, None)):
            raise AttributeError(f"{SUPERNODE_MODULE}.{PULL_FUNCTION} is gone")
    except (ImportError, AttributeError) as e:
        return Patch("supernode-wait", False, f"cannot hold the SuperNode's task polls: {e}")
    _install(runtime, "acquire_task", lambda f: held(f, _no_task, TASKS, hold_s))
    for name in ("push_task_output", "push_messages", "push_object"):
        _install(runtime, name, lambda f: notifying(f, REPLIED))

    def pulled(inner: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            run_id = inner(*args, **kwargs)
            if run_id is not None:  # a message and its task are stored
                TASKS.notify()
            return run_id

        call.kumiki_notifying = inner  # type: ignore[attr-defined]
        return call

    _install(sci, PULL_FUNCTION, pulled)
    woken = isinstance(getattr(sci, "time", None), CappedTime)
    if woken:
        sci.time.wake = REPLIED
    return Patch("supernode-wait", True, f"empty task polls wait up to {hold_s}s for a message"
                 + ("; the reply wait wakes on the ClientApp's push" if woken else ""))


# --------------------------------------------------------------------------- supernode-alive
PULL_FUNCTION = "_pull_and_store_message"


def patch_supernode_alive(path: str) -> Patch:
    """Touch ``path`` after every Fleet pull that returns (see the module docstring)."""
    sci = importlib.import_module(SUPERNODE_MODULE)
    inner = getattr(sci, PULL_FUNCTION, None)
    if inner is None or f"{PULL_FUNCTION}(" not in inspect.getsource(sci.start_client_internal):
        return Patch("supernode-alive", False,
                     f"{SUPERNODE_MODULE}.start_client_internal no longer calls {PULL_FUNCTION}")
    inner = getattr(inner, "__wrapped__", inner)
    last = [0.0]

    def pulled(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        now = time.time()
        if now - last[0] >= 1.0:
            last[0] = now
            try:
                if os.path.exists(path):
                    os.utime(path)
                else:  # first pull of this process: the node id the SuperLink gave it
                    node_id = kwargs["state"].get_node_id() if "state" in kwargs else ""
                    with open(path + ".tmp", "w") as f:
                        f.write(f"{node_id}\n")
                    os.replace(path + ".tmp", path)
            except (OSError, KeyError, AttributeError, ValueError):
                pass  # a health file must never stop the SuperNode
        return out

    pulled.__wrapped__ = inner  # type: ignore[attr-defined]
    setattr(sci, PULL_FUNCTION, pulled)
    return Patch("supernode-alive", True, f"Fleet pulls touch {path}")


def alive(path: str, max_age_s: float = 30.0) -> tuple[bool, str]:
    """Whether the SuperNode behind ``path`` pulled from the SuperLink in the last ``max_age_s`` seconds."""
    try:
        age = time.time() - os.path.getmtime(path)
        node_id = open(path).read().split("\n", 1)[0].strip()
    except OSError:
        return False, f"not connected: no Fleet pull yet ({path} missing)"
    if age > max_age_s:
        return False, f"not connected: last Fleet pull {age:.0f}s ago (node {node_id})"
    return True, f"connected: node {node_id}, last Fleet pull {age:.1f}s ago"


# --------------------------------------------------------------------------- pull-backoff
def patch_pull_backoff(backoff_s: float) -> Patch:
    iu = importlib.import_module(INFLATABLE_MODULE)
    missing = []
    for fname in ("pull_objects", "pull_and_inflate_object_from_tree"):
        kw = getattr(getattr(iu, fname, None), "__kwdefaults__", None) or {}
        if "initial_backoff" not in kw:
            missing.append(fname)
    overridden = [m for m in PULL_CALLERS if "initial_backoff" in _source(m)]
    if missing or overridden:
        why = [f"{INFLATABLE_MODULE}.{f} has no initial_backoff keyword" for f in missing]
        why += [f"{m} passes initial_backoff itself" for m in overridden]
        return Patch("pull-backoff", False, "; ".join(why))
    for fname in ("pull_objects", "pull_and_inflate_object_from_tree"):
        getattr(iu, fname).__kwdefaults__["initial_backoff"] = backoff_s
    return Patch("pull-backoff", True, f"initial back-off of object pulls {backoff_s}s")


def _source(module: str) -> str:
    try:
        return inspect.getsource(importlib.import_module(module))
    except (ImportError, OSError, TypeError):
        return ""


# --------------------------------------------------------------------------- fork-executor
def _entry_points() -> dict[str, Callable[[], Any]]:
    """Console-script name -> function, for the task commands Flower's SubprocessExecutor runs."""
    from importlib.metadata import entry_points

    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    wanted = {TASK_TYPE_TO_COMMAND[t] for t in (TaskType.CLIENT_APP, TaskType.SERVER_APP)}
    found = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in wanted}
    if set(found) != wanted:
        raise LookupError(f"console scripts {sorted(wanted - set(found))} not found")
    return {name: ep.load() for name, ep in found.items()}


def task_argv(spec: Any) -> list[str]:
    """The command line Flower 1.41's ``SubprocessExecutor.launch`` builds for ``spec``."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    argv = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def make_fork_executor() -> type:
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor

    entries = _entry_points()

    class ForkExecutor(SubprocessExecutor):
        """``SubprocessExecutor``, except that ClientApp/ServerApp tasks run in a fork of this process."""

        def launch(self, spec):  # type: ignore[no-untyped-def]
            argv = task_argv(spec)
            entry = entries.get(argv[0])
            if entry is None:
                return super().launch(spec)
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork():
                return LaunchResult.accepted()
            code = 1
            try:
                if spec.suppress_output:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 2)
                exit_handler.registered_exit_handlers.clear()  # the parent's (its Runtime API client)
                sys.argv = argv
                entry()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - a child must never return into the parent's loop
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)

        def reconcile(self) -> None:
            """Reap finished children (Flower's loop calls this between task polls)."""
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return

    return ForkExecutor


def patch_fork_executor() -> Patch:
    rs = importlib.import_module(SUPEREXEC_MODULE)
    from flwr.supercore.constant import ExecutorType

    if not callable(getattr(rs, "get_executor", None)) or "get_executor" not in rs.run_superexec.__code__.co_names:
        return Patch("fork-executor", False, f"{SUPEREXEC_MODULE}.run_superexec no longer calls its get_executor")
    try:
        fork_cls = make_fork_executor()
    except (ImportError, LookupError, AttributeError) as e:
        return Patch("fork-executor", False, f"cannot build the fork executor: {e}")
    stock = rs.get_executor
    if getattr(stock, "kumiki_fork", False):
        return Patch("fork-executor", True, "already installed")

    def get_executor(executor_type, *args, **kwargs):  # type: ignore[no-untyped-def]
        if executor_type == ExecutorType.SUBPROCESS:
            return fork_cls()
        return stock(executor_type, *args, **kwargs)  # e.g. --executor kubernetes: Flower's own

    get_executor.kumiki_fork = True  # type: ignore[attr-defined]
    rs.get_executor = get_executor
    return Patch("fork-executor", True, "ClientApp/ServerApp tasks fork this pre-warmed SuperExec")


# --------------------------------------------------------------------------- client-cert
CLIENT_MODULE = "flwr.supercore.protobuf.client"


def client_context(verify: Any, cert: str, key: str) -> Any:
    """An ``ssl.SSLContext`` that verifies the server as ``verify`` says (a CA file path, a context, or True for
    the system store) and presents ``cert``/``key``; ``verify=False`` (no TLS) is returned as it is."""
    import ssl

    if verify is False:
        return verify
    if isinstance(verify, ssl.SSLContext):
        ctx = verify
    else:
        ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    ctx.load_cert_chain(cert, key)
    return ctx


def patch_client_cert(cert: str, key: str) -> Patch:
    try:
        mod = importlib.import_module(CLIENT_MODULE)
        cls = mod.ProtobufClient
        init = cls.__init__
        if "verify" not in inspect.signature(init).parameters:
            return Patch("client-cert", False, f"{CLIENT_MODULE}.ProtobufClient takes no 'verify' any more")
    except (ImportError, AttributeError) as e:
        return Patch("client-cert", False, f"{CLIENT_MODULE}.ProtobufClient not found: {e}")
    if getattr(init, "kumiki_client_cert", False):
        return Patch("client-cert", True, "already installed")

    def patched(self, base_url, *args, verify=True, **kwargs):  # type: ignore[no-untyped-def]
        if str(base_url).startswith("https://"):
            verify = client_context(verify, cert, key)
        init(self, base_url, *args, verify=verify, **kwargs)

    patched.kumiki_client_cert = True  # type: ignore[attr-defined]
    cls.__init__ = patched
    return Patch("client-cert", True, f"TLS clients present {cert}")


# --------------------------------------------------------------------------- app-sign / app-verify
SIGNATURE_TAG = b"kumiki-app-signature:"
SIGNER_ID = "kumiki-operator"  # the one trusted entity: the operator's app-signing key


def _eocd(fab: bytes) -> int:
    """Offset of the zip's end-of-central-directory record (the last one whose comment runs to the end)."""
    pos = fab.rfind(b"PK\x05\x06")
    while pos >= 0:
        if pos + 22 + int.from_bytes(fab[pos + 20:pos + 22], "little") == len(fab):
            return pos
        pos = fab.rfind(b"PK\x05\x06", 0, pos)
    raise ValueError("not a zip archive")


def split_signature(fab: bytes) -> tuple[bytes, dict | None]:
    """(the FAB with an empty archive comment, the signature record in its comment or None)."""
    import json

    pos = _eocd(fab)
    comment = fab[pos + 22:]
    unsigned = fab[:pos + 20] + b"\x00\x00"
    if not comment.startswith(SIGNATURE_TAG):
        return unsigned, None
    try:
        return unsigned, json.loads(comment[len(SIGNATURE_TAG):])
    except ValueError:
        return unsigned, None


def sign_fab(fab: bytes, key_path: str, signed_at: int | None = None) -> bytes:
    """``fab`` with the operator's signature in its archive comment (Flower's ed25519 message format)."""
    import base64
    import hashlib
    import json
    from pathlib import Path

    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, load_private_key, sign_message

    unsigned, _ = split_signature(fab)
    signed_at = int(time.time()) if signed_at is None else signed_at
    sig = sign_message(load_private_key(Path(key_path)),
                       create_message_to_sign(hashlib.sha256(unsigned).digest(), signed_at))
    record = json.dumps({"signed_at": signed_at, "signature": base64.urlsafe_b64encode(sig).decode().rstrip("=")})
    comment = SIGNATURE_TAG + record.encode()
    return unsigned[:-2] + len(comment).to_bytes(2, "little") + comment


def fab_signed_by(fab: bytes, public_key_openssh: str) -> bool:
    """Whether ``fab`` carries a valid signature of that ed25519 key over exactly its bytes (comment aside)."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, decode_base64url, verify_signature

    try:
        unsigned, record = split_signature(fab)
        if not record:
            return False
        key = load_ssh_public_key(public_key_openssh.encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            return False
        message = create_message_to_sign(hashlib.sha256(unsigned).digest(), int(record["signed_at"]))
        return bool(verify_signature(key, message, decode_base64url(str(record["signature"]))))
    except Exception:  # noqa: BLE001 - anything unreadable is unsigned
        return False


def patch_app_sign(key_path: str) -> Patch:
    try:
        run_mod = importlib.import_module("flwr.cli.run.run")
        build = run_mod.build_fab_from_disk
    except (ImportError, AttributeError) as e:
        return Patch("app-sign", False, f"flwr.cli.run.run.build_fab_from_disk not found: {e}")
    if getattr(build, "kumiki_sign", False):
        return Patch("app-sign", True, "already installed")

    def signed(app):  # type: ignore[no-untyped-def]
        return sign_fab(build(app), key_path)

    signed.kumiki_sign = True  # type: ignore[attr-defined]
    run_mod.build_fab_from_disk = signed
    return Patch("app-sign", True, f"FABs are signed with {key_path}")


def patch_app_verify(pub_path: str) -> Patch:
    """The SuperNode runs Flower's FAB check with one trusted entity, the operator's key, verified our way."""
    import json

    try:
        mod = importlib.import_module("flwr.supernode.start_client_internal")
        pull, verify = mod._pull_and_store_message, mod._verify_fab
        if "trusted_entities" not in inspect.signature(pull).parameters:
            return Patch("app-verify", False, "_pull_and_store_message takes no trusted_entities any more")
        public = open(pub_path).read().split(" kumiki-app-signing")[0].strip()
    except (ImportError, AttributeError, OSError) as e:
        return Patch("app-verify", False, f"cannot install the FAB check: {e}")
    if getattr(pull, "kumiki_verify", False):
        return Patch("app-verify", True, "already installed")

    def with_record(get_fab):  # type: ignore[no-untyped-def]
        def get(*args, **kwargs):  # type: ignore[no-untyped-def]
            fab = get_fab(*args, **kwargs)
            _, record = split_signature(fab.content)
            # Flower's gate ("valid_license": the FAB has verification records), then its check (``verify_fab``)
            fab.verifications = {"valid_license": "Valid", SIGNER_ID: json.dumps(record or {})}
            return fab
        return get

    def pull_verified(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["get_fab"] = with_record(kwargs["get_fab"])
        kwargs["trusted_entities"] = {SIGNER_ID: public}
        return pull(*args, **kwargs)

    def verify_fab(fab, trusted_entities):  # type: ignore[no-untyped-def]
        ok = fab_signed_by(fab.content, trusted_entities.get(SIGNER_ID, ""))
        if not ok:
            _, record = split_signature(fab.content)
            print(f"kumiki app-verify: refused app {fab.hash_str[:12]}: "
                  f"{'its signature is not the operator key' if record else 'it is not signed'} ({pub_path}); "
                  "none of its code runs here", file=sys.stderr, flush=True)
        return ok

    pull_verified.kumiki_verify = True  # type: ignore[attr-defined]
    mod._pull_and_store_message = pull_verified
    mod._verify_fab = verify_fab
    return Patch("app-verify", True, f"only apps signed by {pub_path} run here")


# --------------------------------------------------------------------------- superlink-objects
def patch_superlink_objects() -> Patch:
    cl = importlib.import_module(CONFIG_LOADER_MODULE)
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory

    current = getattr(cl, "ObjectStoreFactory", None)
    if getattr(current, "kumiki_in_memory", False):
        return Patch("superlink-objects", True, "already installed")
    fn = getattr(cl, "get_objectstore_linkstate_factories", None)
    if current is not ObjectStoreFactory or fn is None or "ObjectStoreFactory(database)" not in inspect.getsource(fn):
        return Patch("superlink-objects", False,
                     f"{CONFIG_LOADER_MODULE}.get_objectstore_linkstate_factories no longer builds ObjectStoreFactory(database)")

    class InMemoryObjects(ObjectStoreFactory):
        """Message payloads in memory; the link state (registered nodes, runs) stays in --database."""

        kumiki_in_memory = True

        def __init__(self, database: str = FLWR_IN_MEMORY_DB_NAME) -> None:
            super().__init__(FLWR_IN_MEMORY_DB_NAME)

    cl.ObjectStoreFactory = InMemoryObjects
    return Patch("superlink-objects", True, "message objects in memory, link state in --database")


# --------------------------------------------------------------------------- superlink-nodes
def make_durable_nodes_state() -> type:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.constant import NodeStatus

    class DurableNodesLinkState(InMemoryLinkState):
        """Flower's in-memory link state whose node registrations are also kept in a SQLite file (Flower's
        ``SqlLinkState`` on it, used for nodes only) and read back at start."""

        kumiki_durable_nodes = True

        def __init__(self, database: str, federation_manager: Any, object_store: Any) -> None:
            super().__init__(federation_manager, object_store)
            self.registry = SqlLinkState(database, federation_manager, object_store)

        def initialize(self) -> None:
            """Open the file (Flower's schema and migrations) and load its registered nodes, offline."""
            self.registry.initialize()
            with self.lock:
                for info in self.registry.get_node_info():
                    if info.status == NodeStatus.UNREGISTERED:
                        continue
                    self._put(info)

        def _put(self, info: Any) -> None:
            info.status = NodeStatus.REGISTERED  # liveness is not durable: the node activates again
            self.nodes[info.node_id] = info
            self.node_public_key_to_node_id[info.public_key] = info.node_id
            self.owner_to_node_ids.setdefault(info.owner_aid, set()).add(info.node_id)

        def create_node(self, owner_aid: str, owner_name: str, public_key: bytes, heartbeat_interval: float,
                        **kwargs: Any) -> int:
            with self.lock:
                if public_key in self.node_public_key_to_node_id:
                    raise ValueError("Public key already in use")
                node_id = self.registry.create_node(owner_aid, owner_name, public_key, heartbeat_interval, **kwargs)
                if node_id:
                    self._put(self.registry.get_node_info(node_ids=[node_id])[0])
                return node_id

        def delete_node(self, owner_aid: str, node_id: int) -> None:
            with self.lock:
                super().delete_node(owner_aid, node_id)  # raises for an unknown node or another owner
                self.registry.delete_node(owner_aid, node_id)

    return DurableNodesLinkState


def patch_superlink_nodes() -> Patch:
    lf = importlib.import_module(LINKSTATE_FACTORY_MODULE)
    current = getattr(lf, "SqlLinkState", None)
    if getattr(current, "kumiki_durable_nodes", False):
        return Patch("superlink-nodes", True, "already installed")
    try:
        src = inspect.getsource(lf.LinkStateFactory.state)
        if current is None or "SqlLinkState(" not in src or ".initialize()" not in src:
            raise AttributeError("LinkStateFactory.state no longer builds SqlLinkState(...) and initializes it")
        durable = make_durable_nodes_state()
    except (ImportError, AttributeError, OSError, TypeError) as e:
        return Patch("superlink-nodes", False, f"cannot keep messages in memory: {e}")
    lf.SqlLinkState = durable
    return Patch("superlink-nodes", True, "node registrations in --database, runs and messages in memory")


# --------------------------------------------------------------------------- entry points
def preload(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - optional: the child imports what it needs itself
            print(f"kumiki fastpath: could not preload {name}: {e}", file=sys.stderr)


def apply(mode: str) -> list[Patch]:
    """Apply the patches ``mode`` (``supernode`` or ``superexec``) uses, per the environment."""
    patches = []
    if mode == "flwr":
        cert, key = os.environ.get("KUMIKI_CLIENT_CERT"), os.environ.get("KUMIKI_CLIENT_KEY")
        signing = os.environ.get("KUMIKI_APP_SIGNING_KEY")
        return ([patch_client_cert(cert, key)] if cert and key else []) + ([patch_app_sign(signing)] if signing else [])
    hold = setting("KUMIKI_LONG_POLL_S")
    if mode == "superlink":
        objects = os.environ.get("KUMIKI_SUPERLINK_OBJECTS", DEFAULTS["KUMIKI_SUPERLINK_OBJECTS"])
        messages = os.environ.get("KUMIKI_SUPERLINK_MESSAGES", DEFAULTS["KUMIKI_SUPERLINK_MESSAGES"])
        return (([patch_superlink_objects()] if objects == "memory" else [])
                + ([patch_superlink_nodes()] if messages == "memory" else [])
                + ([patch_superlink_wait(hold)] if hold is not None else []))
    poll = setting("KUMIKI_SUPERNODE_POLL_S")
    if mode == "supernode" and poll is not None:
        patches.append(patch_supernode_poll(poll))
    alive_file = os.environ.get("KUMIKI_SUPERNODE_ALIVE_FILE")
    if mode == "supernode" and alive_file:
        patches.append(patch_supernode_alive(alive_file))
    backoff = setting("KUMIKI_PULL_BACKOFF_S")
    if backoff is not None:
        patches.append(patch_pull_backoff(backoff))
    if mode == "superexec" and os.environ.get("KUMIKI_FORK", DEFAULTS["KUMIKI_FORK"]) != "0":
        patches.append(patch_fork_executor())
    if mode == "supernode" and os.environ.get("KUMIKI_APP_SIGNING_PUB"):
        patches.append(patch_app_verify(os.environ["KUMIKI_APP_SIGNING_PUB"]))
    if mode == "supernode" and hold is not None:  # last: it wraps the pull the patches above installed
        patches.append(patch_supernode_wait(hold))
    return patches


def report(patches: list[Patch], mode: str) -> None:
    failed = [p for p in patches if not p.applied]
    line = ", ".join(f"{p.name}: {'on' if p.applied else 'NOT APPLIED'}" for p in patches) or "nothing to patch"
    print(f"kumiki fastpath ({mode}): {line}", file=sys.stderr)
    for p in failed:
        print(f"kumiki fastpath: {p.name} not applied ({p.detail}); this process runs Flower's stock behaviour",
              file=sys.stderr)
    if any(p.name == "app-verify" for p in failed):  # fail closed: stock Flower would run any app it is handed
        print("kumiki fastpath: KUMIKI_APP_SIGNING_PUB is set but apps cannot be verified; not starting",
              file=sys.stderr)
        sys.exit(EXIT_PATCH_FAILED)
    if failed and os.environ.get("KUMIKI_FASTPATH_STRICT") == "1":
        sys.exit(EXIT_PATCH_FAILED)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv else ""
    if mode == "check":
        patches = (apply("supernode") + [p for p in apply("superexec") if p.name == "fork-executor"]
                   + apply("superlink") + [patch_client_cert("operator.crt", "operator.key")])
        for p in patches:
            print(f"{p.name:<14} {'ok' if p.applied else 'FAILED'}  {p.detail}")
        sys.exit(0 if patches and all(p.applied for p in patches) else 1)
    if mode == "alive":
        ok, line = alive(os.environ.get("KUMIKI_SUPERNODE_ALIVE_FILE", ""), float(argv[0]) if argv else 30.0)
        print(line)
        sys.exit(0 if ok else 1)
    if mode not in ("supernode", "superexec", "superlink", "flwr"):
        sys.exit(f"usage: fastpath.py supernode|superexec|superlink|flwr <flwr arguments> | alive [MAX_AGE_S] | "
                 f"check   (got {mode!r})")
    if mode == "flwr":  # the CLI: quiet unless a patch fails (its output is parsed, e.g. --format json)
        patches = apply(mode)
        if any(not p.applied for p in patches):
            report(patches, mode)
        from flwr.cli.app import app as flwr_cli

        sys.argv = ["flwr", *argv]
        sys.exit(flwr_cli())
    if mode == "superexec":
        raw = os.environ.get("KUMIKI_PRELOAD")
        preload([m for m in (raw.split(",") if raw is not None else DEFAULT_PRELOAD) if m])
    if mode == "supernode" and os.environ.get("KUMIKI_SUPERNODE_ALIVE_FILE"):
        try:  # a restarted container keeps /tmp: an old file must not say "connected"
            os.unlink(os.environ["KUMIKI_SUPERNODE_ALIVE_FILE"])
        except OSError:
            pass
    report(apply(mode), mode)
    if mode == "supernode":
        from flwr.supernode.cli.flower_supernode import flower_supernode as entry
    elif mode == "superlink":
        from flwr.superlink.cli.flower_superlink import flower_superlink as entry
    else:
        from flwr.supercore.cli import flower_superexec as entry
    sys.argv = [f"flower-{mode}", *argv]
    sys.exit(entry())


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run as a file: its folder (launch/, or /opt/kumiki in images) is no place to import from
    main()
