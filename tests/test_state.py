"""Durable site state: a site killed mid-round restarts bit-identical to its last completed round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.state import FILE, SiteState, SiteStore, StateMismatch
from kumiki import contract as C, packing
from kumiki.contract import Job
from kumiki.split import ParamSplit
from launch.engines import node_configs, prepare_sites
from server.federation import model_spec
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client.app import app
from kumiki.config import validate
from kumiki.contract import Job, CONFIG, ARRAYS, to_record
from server.federation import model_spec
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
spec = json.loads(sys.argv[1]); cfg = validate(spec["cfg"])
job = Job(2, cfg.method, cfg.train, model_spec(cfg), cfg.privacy)
msg = Message(RecordDict({ARRAYS: to_record({}), CONFIG: job.to_config()}), dst_node_id=1, message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=1, node_config=spec["node"], state=RecordDict(), run_config={})
print("training", flush=True)
app(msg, ctx)
print("finished", flush=True)
"""


def _train_msg(cfg, rnd):
    job = Job(rnd, cfg.method, cfg.train, model_spec(cfg), cfg.privacy)
    return Message(RecordDict({C.ARRAYS: C.to_record({}), C.CONFIG: job.to_config()}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def _predict(cfg, node):
    """Personalized logits of the site after reloading its state in a fresh model."""
    from client.app import prepare

    job = Job(3, cfg.method, cfg.train, model_spec(cfg), cfg.privacy)
    msg = Message(RecordDict({C.ARRAYS: C.to_record({}), C.CONFIG: job.to_config()}), dst_node_id=1,
                  message_type=MessageType.EVALUATE)
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    sj, objective, _, _ = prepare(msg, ctx, for_training=False)
    sj.model.eval()
    with torch.no_grad():
        return objective.predict_personal(sj.model, torch.from_numpy(sj.data.x_test))


def test_site_killed_mid_round_resumes_bit_identical(tmp_path):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = make_config(tmp_path, method="local", sites=2)
    node = node_configs(cfg, prepare_sites(cfg))[0]
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    reply = client_app.app(_train_msg(cfg, 1), ctx)
    assert not reply.has_error(), reply.error
    path = Path(node["state-dir"]) / FILE
    before_bytes = path.read_bytes()
    before_logits = _predict(cfg, node)

    # Round 2 in a separate ClientApp process with a long local job; kill -9 it mid-training.
    long_cfg = make_config(tmp_path, method="local", sites=2, train={"local_epochs": 1000})
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps({"cfg": json.loads(long_cfg.model_dump_json()), "node": node})],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "training"
        time.sleep(2.0)  # well inside the 1,000 epochs
        assert proc.poll() is None, "the worker finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)

    assert path.read_bytes() == before_bytes  # nothing half-written
    state = SiteStore(path.parent).load(torch.load(path, weights_only=True)["fingerprint"])
    assert state.last_round == 1
    assert torch.equal(_predict(cfg, node), before_logits)  # a fresh process predicts exactly as before

    # A normal round 2 then advances the state.
    reply = client_app.app(_train_msg(cfg, 2), ctx)
    assert not reply.has_error()
    assert SiteStore(path.parent).load(state.fingerprint).last_round == 2
    assert path.read_bytes() != before_bytes


def test_store_roundtrip_and_fingerprint_guard(tmp_path):
    store = SiteStore(tmp_path / "s")
    st = SiteState("abc", 4, {"head.weight": torch.randn(3, 2)}, {"v": {"w": torch.ones(2)}, "eps": 1.5, "note": "x"})
    store.save(st)
    back = store.load("abc")
    assert back.last_round == 4 and torch.equal(back.personal["head.weight"], st.personal["head.weight"])
    assert back.extra["eps"] == 1.5 and torch.equal(back.extra["v"]["w"], torch.ones(2))
    try:
        store.load("other")
    except StateMismatch as e:
        assert "another model" in str(e)
    else:
        raise AssertionError("a state written for another split must be refused")


def test_a_crash_while_saving_leaves_the_previous_state_intact(tmp_path, monkeypatch):
    """Temp file + rename: a writer that dies half-way never truncates or half-writes the live file."""
    import client.state as state_mod

    store = SiteStore(tmp_path / "s")
    store.save(SiteState("fp", 1, {"head.weight": torch.ones(4, 4)}))
    good = store.path.read_bytes()

    def dying_save(obj, f, *a, **kw):
        f.write(b"\x80partial")  # the process dies half-way through the write
        raise OSError("disk full")

    monkeypatch.setattr(state_mod.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        store.save(SiteState("fp", 2, {"head.weight": torch.zeros(4, 4)}))
    assert store.path.read_bytes() == good
    back = store.load("fp")
    assert back.last_round == 1 and torch.equal(back.personal["head.weight"], torch.ones(4, 4))
    assert [p.name for p in store.root.iterdir()] == [FILE], "no temp file is left behind"


@pytest.mark.parametrize("method, knobs", [("fedper", {}), ("fedrep", {}), ("dualfed", {}), ("local", {}), ("floral", {}),
                                           ("local_adaptors", {}),
                                           ("fedhb", {"bn_stats": "personal"}), ("mfed", {"encoder_bn_stats": "personal"})])
def test_every_message_reloads_the_personal_tensors_from_the_state_file(tmp_path, method, knobs):
    """Whatever the site's memory holds, the model a message builds carries exactly the saved personal tensors."""
    from client.app import _fingerprint, prepare
    from kumiki.split import ParamSplit
    from models import build_model

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = make_config(tmp_path, method=method, sites=2, knobs=knobs, model={"arch": "cnn"})
    node = node_configs(cfg, prepare_sites(cfg))[0]
    job = Job(4, cfg.method, cfg.train, model_spec(cfg), cfg.privacy)
    model = build_model(job.model, cfg.method)
    split = ParamSplit.build(model, cfg.method.split_rules())
    assert split.personal
    g = torch.Generator().manual_seed(1)
    saved = {k: (torch.rand(v.shape, generator=g) + 0.5).to(v.dtype) if v.is_floating_point() else v + 7
             for k, v in model.state_dict().items() if k in split.personal}
    SiteStore(node["state-dir"]).save(SiteState(_fingerprint(split, job, model, node["site"]), 3, saved))
    shared = {k: v for k, v in model.state_dict().items() if k in split.travelling(None)}
    content = RecordDict({C.CONFIG: job.to_config()})
    packing.put(content, shared)
    msg = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    sj, _, _, _ = prepare(msg, ctx, for_training=False)
    got = sj.model.state_dict()
    for k, v in saved.items():
        assert torch.equal(got[k].cpu(), v), f"{method}: personal tensor {k} was not reloaded from the state file"
    assert sj.state.last_round == 3


def _long_lived_state_dirs(root: Path):
    """A grid hook: every site keeps its state in ``root/<site>``, as a factory's state dir outlives runs."""
    def hook(grid):
        for ctx in grid.contexts.values():
            ctx.node_config["state-dir"] = str(root / str(ctx.node_config["site"]))
    return hook


def test_a_new_run_archives_the_previous_runs_state_and_starts_fresh(tmp_path):
    """A factory's state dir serves run after run: a new run (another name, or a rerun of the same name) moves the
    earlier run's files to previous-runs/ and trains from fresh personal state; nothing is refused or lost."""
    from launch.engines.inprocess import run_inprocess

    states = tmp_path / "factory-state"
    first = make_config(tmp_path, method="fedper", rounds=2, sites=2, name="first")
    assert run_inprocess(first, quiet=True, grid_hook=_long_lived_state_dirs(states))["status"] == "ok"
    live = torch.load(states / "site-0" / FILE, weights_only=True)
    assert live["run"] == "first" and live["last_round"] == 2
    for name, overwrite in (("second", False), ("second", True)):  # another run, then a rerun of the same name
        cfg = make_config(tmp_path, method="fedper", rounds=1, sites=2, name=name)
        assert run_inprocess(cfg, quiet=True, overwrite=overwrite,
                             grid_hook=_long_lived_state_dirs(states))["status"] == "ok"
        now = torch.load(states / "site-0" / FILE, weights_only=True)
        assert now["run"] == name and now["run_id"] != live["run_id"] and now["last_round"] == 1
        archived = torch.load(states / "site-0" / "previous-runs" / f"{live['run']}.{live['run_id']}" / FILE,
                              weights_only=True)
        assert archived["last_round"] == live["last_round"]
        assert all(torch.equal(archived["personal"][k], live["personal"][k]) for k in live["personal"])
        live = now


def test_another_runs_state_is_refused_when_the_server_says_this_run_trained_here(tmp_path):
    """Archiving is for a run's start: mid-run (the server counts this site's rounds) a foreign file is an error."""
    from client.app import load_state
    from client.site import SiteInfo

    store = SiteStore(tmp_path / "s")
    store.claim("site-0")
    store.save(SiteState("fp", last_round=3, run="old", run_id="aaa"))
    cfg = make_config(tmp_path, method="fedper")
    job = Job(4, cfg.method, cfg.train, model_spec(cfg), cfg.privacy, run="new", run_id="bbb")
    info = SiteInfo("site-0", "train", "", tmp_path, tmp_path / "s")
    split = ParamSplit.from_rules(["w"], shared=["*"])
    with pytest.raises(StateMismatch, match="belongs to run 'old'"):
        load_state(store, "fp", split, info, job, completed=3, node_config={})
    assert store.exists() and store.run_of() == ("old", "aaa")  # untouched
    state = load_state(store, "fp", split, info, job, completed=0, node_config={})
    assert state.last_round == 0 and (state.run, state.run_id) == ("new", "bbb")
    assert (tmp_path / "s" / "previous-runs" / "old.aaa" / FILE).is_file()
