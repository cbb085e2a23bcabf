"""launch/fastpath.py: every patch still applies to the pinned Flower and does what it says.

A Flower upgrade that moves one of the patched names must fail here, not silently cost the
deployment its speed (issue 13). The patches are applied in this process and undone after
each test; the standalone check runs the file from a folder of its own, as the images do.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import fastpath

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def flwr_modules(monkeypatch):
    """The three patched flwr modules, restored after the test."""
    sci = importlib.import_module(fastpath.SUPERNODE_MODULE)
    iu = importlib.import_module(fastpath.INFLATABLE_MODULE)
    rs = importlib.import_module(fastpath.SUPEREXEC_MODULE)
    cl = importlib.import_module(fastpath.CONFIG_LOADER_MODULE)
    monkeypatch.setattr(cl, "ObjectStoreFactory", cl.ObjectStoreFactory)
    monkeypatch.setattr(sci, "time", sci.time)
    monkeypatch.setattr(sci, fastpath.PULL_FUNCTION, getattr(sci, fastpath.PULL_FUNCTION))
    monkeypatch.setattr(rs, "get_executor", rs.get_executor)
    saved = {f: dict(getattr(iu, f).__kwdefaults__) for f in ("pull_objects", "pull_and_inflate_object_from_tree")}
    yield sci, iu, rs
    for f, kw in saved.items():
        getattr(iu, f).__kwdefaults__.clear()
        getattr(iu, f).__kwdefaults__.update(kw)


def _spec(**kw):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec

    base = dict(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="tok", insecure=False,
                root_certificates_path=None, runtime_dependency_install=False, parent_pid=None, suppress_output=False,
                task_id=7)
    return ExecutionSpec(**{**base, **kw})


def test_every_patch_applies_to_the_pinned_flower_and_takes_effect(flwr_modules, monkeypatch, tmp_path):
    sci, iu, rs = flwr_modules
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec.executor import SubprocessExecutor

    assert sci.time is time, "flwr's SuperNode no longer sleeps through the time module"
    patches = {p.name: p for p in [fastpath.patch_supernode_poll(0.2), fastpath.patch_pull_backoff(0.05),
                                    fastpath.patch_fork_executor(), fastpath.patch_superlink_objects()]}
    assert all(p.applied for p in patches.values()), {n: p.detail for n, p in patches.items() if not p.applied}

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    sci.time.sleep(3)  # the SuperNode's idle Fleet-pull sleep
    sci.time.sleep(0.01)
    assert slept == [0.2, 0.01]
    assert abs(sci.time.monotonic() - time.monotonic()) < 1.0  # everything else is the real module

    for f in ("pull_objects", "pull_and_inflate_object_from_tree"):
        assert getattr(iu, f).__kwdefaults__["initial_backoff"] == 0.05, f

    executor = rs.get_executor(ExecutorType.SUBPROCESS)
    assert type(executor).__name__ == "ForkExecutor" and isinstance(executor, SubprocessExecutor)

    # the SuperLink: link state (registered nodes, runs) in the --database file, message objects in memory
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink.config_loader import get_objectstore_linkstate_factories
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

    objects, links = get_objectstore_linkstate_factories(str(tmp_path / "superlink.db"), NoOpFederationManager())
    assert isinstance(objects.store(), InMemoryObjectStore) and isinstance(links.state(), SqlLinkState)
    assert (tmp_path / "superlink.db").is_file()


def test_the_fork_executor_builds_flowers_own_command_line(monkeypatch):
    """task_argv must equal what SubprocessExecutor.launch would have exec'ed, for every flag combination."""
    import flwr.supercore.superexec.executor.subprocess_executor as se
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import SubprocessExecutor

    seen = []
    monkeypatch.setattr(se.subprocess, "Popen", lambda args, **kw: seen.append(list(args)))
    specs = [_spec(), _spec(insecure=True, parent_pid=42), _spec(root_certificates_path="/c/ca.crt"),
             _spec(task_type=TaskType.SERVER_APP, runtime_dependency_install=True, root_certificates_path="/ca")]
    for spec in specs:
        SubprocessExecutor().launch(spec)
        assert fastpath.task_argv(spec) == seen[-1]


