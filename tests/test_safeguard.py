"""The safeguard (client/safeguard.py, docs/safeguard.md): no factory worse off.

Each training site holds out validation records, keeps an own model that never leaves it, and serves the better of
its joined and its own model on validation. One small in-process run (digits, 2 sites, 2 rounds) feeds most tests;
tests/test_messages.py runs every registered method with the safeguard on (each image method's choice checked).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client import safeguard, site as sites
from client.loop import evaluate
from kumiki import contract as C
from kumiki.config import ConfigError, validate
from launch.engines.inprocess import run_inprocess
from models import build_model
from server.federation import model_spec
from tests.conftest import make_config, untimed

ON = {"enabled": True, "val_fraction": 0.2}
MEASURED = {**ON, "measure_refit": True}  # the refit scored beside what is served (bench only)


def _rows(cfg) -> list[dict]:
    return [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run most tests read: the safeguard on, with its refit measured (so the refit twin is there too)."""
    tmp = tmp_path_factory.mktemp("guard")
    cfg = make_config(tmp, method="fedavg", rounds=2, sites=2, safeguard=MEASURED)
    grids = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    return cfg, grids[0], summary


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The same run with the safeguard's defaults (the refit not measured)."""
    tmp = tmp_path_factory.mktemp("guard-plain")
    cfg = make_config(tmp, method="fedavg", rounds=2, sites=2, safeguard=ON)
    return cfg, run_inprocess(cfg, quiet=True)


def test_knob_validates_with_clear_errors(tmp_path):
    base = make_config(tmp_path).model_dump(mode="json")
    for bad, words in (({"val_fraction": 0.0}, "greater than 0"), ({"val_fraction": 0.7}, "less than or equal to 0.5"),
                       ({"val_fraction": "0.1"}, "valid number"), ({"enabled": "yes"}, "valid boolean"),
                       ({"fraction": 0.1}, "unknown key")):
        with pytest.raises(ConfigError) as exc:
            validate({**base, "safeguard": bad})
        text = str(exc.value)
        assert "safeguard." in text and words in text, text
    assert validate({k: v for k, v in base.items() if k != "safeguard"}).safeguard.enabled  # on by default
    assert validate({**base, "safeguard": {"val_fraction": 0.5}}).safeguard.val_fraction == 0.5


