"""Bad input loses nothing: NaN updates, vanished sites and bad tensors are logged rejections."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord

from client.app import BadArrays, check_incoming
from kumiki import contract as C, packing
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config
from tests.replies import arrays_of


def _rounds(cfg):
    rows = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if r["kind"] == "round"}


def _train_round(msg):
    return int(msg.content[C.CONFIG][C.ROUND])


def _tamper(grid, nodes, rounds, change):
    """Apply ``change(arrays) -> arrays`` to the named nodes' training replies in the given rounds."""
    send = grid.send_and_receive

    def wrapped(messages, *, timeout=None):
        messages = list(messages)
        replies = send(messages, timeout=timeout)
        for msg, rep in zip(messages, replies):
            if msg.metadata.message_type == "train" and msg.metadata.dst_node_id in nodes and _train_round(msg) in rounds:
                packing.put(rep.content, change(arrays_of(rep.content)))
        return replies

    grid.send_and_receive = wrapped


def _poison(grid, nodes, rounds):
    """Replace the named nodes' training replies in the given rounds by NaN tensors."""
    _tamper(grid, nodes, rounds, lambda a: {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in a.items()})


def test_nan_update_is_rejected_and_the_round_goes_on(tmp_path):
    cfg = make_config(tmp_path, rounds=2, sites=3)
    summary = run_inprocess(cfg, quiet=True, grid_hook=lambda g: _poison(g, {1}, {1, 2}))
    r = _rounds(cfg)
    assert r[1]["sites"]["accepted"] == 2 and r[1]["sites"]["aggregated"]
    assert r[1]["sites"]["rejected"] == [{"site": "site-0", "reason": r[1]["sites"]["rejected"][0]["reason"]}]
    assert "NaN" in r[1]["sites"]["rejected"][0]["reason"]
    with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
        assert all(np.isfinite(z[k]).all() for k in z.files if z[k].dtype.kind == "f")
    assert summary["personalized"]["mean"] > 0.2


def test_round_with_too_few_valid_updates_keeps_the_previous_model(tmp_path):
    cfg = make_config(tmp_path, rounds=3, sites=2)
    grids = []

    def hook(g):
        grids.append(g)
        _poison(g, {1, 2}, {2})

    run_inprocess(cfg, quiet=True, grid_hook=hook)
    assert not _rounds(cfg)[2]["sites"]["aggregated"]
    sent = {(_train_round(m), m.metadata.dst_node_id): arrays_of(m.content) for m in grids[0].sent
            if m.metadata.message_type == "train"}
    for k in sent[(2, 1)].keys():  # round 3 starts from exactly the round-2 model
        assert np.array_equal(sent[(2, 1)][k], sent[(3, 1)][k])
    assert any(not np.array_equal(sent[(1, 1)][k], sent[(2, 1)][k]) for k in sent[(1, 1)].keys())


def test_site_that_disappears_is_logged_and_the_others_go_on(tmp_path):
    cfg = make_config(tmp_path, rounds=3, sites=3)

    def hook(g):
        send = g.send_and_receive

        def wrapped(messages, *, timeout=None):
            messages = list(messages)
            gone = [m for m in messages if m.metadata.dst_node_id == 2 and m.metadata.message_type != "query.profile"
                    and _train_round(m) >= 2]
            for m in gone:  # site-1 goes offline from round 2 on
                messages.remove(m)
            return send(messages, timeout=timeout)

        g.send_and_receive = wrapped

    summary = run_inprocess(cfg, quiet=True, grid_hook=hook)
    r = _rounds(cfg)
    assert r[2]["sites"]["accepted"] == 2 and r[2]["sites"]["aggregated"]
    assert {"site": "site-1", "reason": "no reply"} in r[2]["sites"]["rejected"]
    assert set(summary["personalized"]["per_site"]) == {"site-0", "site-2"}


def test_site_refuses_private_unknown_or_malformed_tensors():
    model = torch.nn.Linear(2, 2)
    allowed = ("weight",)
    with pytest.raises(BadArrays, match="keeps private"):
        check_incoming({"bias": torch.zeros(2)}, model, allowed)
    with pytest.raises(BadArrays, match="shape"):
        check_incoming({"weight": torch.zeros(3, 3)}, model, allowed)
    with pytest.raises(BadArrays, match="NaN"):
        check_incoming({"weight": torch.full((2, 2), float("nan"))}, model, allowed)
    check_incoming({"weight": torch.zeros(2, 2)}, model, allowed)