def test_the_fork_executor_runs_the_task_in_a_fork_with_that_command_line(tmp_path, monkeypatch):
    out = tmp_path / "child.txt"

    def fake_clientapp():  # stands in for flwr's flwr-clientapp entry point
        # written whole, then renamed: on a loaded machine the parent's poll saw a half-written file
        tmp = out.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n{' '.join(sys.argv)}")
        os.replace(tmp, out)

    monkeypatch.setattr(fastpath, "_entry_points", lambda: {"flwr-clientapp": fake_clientapp})
    spec = _spec(root_certificates_path="/c/ca.crt", parent_pid=5)
    result = fastpath.make_fork_executor()().launch(spec)
    assert result.status == "accepted"
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    pid, argv = out.read_text().split("\n")
    assert int(pid) != os.getpid()
    assert argv.split() == fastpath.task_argv(spec)
    os.waitpid(int(pid), 0)


def test_a_flower_upgrade_that_moves_a_name_is_reported_not_silent(flwr_modules, monkeypatch, capsys):
    sci, iu, rs = flwr_modules

    monkeypatch.setattr(sci, "time", object())  # e.g. upstream switched to `from time import sleep`
    assert not fastpath.patch_supernode_poll(0.2).applied

    def pull_objects(object_ids, pull_object_fn, *, max_backoff=1.0):  # the keyword renamed upstream
        return {}

    monkeypatch.setattr(iu, "pull_objects", pull_objects)
    assert not fastpath.patch_pull_backoff(0.05).applied

    monkeypatch.setattr(rs, "run_superexec", lambda *a, **k: None)  # the executor chosen elsewhere
    assert not fastpath.patch_fork_executor().applied

    cl = importlib.import_module(fastpath.CONFIG_LOADER_MODULE)
    monkeypatch.setattr(cl, "get_objectstore_linkstate_factories", lambda database, fm: (None, None))
    assert not fastpath.patch_superlink_objects().applied

    patches = fastpath.apply("supernode") + fastpath.apply("superexec") + fastpath.apply("superlink")
    fastpath.report(patches, "test")
    assert "NOT APPLIED" in capsys.readouterr().err
    monkeypatch.setenv("KUMIKI_FASTPATH_STRICT", "1")
    with pytest.raises(SystemExit) as e:
        fastpath.report(patches, "test")
    assert e.value.code == fastpath.EXIT_PATCH_FAILED


def test_a_supernode_that_cannot_verify_apps_does_not_start(monkeypatch, tmp_path):
    """app-verify fails closed: with KUMIKI_APP_SIGNING_PUB set and the check not installable (a key that cannot be
    read here; a Flower upgrade that moved the hook), the SuperNode exits 78 instead of running any app, strict or not."""
    monkeypatch.delenv("KUMIKI_FASTPATH_STRICT", raising=False)
    patch = fastpath.patch_app_verify(str(tmp_path / "no-such-key.pub"))
    assert not patch.applied
    fastpath.report([fastpath.Patch("supernode-poll", False, "moved")], "test")  # others: run stock, as before
    with pytest.raises(SystemExit) as e:
        fastpath.report([patch], "supernode")
    assert e.value.code == fastpath.EXIT_PATCH_FAILED


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("KUMIKI_SUPERNODE_POLL_S", raising=False)
    assert fastpath.setting("KUMIKI_SUPERNODE_POLL_S") == 0.2
    monkeypatch.setenv("KUMIKI_SUPERNODE_POLL_S", "off")
    assert fastpath.setting("KUMIKI_SUPERNODE_POLL_S") is None
    monkeypatch.setenv("KUMIKI_FORK", "0")
    assert [p.name for p in fastpath.apply("superexec")] == ["pull-backoff"]