def test_holdout_is_per_record_deterministic_and_disjoint(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((400, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 400)
    mask = safeguard.holdout_mask(x, y, 0.2)
    assert 40 < mask.sum() < 120  # about a fifth
    # a record's membership depends on that record alone: any subset keeps its members' memberships
    assert np.array_equal(safeguard.holdout_mask(x[::3], y[::3], 0.2), mask[::3])
    assert np.array_equal(safeguard.holdout_mask(x, y, 0.2), mask)  # the same every time (no server-known seed)
    cfg = make_config(tmp_path, method="fedavg", rounds=1, sites=1, safeguard=ON)
    from launch.engines.prepare import prepare_sites
    sim = prepare_sites(cfg)
    data = sites.load_site(Path(sim["sites_root"]) / sim["site_dirs"][0])
    fit, hold = safeguard.split(data, 0.2)
    assert len(fit.y_train) + len(hold.y) == len(data.y_train) and len(hold.y) > 0
    rows = {r.tobytes() for r in hold.x}
    assert not any(r.tobytes() in rows for r in fit.x_train)  # no validation record in the fit part


def test_served_model_is_never_worse_on_validation(run):
    cfg, _, summary = run
    site_rows = [r for r in _rows(cfg) if r["kind"] == "site" and r["role"] == "train"]
    assert len(site_rows) == 2 * 2 and all("serves" in r for r in site_rows)
    for r in site_rows:
        other = r["val_own"] if r["serves"] == "joined" else r["val_joined"]
        mine = r["val_joined"] if r["serves"] == "joined" else r["val_own"]
        assert mine >= other, r
        assert r["served"] == (r["own"] if r["serves"] == "own" else r["personalized"]), r
    assert all(safeguard.serves_own(j, o) == (o > j) for j in (0.2, 0.5) for o in (0.1, 0.5, 0.9))
    g = summary["safeguard"]
    assert set(g["serves"]) == {"site-0", "site-1"} and g["extra_time_per_round_s"]["max"] > 0


def test_own_model_never_leaves_the_site(run):
    cfg, grid, _ = run
    init = build_model(model_spec(cfg), "plain").state_dict()
    probes = []
    for d in sorted((cfg.run_dir() / "state").iterdir()):
        for f, which in [(f, w) for f in ("site_state.pt", "site_state.prev.pt") for w in ("own", "own_full")]:
            # the own model and its refit twin, after round 2 and after round 1
            tensors = torch.load(d / f, weights_only=True)["extra"][safeguard.KEY][which]
            for k, v in tensors.items():
                if not v.is_floating_point():
                    continue
                t, moved = v.numpy().reshape(-1), (v != init[k]).numpy().reshape(-1)
                # 8 consecutive values training changed (an untrained value is the shared initial one)
                run_ends = [i for i in range(8, len(t) + 1) if moved[i - 8:i].all()]
                if run_ends:
                    probes.append(np.ascontiguousarray(t[run_ends[0] - 8:run_ends[0]]).tobytes())
    assert len(probes) >= 16
    # every byte of every array in every message, both ways
    blobs = []
    for msg in list(grid.sent) + [r for r in grid.replies if not r.has_error()]:
        for rec in msg.content.array_records.values():
            blobs += [bytes(a.data) for a in rec.values()]
    assert blobs
    for probe in probes:
        assert not any(probe in b for b in blobs), "an own-model tensor left a site"
    for msg in list(grid.sent) + list(grid.replies):
        for rec in msg.content.metric_records.values():
            assert not any("own" in str(k) and "accuracy" not in str(k) and k != safeguard.FLAG for k in rec.keys())


def test_the_chosen_model_is_served_as_trained_and_the_refit_only_measured(run, plain):
    """The own model that the choice scores on validation is the one served (and reported as ``own``); under
    ``measure_refit`` its twin trained on the whole training split is scored as ``refit`` and never served, and
    measuring it changes nothing the run serves or reports otherwise."""
    cfg, _, summary = run
    rows = [r for r in _rows(cfg) if r["kind"] == "site" and r["role"] == "train"]
    last = {r["site"]: r for r in rows if r["round"] == 2}
    spec = model_spec(cfg)
    for d in sorted((cfg.run_dir() / "state").iterdir()):
        extra = torch.load(d / "site_state.pt", weights_only=True)["extra"][safeguard.KEY]
        data = sites.load_site(cfg.run_dir() / "sites" / d.name)
        fit, hold = safeguard.split(data, ON["val_fraction"])
        scores = {}
        for which in ("own", "own_full"):
            model = build_model(spec, "plain")
            model.load_state_dict(extra[which])
            scores[which] = (evaluate(model, hold.x, hold.y)["score"], evaluate(model, data.x_test, data.y_test)["score"])
        # the choice's number and the served (and reported) own model are the fit-part model's
        assert last[d.name]["val_own"] == pytest.approx(scores["own"][0])
        assert last[d.name]["own"] == pytest.approx(scores["own"][1])
        # the refit: the twin when the own side is chosen, FedAvg's joined model as it is otherwise
        r = last[d.name]
        assert r["refit"] == pytest.approx(scores["own_full"][1] if r["serves"] == "own" else r["personalized"])
        assert not all(torch.equal(extra["own"][k], extra["own_full"][k]) for k in extra["own"])
    assert summary["safeguard"]["measure_refit"] and set(summary["safeguard"]["refit"]["per_site"]) == set(last)
    # without the measurement: no twin, no refit number, and every served and reported number the same
    pcfg, psummary = plain
    prow = {(r["site"], r["round"]): r for r in _rows(pcfg) if r["kind"] == "site" and r["role"] == "train"}
    assert len(prow) == len(rows) == 4
    for r in rows:
        p = prow[(r["site"], r["round"])]
        assert "refit" not in p
        for k in ("serves", "served", "own", "val_own", "val_joined", "personalized"):
            assert p[k] == pytest.approx(r[k], abs=1e-12), (k, r, p)
    assert "refit" not in psummary["safeguard"] and "measure_refit" not in psummary["safeguard"]
    for d in sorted((pcfg.run_dir() / "state").iterdir()):
        assert set(torch.load(d / "site_state.pt", weights_only=True)["extra"][safeguard.KEY]) == {"own", "round"}


def test_refit_sides_train_on_the_whole_split(tmp_path, monkeypatch):
    """The own model trains on the fit part; under ``measure_refit`` its refit twin trains on the whole training
    split. A method that builds its personalized model from the training split at evaluation (FedAvg-FT) gets the
    whole split (validation included) for the measured refit; one that does not (FedPer) is measured as it is."""
    from types import SimpleNamespace

    from client.loop import Trainer
    from client.methods.base import SiteJob

    cfg = make_config(tmp_path, method="fedavg", rounds=1, sites=1, safeguard=ON)
    from launch.engines.prepare import prepare_sites
    sim = prepare_sites(cfg)
    data = sites.load_site(Path(sim["sites_root"]) / sim["site_dirs"][0])
    fit, hold = safeguard.split(data, 0.2)
    model = build_model(model_spec(cfg), "plain")
    trained = {}

    class Recording(Trainer):
        def fit(self, model, *a, **k):
            trained[k["tag"]] = len(self.y)
            return super().fit(model, *a, **k)

    monkeypatch.setattr(safeguard, "Trainer", Recording)
    for knobs, want in ((cfg.safeguard, {"own:r1": len(fit.y_train)}),
                        (cfg.safeguard.model_copy(update={"measure_refit": True}),
                         {"own:r1": len(fit.y_train), "own_full:r1": len(data.y_train)})):
        trained.clear()
        sj = SiteJob(model, None, Trainer(fit.x_train, fit.y_train, cfg.train, seed="s", device=torch.device("cpu")),
                     fit, SimpleNamespace(extra={}),
                     SimpleNamespace(train=cfg.train, own_train=cfg.alone_train, model=model_spec(cfg), round=1,
                                     safeguard=knobs), {}, val=hold)
        safeguard.train_own(sj)
        assert trained == want
        assert set(sj.state.extra[safeguard.KEY]) == {k.split(":")[0] for k in want} | {"round"}
    monkeypatch.undo()
    seen = []

    class Tunes:
        def personalized_model(self, job):
            seen.append(len(job.trainer.y))
            return job.model

    class Keeps:
        def personalized_model(self, job):
            return job.model

    refit = safeguard.refit_joined(sj, Tunes())
    assert seen == [len(data.y_train)] and len(data.y_train) > len(fit.y_train)
    assert refit is not None and refit is not model  # a copy: the site's model is untouched
    assert safeguard.refit_joined(sj, Keeps()) is None


def test_choice_survives_a_restart(run):
    """A site rebuilt from its state dir alone (no process memory: caches emptied) serves the same model with
    the same numbers; the own model in the state file is what makes it so."""
    cfg, grid, _ = run
    last = [(m, r) for m, r in zip(grid.sent, grid.replies) if m.metadata.message_type == "evaluate"][-2:]
    assert len(last) == 2
    for msg, reply in last:
        sites._CACHE.clear()
        importlib.reload(safeguard)  # the site process's memory is gone: only its disk remains
        ctx = grid.contexts[msg.metadata.dst_node_id]
        again = grid.app(msg, ctx).content[C.METRICS]
        before = reply.content[C.METRICS]
        assert untimed(again) == untimed(before) and "val_own-accuracy" in again
        state = Path(ctx.node_config["state-dir"])
        assert safeguard.read_choice(state)["serves"] == ("own" if again[safeguard.FLAG] else "joined")


def test_off_switch(tmp_path):
    cfg = make_config(tmp_path, method="fedavg", rounds=1, sites=2, safeguard={"enabled": False})
    grids = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    assert summary["safeguard"] is None
    for r in grids[0].replies:
        for rec in r.content.metric_records.values():
            assert not any(k.startswith(("served", "own", "val_", "safeguard")) for k in rec.keys())
    for d in (cfg.run_dir() / "state").iterdir():
        assert not (d / safeguard.FILE).exists()
        assert safeguard.KEY not in torch.load(d / "site_state.pt", weights_only=True)["extra"]
    # the whole training split trains: num-examples is every training record of the site
    profiles = summary["participation"]["profiles"]
    trained = {r["site"]: r["num_examples"] for r in _rows(cfg) if r["kind"] == "site"}
    assert all(trained[s] == profiles[s]["num_train"] for s in trained)


def test_holdout_never_trains_and_dp_keeps_the_choice_home(tmp_path):
    """Under DP every safeguard number is a training-split value: none leaves; the site still records its choice.
    Both models train on the fit part only (num-examples)."""
    cfg = make_config(tmp_path, method="fedavg", rounds=1, sites=2, safeguard=ON,
                      privacy={"enabled": True, "noise_multiplier": 1.0, "fix_model": True})
    grids = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    for r in grids[0].replies:
        for rec in r.content.metric_records.values():
            assert not any(k.startswith(("served", "own", "val_", "safeguard-own")) for k in rec.keys()), dict(rec)
    assert "withheld" in summary["safeguard"]
    profiles = summary["participation"]["profiles"]
    for d in sorted((cfg.run_dir() / "state").iterdir()):
        assert safeguard.read_choice(d)["serves"] in ("joined", "own")
    trained = {r["site"]: r["num_examples"] for r in _rows(cfg) if r["kind"] == "site"}
    assert all(0 < trained[s] < profiles[s]["num_train"] for s in trained)


def test_compare_and_pilot_lines_say_what_each_factory_serves_and_who_still_loses(tmp_path):
    """comparison.json, the report and `kumiki pilot`'s lines: the served model against alone, with an honest
    verdict when a factory still does worse."""
    from launch.pilot import console_lines
    from server.compare import compare, write_comparison
    from server.report import render_report
    from tests.test_compare import fake_run

    joined, alone = [], []
    for seed, served, serves in ((0, {"factory-a": 0.90, "factory-b": 0.60}, {"factory-a": "joined", "factory-b": "own"}),
                                 (1, {"factory-a": 0.86, "factory-b": 0.64}, {"factory-a": "joined", "factory-b": "own"})):
        d = fake_run(tmp_path, f"fed{seed}", "fedavg_ft", seed, {"factory-a": served["factory-a"], "factory-b": 0.5})
        summary = json.loads((d / "summary.json").read_text())
        summary["safeguard"] = {"enabled": True, "val_fraction": 0.15, "serves": serves,
                                "served": {"mean": 0.75, "per_site": served},
                                "own": {"mean": 0.6, "per_site": {"factory-a": 0.8, "factory-b": served["factory-b"]}},
                                "validation": {s: {"joined": 0.7, "own": 0.6 if v == "joined" else 0.8}
                                               for s, v in serves.items()},
                                "extra_time_per_round_s": {"max": 1.5, "mean": 1.2}}
        (d / "summary.json").write_text(json.dumps(summary))
        joined.append(d)
        alone.append(fake_run(tmp_path, f"loc{seed}", "local", seed, {"factory-a": 0.80, "factory-b": 0.70}))
    comp = compare(joined, alone)
    a, b = comp["train"]
    assert a["gain_served"]["mean"] == pytest.approx(0.08) and a["serves"] == {"joined": 2}
    assert b["gain_served"]["mean"] == pytest.approx(-0.08) and b["serves"] == {"own": 2}
    assert comp["overall"]["sites_losing_served"] == ["factory-b"]
    lines = "\n".join(console_lines(comp))
    assert "1 factory(ies) still worse off than alone: factory-b (beyond the spread over seeds: factory-b)" in lines
    assert "serves own 2x" in lines
    write_comparison(joined[0], comp)
    html = render_report(joined[0]).read_text()
    assert "still do worse than alone" in html and "No factory worse off" in html


def test_a_site_cannot_report_a_served_value_out_of_range_or_a_third_choice():
    """The server range-checks the safeguard's numbers like any metric; the choice flag is 0 (joined) or 1 (own)."""
    from strategies.replies import BadReply, eval_metrics
    from tests.test_tasks import _Content

    ok = {"num-examples": 10, "served-accuracy": 0.8, "val_own-accuracy": 0.7, safeguard.FLAG: 1}
    assert eval_metrics(_Content({"metrics": ok}), announced_test=10)[safeguard.FLAG] == 1
    for key, value, words in (("served-accuracy", 1.5, "outside"), ("val_joined-accuracy", -0.1, "outside"),
                              (safeguard.FLAG, 0.5, "neither 0")):
        with pytest.raises(BadReply, match=words):
            eval_metrics(_Content({"metrics": {**ok, key: value}}), announced_test=10)


def test_the_own_model_trains_like_alone_whatever_the_method_optimizer(tmp_path):
    """The own model stands for "alone": it trains with the local-only baseline's ``[train]``, not the method's
    paper defaults (FedHB brings 2 local epochs). The same own model then comes out of a FedHB run and a FedAvg
    run on the same data and seed; with FedHB's epochs it was up to 42 points better than alone (60 images per
    factory), which the leaderboard counted as the gain of joining. An operator's own ``[train]`` key is kept."""
    hb = validate({"run": {"name": "x", "rounds": 1}, "method": {"name": "fedhb"}, "data": {"sites": 2}})
    assert hb.train.local_epochs == 2 and hb.alone_train.local_epochs == 1
    assert hb.alone_train == validate({"run": {"name": "x", "rounds": 1}, "method": {"name": "local"},
                                       "data": {"sites": 2}}).train
    mine = validate({"run": {"name": "x", "rounds": 1}, "method": {"name": "fedhb"}, "data": {"sites": 2},
                     "train": {"local_epochs": 3}})
    assert mine.alone_train.local_epochs == 3
    # real processes: the ServerApp validates the config an engine wrote; it must still know the method's keys
    from kumiki.config import run_config_dict
    from launch.engines.prepare import process_run_dir

    hb = validate({"run": {"name": "x", "rounds": 1, "output_dir": str(tmp_path / "rc")}, "method": {"name": "fedhb"},
                   "data": {"sites": 2}})
    _, _, _, resolved = process_run_dir(hb, resume=False)
    again = validate(resolved)
    assert again.train == hb.train and again.alone_train == hb.alone_train and again.alone_train.local_epochs == 1
    assert validate(run_config_dict(mine)).alone_train.local_epochs == 3  # the operator's key travels as such
    own = {}
    for method, knobs in (("fedavg", {}), ("fedhb", {"personalize_epochs": 0})):
        cfg = make_config(tmp_path, method=method, name=method, rounds=1, sites=2, safeguard=ON, knobs=knobs)
        assert run_inprocess(cfg, quiet=True)["status"] == "ok"
        own[method] = {d.name: torch.load(d / "site_state.pt", weights_only=True)["extra"][safeguard.KEY]["own"]
                       for d in sorted((cfg.run_dir() / "state").iterdir())}
    assert own["fedavg"].keys() == own["fedhb"].keys()
    for site, tensors in own["fedavg"].items():
        assert all(torch.equal(tensors[k], own["fedhb"][site][k]) for k in tensors), site
