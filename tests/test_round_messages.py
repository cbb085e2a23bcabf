"""One message per site per round (issue 13 part 2) and each site's share of the cores (part 4).

Round k's evaluation travels in round k + 1's training messages; these tests hold it to the separate
evaluate message it replaces: the same numbers in every row, every site, every round, with one message per
site per exchange. ``eval.every`` skips rounds but never the last; a site whose training reply carries no
evaluation (an error, a spent privacy budget) is asked with an evaluate message in the same round; epsilon
does not move. No test here times anything.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from flwr.app import Error, Message

from client.threads import apply_site_threads, site_threads, usable_cores
from kumiki import contract as C
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time", "bytes", "fit_time_s", "eval_time_s", "at")


def _run(tmp_path, name: str, hook=None, **kw):
    """A run; returns (summary, metrics.jsonl records without timings, the exchanges: [(node, type, round)]) and,
    as ``_run.evaluated``, the rounds each message asked to evaluate."""
    cfg = make_config(tmp_path, name=name, **kw)
    exchanges: list[list[tuple[int, str, int]]] = []
    _run.evaluated = evaluated = []

    def spy(grid):
        send = grid.send_and_receive

        def wrapped(messages, *, timeout=None):
            messages = list(messages)
            exchanges.append([(m.metadata.dst_node_id, m.metadata.message_type, int(m.content[C.CONFIG][C.ROUND]))
                              for m in messages])
            for m in messages:
                cfg_rec = m.content[C.CONFIG]
                if m.metadata.message_type == "evaluate":
                    evaluated.append(int(cfg_rec[C.ROUND]))
                elif C.EVALUATE_ROUND in cfg_rec:
                    evaluated.append(int(cfg_rec[C.EVALUATE_ROUND]))
            return send(messages, timeout=timeout)

        grid.send_and_receive = wrapped
        if hook is not None:
            hook(grid)

    summary = run_inprocess(cfg, quiet=True, grid_hook=spy)
    records = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    return summary, [{k: v for k, v in r.items() if k not in VOLATILE} for r in records], exchanges


def _rounds(records, kind="round"):
    return [r for r in records if r["kind"] == kind]


@pytest.mark.parametrize("method, knobs", [
    ("fedavg", {}),  # personalized and global are one model: evaluated once, reported twice
    ("fedhb", {"personalize_epochs": 1}),  # evaluation trains (personalization): seeds of the evaluated round
    ("ditto", {}),  # the personal model lives in the site state
], ids=["fedavg", "fedhb", "ditto"])
def test_the_evaluation_in_the_training_reply_equals_the_separate_evaluate_round(tmp_path, method, knobs):
    """3 training sites (2 sampled per round) and 1 unseen site: every row, site row and summary section is what
    a separate evaluate message after each aggregation gives, and each site gets one message per exchange."""
    kw = dict(method=method, knobs=knobs, rounds=3, sites=3, unseen=1,
              server={"fraction_train": 0.6, "discovery_timeout_s": 20.0})
    one, rec_one, ex_one = _run(tmp_path, "one", **kw)
    two, rec_two, ex_two = _run(tmp_path, "two", eval={"in_train_reply": False}, **kw)
    assert rec_one == rec_two, "the rows differ from the separate evaluate round's"
    for key in ("personalized", "global", "unseen", "unseen_adapted", "privacy"):
        assert one[key] == two[key], key
    rows = _rounds(rec_one)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["unseen"] and set(r["unseen"]["per_site"]) == {"site-3"} for r in rows), "unseen sites every round"
    assert all(r["sites"]["evaluated"] == ["site-0", "site-1", "site-2", "site-3"] for r in rows)

    rounds = [e for e in ex_one if e and e[0][1] != "query.profile"]
    assert all(max(Counter(n for n, _, _ in e).values()) == 1 for e in rounds), "one message per site per exchange"
    assert len(rounds) == 3 + 1, "one exchange per round, plus the last round's evaluation"
    # round 2's exchange: the two sampled sites train and evaluate round 1; the third and the unseen one evaluate
    assert sorted(t for _, t, _ in rounds[1]) == ["evaluate", "evaluate", "train", "train"]
    assert {(t, r) for _, t, r in rounds[1]} == {("train", 2), ("evaluate", 1)}
    assert rounds[-1] == [(n, "evaluate", 3) for n in (1, 2, 3, 4)], "the last round: an evaluate message each"
    assert len([e for e in ex_two if e and e[0][1] != "query.profile"]) == 2 * 3
    assert one["bytes"]["down_total"] < two["bytes"]["down_total"], "the model is not sent twice per round"


def test_eval_every_skips_rounds_but_never_the_last(tmp_path):
    every, rec_every, _ = _run(tmp_path, "every", rounds=3, sites=2, unseen=1, eval={"every": 2})
    asked = Counter(_run.evaluated)
    _, rec_all, _ = _run(tmp_path, "all", rounds=3, sites=2, unseen=1)
    rows, ref = _rounds(rec_every), _rounds(rec_all)
    assert [r["round"] for r in rows] == [1, 2, 3] and every["status"] == "ok"
    assert rows[0]["personalized"] is None and rows[0]["unseen"] is None and rows[0]["sites"]["evaluated"] == []
    assert rows[0]["train_loss"] == ref[0]["train_loss"], "a round without evaluation still trains and records"
    assert rows[1:] == ref[1:], "rounds 2 (every 2nd) and 3 (the last) evaluated as in a run evaluating every round"
    assert {r["round"] for r in _rounds(rec_every, "site")} == {2, 3}
    assert every["personalized"] == json.loads(json.dumps(ref[2]["personalized"]))
    assert asked == {2: 3, 3: 3}, "round 2 in round 3's messages, round 3 by evaluate messages; round 1 never"


def test_a_site_whose_training_fails_is_still_evaluated_in_that_round(tmp_path):
    """site-1's round-2 training reply is an error, so it carries no evaluation of round 1: the server asks with
    an evaluate message before it aggregates round 2, and row 1 has site-1's number as without the failure."""
    def fail_site_1_round_2(grid):
        send = grid.send_and_receive

        def wrapped(messages, *, timeout=None):
            messages = list(messages)
            replies = list(send(messages, timeout=timeout))
            for i, (m, r) in enumerate(zip(messages, replies)):
                if m.metadata.message_type == "train" and m.metadata.dst_node_id == 2 and \
                        int(m.content[C.CONFIG][C.ROUND]) == 2:
                    replies[i] = Message(Error(code=4200, reason="injected failure"), reply_to=m)
            return replies

        grid.send_and_receive = wrapped

    _, rec, ex = _run(tmp_path, "fail", hook=fail_site_1_round_2, rounds=2, sites=3)
    _, ref, _ = _run(tmp_path, "ref", rounds=2, sites=3)
    assert _rounds(rec)[0]["personalized"] == _rounds(ref)[0]["personalized"]
    assert [(n, t, r) for e in ex for n, t, r in e if t == "evaluate" and r == 1] == [(2, "evaluate", 1)]
    assert any(x["site"] == "site-1" for x in _rounds(rec)[1]["sites"]["rejected"])