def test_the_module_runs_standalone_as_the_images_copy_it(tmp_path):
    """Copied alone into a folder (as deploy/Dockerfile does), it imports only stdlib and flwr."""
    alone = tmp_path / "opt" / "fastpath.py"
    alone.parent.mkdir()
    shutil.copy(ROOT / "launch" / "fastpath.py", alone)
    probe = ("import runpy, sys\n"
             f"sys.argv = [{str(alone)!r}, 'check']\n"
             "try:\n"
             f"    runpy.run_path({str(alone)!r}, run_name='__main__')\n"
             "finally:\n"
             "    ours = ('launch', 'kumiki', 'client', 'server', 'strategies', 'models')\n"
             "    print('kumiki modules:', sorted(m for m in sys.modules if m.split('.')[0] in ours))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:8]] == [
        ["supernode-poll", "ok"], ["pull-backoff", "ok"], ["supernode-wait", "ok"], ["fork-executor", "ok"],
        ["superlink-objects", "ok"], ["superlink-nodes", "ok"], ["superlink-wait", "ok"], ["client-cert", "ok"]]
    assert lines[8] == "kumiki modules: []", "the fast path must not need Kumiki's code installed"


def test_the_supernode_health_file_means_connected_and_polling(flwr_modules, monkeypatch, tmp_path, capsys):
    """The compose health check (``fastpath.py alive``): healthy only after a Fleet pull returned, and
    only while pulls keep returning; the file names the node id the SuperLink gave."""
    sci, _, _ = flwr_modules
    path = str(tmp_path / "alive")
    calls = []

    class State:
        def get_node_id(self):
            return 4242

    monkeypatch.setattr(sci, fastpath.PULL_FUNCTION, lambda **kw: calls.append(kw) or None)
    assert fastpath.alive(path)[0] is False  # started, not yet connected
    patch = fastpath.patch_supernode_alive(path)
    assert patch.applied, patch.detail
    assert "_pull_and_store_message(" in __import__("inspect").getsource(sci.start_client_internal)
    getattr(sci, fastpath.PULL_FUNCTION)(state=State())  # what the SuperNode's loop calls after connecting
    assert len(calls) == 1
    ok, line = fastpath.alive(path)
    assert ok and "node 4242" in line, line
    old = time.time() - 120  # no pull for two minutes: the SuperLink is gone
    os.utime(path, (old, old))
    ok, line = fastpath.alive(path, 30)
    assert not ok and "120s ago" in line, line
    monkeypatch.setenv("KUMIKI_SUPERNODE_ALIVE_FILE", path)
    with pytest.raises(SystemExit) as e:
        fastpath.main(["alive", "30"])
    assert e.value.code == 1 and "not connected" in capsys.readouterr().out


@pytest.fixture
def wait_modules(monkeypatch):
    """The classes and modules superlink-wait / supernode-wait wrap, restored after the test."""
    fleet = importlib.import_module("flwr.server.superlink.fleet.grpc_rere.fleet_servicer").FleetServicer
    handlers = importlib.import_module(fastpath.FLEET_HANDLERS_MODULE)
    link = importlib.import_module(fastpath.LINK_RUNTIME_MODULE)
    node = importlib.import_module(fastpath.NODE_RUNTIME_MODULE)
    sci = importlib.import_module(fastpath.SUPERNODE_MODULE)
    control = importlib.import_module(fastpath.CONTROL_HANDLERS_MODULE)
    core = importlib.import_module(fastpath.CORE_RUNTIME_MODULE)
    for obj, names in ((handlers, ("pull_messages", "push_messages")),
                       (link, ("pull_messages", "push_messages", "acquire_task")),
                       (control, ("start_run",)), (core, ("create_task",)),
                       (node, ("acquire_task", "push_task_output", "push_messages", "push_object")),
                       (sci, (fastpath.PULL_FUNCTION, "time"))):
        for name in names:
            monkeypatch.setattr(obj, name, getattr(obj, name))
    return fleet, link, node, sci


def _later(seconds, fn):
    import threading

    t = threading.Timer(seconds, fn)
    t.start()
    return t


