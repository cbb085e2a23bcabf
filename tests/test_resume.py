"""Server resume (issue 12, part 6): a run killed after round k continues from its checkpoint as if it had
never stopped: same sampled sites, same model bit for bit, every round recorded once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from kumiki import contract as C
from launch.engines import local
from launch.engines.inprocess import run_inprocess
from launch.rundir import RunDirError
from tests.conftest import make_config


class Crash(BaseException):
    """The server process dies (not an Exception: nothing may swallow it)."""


def _crash_at(round_: int, mid: bool):
    """A grid hook: the server dies when it sends round ``round_``'s training messages, before the sites get
    them (``mid=False``) or after they trained and replied, before the server aggregated (``mid=True``)."""
    def hook(grid):
        real = grid.send_and_receive

        def send_and_receive(messages, *, timeout=None):
            messages = list(messages)
            train = [m for m in messages if m.metadata.message_type == "train"]
            if train and int(train[0].content[C.CONFIG][C.ROUND]) == round_:
                if mid:
                    real(messages, timeout=timeout)
                raise Crash(f"server killed in round {round_}")
            return real(messages, timeout=timeout)

        grid.send_and_receive = send_and_receive
    return hook


def _checkpoint(cfg) -> dict[str, np.ndarray]:
    with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
        return {k: z[k].copy() for k in z.files}


def _states(cfg) -> dict[str, dict]:
    return {p.parent.name: torch.load(p, weights_only=True) for p in (cfg.run_dir() / "state").glob("*/site_state.pt")}


def _records(cfg) -> list[dict]:
    return [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]


def _same_tensors(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where


# bit for bit needs the server's noise seeded: the research switch (not private), as a resumed run is compared
CENTRAL_DP = {"central": True, "central_noise_multiplier": 0.3, "target_epsilon": 1000.0, "reproducible_noise": True}


@pytest.mark.parametrize("method, mid", [("fedavg", False), ("fedper", True)], ids=["between-rounds", "mid-round"])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, method, mid):
    """FedAvg with central DP (its noise follows from the release count) killed between rounds 2 and 3; FedPer
    (personal heads) killed after the sites trained round 3, before the server aggregated it: they train round 3
    again from their round-2 state. Two of three sites are sampled per round, so the sampling RNG must be
    restored too."""
    kw = dict(method=method, rounds=4, sites=3, server={"fraction_train": 0.6, "discovery_timeout_s": 20.0},
              privacy=CENTRAL_DP if method == "fedavg" else {})
    ref = make_config(tmp_path, name="ref", **kw)
    run_inprocess(ref, quiet=True)

    cfg = make_config(tmp_path, name="cut", **kw)
    with pytest.raises(Crash):
        run_inprocess(cfg, quiet=True, grid_hook=_crash_at(3, mid))
    assert json.loads((cfg.run_dir() / "summary.json").read_text())["status"] == "failed"
    summary = run_inprocess(cfg, quiet=True, resume=True)

    assert summary["status"] == "ok" and summary["rounds"] == 4 and summary["resumed_after"] == [2]
    ckpt, want = _checkpoint(cfg), _checkpoint(ref)
    assert set(ckpt) == set(want)
    for k in want:
        assert np.array_equal(ckpt[k], want[k]), f"global tensor {k} differs from the uninterrupted run"
    states, want_states = _states(cfg), _states(ref)
    assert set(states) == set(want_states) == {"site-0", "site-1", "site-2"}
    for site in want_states:
        assert states[site]["last_round"] == want_states[site]["last_round"]
        _same_tensors(states[site]["personal"], want_states[site]["personal"], f"{site} personal")
        _same_tensors(states[site]["extra"], want_states[site]["extra"], f"{site} extra")
    rows = [r for r in _records(cfg) if r["kind"] == "round"]
    ref_rows = [r for r in _records(ref) if r["kind"] == "round"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4], "every round recorded once"
    assert [r["sites"]["took_part"] for r in rows] == [r["sites"]["took_part"] for r in ref_rows]
    assert [r["personalized"] for r in rows] == [r["personalized"] for r in ref_rows]
    assert [r["kind"] for r in _records(cfg)].count("final") == 1
    assert summary["participation"]["trained_rounds"] == json.loads(
        (ref.run_dir() / "summary.json").read_text())["participation"]["trained_rounds"]


def test_resume_refuses_what_it_cannot_continue_and_extends_a_finished_run(tmp_path):
    cfg = make_config(tmp_path, rounds=2, sites=2, name="r")
    with pytest.raises(RunDirError, match="holds no run to resume"):
        run_inprocess(cfg, quiet=True, resume=True)
    run_inprocess(cfg, quiet=True)
    with pytest.raises(RunDirError, match=r"already ran 2 of run.rounds = 2 .*run.rounds=4"):
        run_inprocess(cfg, quiet=True, resume=True)
    other = make_config(tmp_path, rounds=3, sites=2, name="r", train={"lr": 0.01, "batch_size": 32})
    with pytest.raises(RunDirError, match=r"another config \(train.lr differ"):
        run_inprocess(other, quiet=True, resume=True)
    with pytest.raises(RunDirError, match="choose one"):
        run_inprocess(cfg, quiet=True, resume=True, overwrite=True)
    longer = make_config(tmp_path, rounds=3, sites=2, name="r")
    summary = run_inprocess(longer, quiet=True, resume=True)
    assert summary["rounds"] == 3 and summary["status"] == "ok"
    assert [r["round"] for r in _records(longer) if r["kind"] == "round"] == [1, 2, 3]
    assert (longer.run_dir() / "report.html").is_file()


def test_kumiki_run_resume_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from launch.cli import cli
    from tests.conftest import config_file

    conf = str(config_file(tmp_path, "cli", 1))
    assert CliRunner().invoke(cli, ["run", conf]).exit_code == 0
    r = CliRunner().invoke(cli, ["run", conf, "--resume"])
    assert r.exit_code == 2 and "already ran 1 of run.rounds = 1" in r.output
    r = CliRunner().invoke(cli, ["run", conf, "--resume", "--set", "run.rounds=2"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["resumed_after"] == [1]


@pytest.mark.deploy
def test_a_killed_superlink_is_resumed_on_real_processes(tmp_path):
    """The local engine's SuperLink is SIGKILLed after round 1 (the ServerApp loses its grid and fails); `--resume`
    on fresh processes continues with round 2, the sites keep their state files, and no round is recorded twice."""
    cfg = make_config(tmp_path, rounds=3, sites=2, name="kill", method="fedper", server={"round_timeout_s": 60.0})
    procs, real_start = [], local._Cluster.start

    def spy_start(self, *a, **kw):
        p = real_start(self, *a, **kw)
        procs.append(p)
        return p

    def kill_after_round_1(_pids):
        def watch():
            checkpoint = cfg.run_dir().resolve() / "checkpoints" / "resume.npz"
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if checkpoint.is_file():
                    link = next(p for p in procs if p.name == "superlink")
                    os.killpg(link.popen.pid, signal.SIGKILL)
                    return
                time.sleep(0.05)
        threading.Thread(target=watch, daemon=True).start()

    local._Cluster.start = spy_start
    try:
        with pytest.raises(RuntimeError):  # the engine notices the dead SuperLink (or the failed flwr run)
            local.run_local(cfg, quiet=True, timeout_s=300, ready_timeout_s=120, on_start=kill_after_round_1)
        state_before = _states(cfg)
        assert state_before and all(s["last_round"] >= 1 for s in state_before.values())
        summary = local.run_local(cfg, quiet=True, timeout_s=300, ready_timeout_s=120, resume=True)
    finally:
        local._Cluster.start = real_start
    assert summary["status"] == "ok" and summary["rounds"] == 3
    done = summary["resumed_after"][0]
    assert done in (1, 2)
    rounds = [r["round"] for r in _records(cfg) if r["kind"] == "round"]
    assert rounds == [1, 2, 3], rounds
    assert all(s["last_round"] == 3 for s in _states(cfg).values())
    assert summary["participation"]["trained_rounds"] == {"site-0": 3, "site-1": 3}


def test_the_strategy_state_round_trips_fedhb_precision_and_refuses_another_model(tmp_path):
    """``state_dict``/``load_state_dict``: FedHB's L_0 = (m, w) and the JSON state come back exactly."""
    from server.federation import build_strategy

    cfg = make_config(tmp_path, method="fedhb", sites=3)
    a = build_strategy(cfg)
    rng = np.random.default_rng(0)
    a.precision = {k: rng.random(w.shape).astype(np.float32) for k, w in a.precision.items()}
    a.shared = {k: v + 1 for k, v in a.shared.items()}
    a.completed, a.budget_spent, a.central_releases = {"site-0": 3}, {"site-1": 2}, 5
    a._rng.random()
    arrays, meta = a.state_dict()
    b = build_strategy(cfg)
    b.load_state_dict(arrays, json.loads(json.dumps(meta)))
    _same_tensors(b.precision, a.precision, "precision")
    _same_tensors(b.shared, a.shared, "shared")
    assert (b.completed, b.budget_spent, b.central_releases) == ({"site-0": 3}, {"site-1": 2}, 5)
    assert b._rng.random() == a._rng.random()
    wider = build_strategy(make_config(tmp_path, method="fedhb", sites=3, model={"hidden": 32}))
    with pytest.raises(ValueError, match="checkpoint tensor"):
        wider.load_state_dict(arrays, meta)
    with pytest.raises(ValueError, match="keeps no server state"):
        build_strategy(make_config(tmp_path, method="fedavg", sites=3)).load_state_dict(arrays, meta)


def test_a_key_added_by_a_newer_kumiki_does_not_block_resuming_at_its_default(tmp_path):
    """config.json of a run started before train.optimizer existed: the key takes its default, so the run resumes;
    a recorded key whose value really differs is still refused."""
    from server.resume import config_changes

    cfg = make_config(tmp_path, rounds=3, sites=2, name="old")
    recorded = json.loads(cfg.model_dump_json())
    for k in ("optimizer", "betas", "grad_clip"):
        del recorded["train"][k]
    assert config_changes(recorded, cfg) == []
    recorded["train"]["lr"] = 0.5
    assert config_changes(recorded, cfg) == ["train.lr"]
    recorded["train"]["optimizer"] = "adam"
    assert config_changes(recorded, cfg) == ["train.lr", "train.optimizer"]