def test_privacy_spent_is_the_same_with_the_evaluation_in_the_training_reply(tmp_path):
    """DP-SGD at every site; FedAvg-FT fine-tunes on the site's data to evaluate: the evaluation inside the
    training message spends nothing and moves nothing."""
    # the two runs are compared bit for bit: seeded noise (research switch, not private)
    dp = {"enabled": True, "target_epsilon": 50.0, "noise_multiplier": 1.0, "reproducible_noise": True}
    kw = dict(method="fedavg_ft", rounds=2, sites=2, model={"arch": "mlp", "hidden": 32, "norm": "group"},
              privacy=dp)
    one, rec_one, _ = _run(tmp_path / "a", "dp", **kw)
    two, rec_two, _ = _run(tmp_path / "b", "dp", eval={"in_train_reply": False}, **kw)
    assert [r.get("epsilon") for r in _rounds(rec_one)] == [r.get("epsilon") for r in _rounds(rec_two)]
    assert all(_rounds(rec_one)[i]["epsilon"] for i in (0, 1))
    assert one["privacy"]["epsilon_per_site"] == two["privacy"]["epsilon_per_site"]
    assert rec_one == rec_two


@pytest.mark.parametrize("method, passes", [("fedavg", 1), ("dualfed", 2)])
def test_fedavg_evaluates_its_one_model_once(tmp_path, monkeypatch, method, passes):
    import client.app

    calls = []
    real = client.app.evaluate
    monkeypatch.setattr(client.app, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary, _, _ = _run(tmp_path, method, method=method, rounds=1, sites=2, arch="mlp")
    assert len(calls) == 2 * passes, "training sites' evaluation passes (personalized, global)"
    assert summary["global"]["mean"] is not None


def test_site_compute_is_recorded_per_site_and_per_round(tmp_path, monkeypatch):
    """Also: the ClientApp sets its share of the cores at every message (in-process: a site alone, here on a
    machine of one usable core)."""
    import client.threads

    cfg = make_config(tmp_path, rounds=2, sites=2, name="times")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(client.threads, "usable_cores", lambda: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        run_inprocess(cfg, quiet=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    records = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    rows = _rounds(records)
    assert all(0 < r["time"]["site_compute_s"] <= r["time"]["round_s"] for r in rows)
    sites = _rounds(records, "site")
    assert all(s["fit_time_s"] > 0 and s["eval_time_s"] > 0 for s in sites)


# --------------------------------------------------------------------------- threads (client/threads.py)
def test_the_thread_rule_shares_the_cores_and_explicit_settings_win():
    assert site_threads({}, env={}, cores=16) == 16, "a site alone on its machine uses every core"
    assert site_threads({"local-sites": 5}, env={}, cores=16) == 3
    assert site_threads({"local-sites": 5}, env={}, cores=2) == 1, "never fewer than one"
    assert site_threads({}, sim={"local_sites": 4}, env={}, cores=16) == 4
    assert site_threads({"local-sites": 5}, env={"OMP_NUM_THREADS": "2"}, cores=16) == 2, "the operator's env"
    assert site_threads({"threads": 6, "local-sites": 5}, env={"OMP_NUM_THREADS": "2"}, cores=16) == 6
    assert site_threads({"threads": 0, "local-sites": 2}, env={}, cores=16) == 8, "threads = 0 means the rule"
    for bad in ({"threads": "many"}, {"local-sites": -1}, {"threads": 1.5}):
        with pytest.raises(ValueError, match="whole number"):
            site_threads(bad, env={}, cores=4)
    assert 1 <= usable_cores()


def test_every_engine_tells_its_sites_how_many_share_the_machine(monkeypatch):
    from launch.engines import local

    assert local.thread_config(local.Tuning(), 5) == {"local-sites": 5}
    assert local.thread_config(local.Tuning(client_threads=3), 5) == {"threads": 3}
    assert local.thread_config(local.Tuning.stock(), 5) == {}, "Flower as shipped: torch's default"
    native = (ROOT / "deploy" / "native.py").read_text()
    assert "local-sites" in native and "OMP_NUM_THREADS" not in native
    compose = (ROOT / "deploy" / "compose" / "factory.yml").read_text()
    node_config = re.search(r'- "site=.*"', compose).group(0)
    assert "threads=${KUMIKI_THREADS:-0}" in node_config and "local-sites=${KUMIKI_LOCAL_SITES:-1}" in node_config
    assert "OMP_NUM_THREADS" not in compose
    simulation = (ROOT / "launch" / "engines" / "simulation.py").read_text()
    assert '"num_cpus": threads' in simulation and 'sim["local_sites"]' in simulation
    # the ClientApp applies the rule at every message
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert apply_site_threads({"local-sites": 10_000}) == 1 == torch.get_num_threads()
        assert apply_site_threads({"threads": 2}) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- per-message costs
def test_the_cheap_finiteness_check_finds_every_non_finite_tensor_and_only_those():
    from client.app import non_finite

    ok = {"a": torch.ones(3, 3), "n": torch.tensor([1, 2]), "big": torch.full((4,), 3e38)}  # the sum overflows
    assert non_finite(ok) is None, "finite values whose sum overflows are finite"
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(5)
        t[3] = bad
        assert non_finite({**ok, "w": t}) == "w"


def test_a_message_that_overwrites_every_tensor_skips_the_random_init_and_changes_nothing():
    from models import ModelSpec, build_model, fill

    spec = ModelSpec("cnn", (1, 8, 8), 10, 16, "batch", seed=3)
    trained = {k: v + 1 if v.is_floating_point() else v + 2 for k, v in build_model(spec).state_dict().items()}
    filled = fill(build_model(spec, init=False), trained)
    assert filled is not None and all(torch.equal(filled.state_dict()[k], v) for k, v in trained.items())
    partial = dict(trained)
    partial.pop("head.weight")
    assert fill(build_model(spec, init=False), partial) is None, "a missing tensor needs its seeded init"