def test_an_empty_fleet_pull_is_answered_when_the_server_pushes_a_message(wait_modules, monkeypatch):
    """superlink-wait: a SuperNode's empty pull waits in the SuperLink and is answered as soon as the ServerApp
    pushes (long before the hold ends), with Flower's own answer taken again; with nothing pushed, it ends after
    the hold; the ServerApp's reply pull is held the same way until a site pushes its reply, and its SuperExec's
    task poll until a run starts. Through the gRPC servicer here; the HTTP transport calls the same handlers."""
    from flwr.proto.fleet_pb2 import PullMessagesResponse
    from flwr.proto.message_pb2 import Message as MessageProto
    from flwr.proto.runtime_pb2 import AcquireTaskResponse, PullAppMessagesResponse
    from flwr.proto.task_pb2 import Task
    from flwr.superlink.servicer.fleet import fleet_handlers

    fleet, link, _, _ = wait_modules
    queued, replies, looked = [], [], []

    def pull(request, state, store):  # Flower's handler: what the link state holds for this node now
        looked.append(1)
        return PullMessagesResponse(messages_list=list(queued))

    monkeypatch.setattr(fleet_handlers, "pull_messages", pull)
    monkeypatch.setattr(link, "push_messages", lambda request, state, task: queued.append(MessageProto()))
    monkeypatch.setattr(link, "pull_messages", lambda request, state, task: PullAppMessagesResponse(
        messages_list=list(replies)))
    monkeypatch.setattr(fleet_handlers, "push_messages", lambda request, state: replies.append(MessageProto()))
    control = importlib.import_module(fastpath.CONTROL_HANDLERS_MODULE)
    started = []
    monkeypatch.setattr(link, "acquire_task", lambda request, state: AcquireTaskResponse(
        task=Task(task_id=1), token="t") if started else AcquireTaskResponse())
    monkeypatch.setattr(control, "start_run", lambda *a, **k: started.append(1))
    hold = 30.0
    assert fastpath.patch_superlink_wait(hold).applied

    class Factory:
        def state(self):
            return None

        store = state

    servicer = fleet(Factory(), Factory(), False)
    t0 = time.monotonic()
    timer = _later(0.3, lambda: link.push_messages(None, None, None))  # the ServerApp sends a message
    got = servicer.PullMessages(None, None)
    took = time.monotonic() - t0
    timer.join()
    assert len(got.messages_list) == 1 and len(looked) >= 2
    assert 0.25 <= took < hold / 2, took  # woken by the push, not by the end of the hold

    timer = _later(0.3, lambda: servicer.PushMessages(None, None))  # a site replies
    t0 = time.monotonic()
    got = link.pull_messages(None, None, None)  # the ServerApp's reply pull
    timer.join()
    assert len(got.messages_list) == 1 and time.monotonic() - t0 < hold / 2

    timer = _later(0.3, lambda: control.start_run(None))  # `flwr run`: the ServerApp's task is created
    t0 = time.monotonic()
    got = link.acquire_task(None, None)  # the ServerApp's SuperExec asking for work
    timer.join()
    assert got.HasField("task") and time.monotonic() - t0 < hold / 2

    assert fastpath.patch_superlink_wait(0.2).applied  # installed once: a second apply wraps nothing again
    queued.clear()
    monkeypatch.setattr(fleet_handlers, "pull_messages", fastpath.held(
        fleet_handlers.pull_messages.kumiki_held, fastpath._no_messages, fastpath.TO_SITES, 0.2))
    t0 = time.monotonic()
    assert len(servicer.PullMessages(None, None).messages_list) == 0  # nothing came: empty after the hold
    assert time.monotonic() - t0 >= 0.2
    # Flower's default Fleet transport (HTTP) reaches the same handlers, by module attribute
    import inspect

    http = inspect.getsource(importlib.import_module("flwr.superlink.routers.fleet.router"))
    assert "fleet_handlers.pull_messages(" in http and "fleet_handlers.push_messages(" in http