@pytest.mark.parametrize("fraction, aggregated", [(1.0, False), (0.5, True)])
def test_min_reply_fraction_decides_whether_a_round_aggregates(tmp_path, fraction, aggregated):
    """2 valid replies of 3 sampled: enough at min_reply_fraction 0.5, not at 1.0 (then the model is kept)."""
    cfg = make_config(tmp_path, rounds=2, sites=3, server={"min_reply_fraction": fraction})
    grids = []

    def hook(g):
        grids.append(g)
        _poison(g, {1}, {1})

    run_inprocess(cfg, quiet=True, grid_hook=hook)
    r = _rounds(cfg)
    assert r[1]["sites"]["accepted"] == 2 and r[1]["sites"]["aggregated"] is aggregated
    assert r[2]["sites"]["aggregated"]
    sent = {(_train_round(m), m.metadata.dst_node_id): arrays_of(m.content) for m in grids[0].sent
            if m.metadata.message_type == "train"}
    same = all(np.array_equal(sent[(1, 2)][k], sent[(2, 2)][k]) for k in sent[(1, 2)].keys())
    assert same is not aggregated  # kept model <=> round 2 starts from exactly the round-1 model


@pytest.mark.parametrize("change, needle", [
    (lambda a: {**a, "evil.weight": np.zeros(3, np.float32)}, "evil.weight"),
    (lambda a: {k: v for k, v in a.items() if k != "head.bias"}, "head.bias"),
    (lambda a: {**a, "head.bias": np.zeros(3, np.float32)}, "shape"),
])
def test_reply_with_other_tensors_is_rejected_not_a_crash(tmp_path, change, needle):
    cfg = make_config(tmp_path, rounds=2, sites=3)
    summary = run_inprocess(cfg, quiet=True, grid_hook=lambda g: _tamper(g, {2}, {1}, change))
    r = _rounds(cfg)
    assert r[1]["sites"]["accepted"] == 2 and r[1]["sites"]["aggregated"]
    [rej] = r[1]["sites"]["rejected"]
    assert rej["site"] == "site-1" and needle in rej["reason"]
    assert summary["personalized"]["mean"] > 0.2


def _big_announcer(count):
    """Site-1 (node 2) announces ``count(others)`` examples at discovery and in every training reply, which carries
    its own tensors (every float 7.0); ``others`` are the other replies' true example counts of that message."""
    def hook(grid):
        send = grid.send_and_receive

        def wrapped(messages, *, timeout=None):
            messages = list(messages)
            replies = send(messages, timeout=timeout)
            for msg, rep in zip(messages, replies):
                if msg.metadata.dst_node_id != 2 or rep.has_error():
                    continue
                others = [int(r.content[C.METRICS][C.NUM_EXAMPLES]) for m, r in zip(messages, replies)
                          if m.metadata.dst_node_id != 2 and not r.has_error() and C.METRICS in r.content.metric_records]
                if msg.metadata.message_type == "query.profile":
                    p = dict(rep.content[C.PROFILE].items())
                    p["num-train"] = count(None)
                    rep.content[C.PROFILE] = ConfigRecord(p)
                elif msg.metadata.message_type == "train":
                    m = dict(rep.content[C.METRICS].items())
                    m[C.NUM_EXAMPLES] = count(others)
                    rep.content[C.METRICS] = MetricRecord(m)
                    packing.put(rep.content, {k: np.full_like(v, 7.0) if v.dtype.kind == "f" else v
                                              for k, v in arrays_of(rep.content).items()})
            return replies

        grid.send_and_receive = wrapped
    return hook


def _global(cfg):
    with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
        return np.concatenate([z[k].ravel().astype(np.float64) for k in sorted(z.files)
                               if k != "__round__" and z[k].dtype.kind == "f"])


def test_a_site_announcing_1e9_examples_buys_no_more_than_an_honest_site_could(tmp_path, caplog):
    """num-train = 1e9 at discovery, num-examples = 1e9 with its own tensors. By default its weight is capped at
    server.example_cap (3) x the median of the other sites' counts: the global model is the one the largest
    honest site the cap allows (3 x the median, announced truthfully) would give, far from the attacker's. With
    the cap off (plain FedAvg) the attacker sets the global model."""
    def run(name, count, **server):
        cfg = make_config(tmp_path, rounds=1, sites=3, alpha=None, name=name, server=server)
        run_inprocess(cfg, quiet=True, grid_hook=_big_announcer(count))
        return _global(cfg)

    with caplog.at_level("WARNING", logger="kumiki.server"):
        attacked = run("attack", lambda others: 10**9)
    assert "site-1 reports 1000000000 examples; weighted as" in caplog.text and "example_cap" in caplog.text
    strongest_honest = run("honest", lambda others: 10**9 if others is None else math.floor(3 * np.median(others)))
    uncapped = run("uncapped", lambda others: 10**9, example_cap=None)
    assert np.abs(uncapped - 7.0).max() < 1e-4, "without the cap the attacker sets the model (the attack is real)"
    np.testing.assert_allclose(attacked, strongest_honest, rtol=0, atol=1e-5)
    # the honest sites' models are near 0 (|w| < 1): with at most 3/5 of the weight the attacker is >= 2/5 x 7 away
    assert np.abs(attacked - 7.0).mean() > 2.0