def test_the_supernode_hands_a_task_over_and_wakes_for_a_reply_at_once(wait_modules, monkeypatch):
    """supernode-wait: the SuperExec's empty task poll waits until the SuperNode stores a message; the SuperNode's
    reply wait (its capped ``time.sleep``) ends when the ClientApp pushes."""
    from flwr.proto.runtime_pb2 import AcquireTaskResponse
    from flwr.proto.task_pb2 import Task

    _, _, node, sci = wait_modules
    stored = []
    monkeypatch.setattr(node, "acquire_task", lambda request, state: AcquireTaskResponse(
        task=Task(task_id=7), token="t") if stored else AcquireTaskResponse())
    monkeypatch.setattr(sci, fastpath.PULL_FUNCTION, lambda **kw: stored.append(1) or 42)  # a message came: run 42
    monkeypatch.setattr(node, "push_task_output", lambda *a: None)
    hold = 30.0
    assert fastpath.patch_supernode_poll(20.0).applied
    assert fastpath.patch_supernode_wait(hold).applied

    t0 = time.monotonic()
    timer = _later(0.3, lambda: getattr(sci, fastpath.PULL_FUNCTION)(state=None))
    got = node.acquire_task(None, None)
    timer.join()
    assert got.HasField("task") and got.task.task_id == 7
    assert time.monotonic() - t0 < hold / 2

    fastpath.REPLIED.clear()
    timer = _later(0.3, lambda: node.push_task_output(None, None, None))  # the ClientApp's reply
    t0 = time.monotonic()
    sci.time.sleep(20.0)  # Flower's `while not replies: time.sleep(0.5)`, capped at 20 s here
    timer.join()
    assert time.monotonic() - t0 < 10.0
    assert not fastpath.REPLIED.is_set()  # consumed: the next sleep waits again


def test_registrations_survive_a_restart_while_messages_never_touch_the_file(monkeypatch, tmp_path):
    """superlink-nodes: with --database, a node registered (flwr supernode register) is in the file and is read
    back by the next SuperLink on it, under the same id and key, and can activate; an unregistered one is not;
    polls, heartbeats and runs execute no SQL (they live in memory)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from flwr.superlink.config_loader import get_objectstore_linkstate_factories
    from flwr.superlink.federation import NoOpFederationManager

    lf = importlib.import_module(fastpath.LINKSTATE_FACTORY_MODULE)
    monkeypatch.setattr(lf, "SqlLinkState", lf.SqlLinkState)
    assert fastpath.patch_superlink_nodes().applied
    db = str(tmp_path / "superlink.db")

    def superlink():  # a SuperLink starting on the file
        return get_objectstore_linkstate_factories(db, NoOpFederationManager())[1].state()

    first = superlink()
    assert getattr(first, "kumiki_durable_nodes", False)
    kept = first.create_node("owner", "op", b"key-a", 30.0)
    gone = first.create_node("owner", "op", b"key-b", 30.0)
    first.delete_node("owner", gone)
    with pytest.raises(ValueError):
        first.create_node("owner", "op", b"key-a", 30.0)  # a key joins once
    statements = []
    listener = lambda *a: statements.append(a[2])  # noqa: E731
    event.listen(Engine, "before_cursor_execute", listener)
    try:
        assert first.activate_node(kept, 30.0)
        first.acknowledge_node_heartbeat(kept, 30.0)
        assert first.get_message_ins(node_id=kept, limit=1) == []
    finally:
        event.remove(Engine, "before_cursor_execute", listener)
    assert statements == [], "a poll or heartbeat ran SQL"

    second = superlink()  # the restart
    assert second.get_node_id_by_public_key(b"key-a") == kept
    assert second.get_node_id_by_public_key(b"key-b") is None
    assert second.activate_node(kept, 30.0), "a registered site joins again after the restart"


def test_held_requests_are_bounded_so_a_server_keeps_threads_for_the_rest(monkeypatch):
    """With MAX_HELD requests already waiting, the next empty poll is answered at once (a held request occupies one
    of the server's threads, and heartbeats and pushes need them too); a held one frees its place when it returns."""
    import threading

    signal, queued = fastpath.Signal(), []
    poll = fastpath.held(lambda: list(queued), lambda out: not out, signal, 30.0)
    monkeypatch.setattr(fastpath, "_HOLDS", threading.BoundedSemaphore(1))
    got = []
    waiting = threading.Thread(target=lambda: got.append(poll()))
    waiting.start()
    time.sleep(0.3)  # that one holds the only place
    t0 = time.monotonic()
    assert poll() == [] and time.monotonic() - t0 < 10.0, "answered at once, not held"
    queued.append("message")
    signal.notify()
    waiting.join(35)
    assert got == [["message"]]
    assert fastpath._HOLDS.acquire(blocking=False), "the place is free again"
