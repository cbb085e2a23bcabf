"""Which method pays and where (issue 24): the leaderboard's arithmetic, `kumiki pilot --methods` (parsing, the
plan, methods.json) and the report's leaderboard and "where joining pays" sections. No training: fake run dirs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kumiki.registry import METHODS
from launch.pilot import by_method, parse_methods, plan, write_methods
from server import report_methods as rm
from server.compare import compare
from server.leaderboard import board, bytes_moved, sweep_point
from server.report import _method_sections
from tests.conftest import make_config
from tests.test_compare import fake_run


def _runs(tmp_path, method, per_seed, up=0):
    """Finished runs of ``method``: per seed, (factory-a, factory-b) personalized accuracy."""
    dirs = []
    for seed, (a, b) in enumerate(per_seed):
        d = fake_run(tmp_path, f"{method}-s{seed}", method, seed, {"factory-a": a, "factory-b": b})
        s = json.loads((d / "summary.json").read_text())
        s["bytes"] = {"up_total": up, "down_total": 2 * up}
        (d / "summary.json").write_text(json.dumps(s))
        dirs.append(d)
    return dirs


def test_the_board_ranks_methods_by_mean_gain_with_spread_worse_off_goal_and_bytes(tmp_path):
    alone = _runs(tmp_path, "local", [(0.80, 0.70), (0.82, 0.70)])
    good = _runs(tmp_path, "ditto", [(0.86, 0.74), (0.84, 0.76)], up=100)  # gains a +.06 +.02, b +.04 +.06
    bad = _runs(tmp_path, "fedavg", [(0.70, 0.80), (0.72, 0.78)], up=50)  # a -.10 -.10, b +.10 +.08
    rows = board([(m, compare(d, alone), bytes_moved([json.loads((x / "summary.json").read_text()) for x in d]))
                  for m, d in (("fedavg", bad), ("ditto", good))], rounds=10)
    assert [(r["rank"], r["method"]) for r in rows] == [(1, "ditto"), (2, "fedavg")]
    d, f = rows
    assert d["sites"]["factory-a"]["mean"] == pytest.approx(0.04)
    assert d["sites"]["factory-a"]["std"] == pytest.approx(np.std([0.06, 0.02], ddof=1))
    assert d["mean_gain"] == pytest.approx(0.045)  # (0.04 + 0.05) / 2
    assert d["mean_gain_std"] == pytest.approx(np.std([0.05, 0.04], ddof=1))  # per-seed means over factories
    assert d["worse_off"] == [] and d["goal"] and d["gaining"] == 2 and d["bytes"] == 300 and d["rounds"] == 10
    # fedavg: factory-a loses 10 points at both seeds (gain + spread < 0): worse off, the goal fails
    assert f["mean_gain"] == pytest.approx(-0.005) and f["worse_off"] == ["factory-a"] and not f["goal"]
    assert f["worst"] == pytest.approx(-0.10) and f["bytes"] == 150


def test_a_small_mean_gain_misses_the_goal_and_ties_go_to_fewer_losers_then_fewer_bytes(tmp_path):
    alone = _runs(tmp_path, "local", [(0.80, 0.70), (0.80, 0.70)])
    small = _runs(tmp_path, "fedper", [(0.81, 0.71), (0.81, 0.71)], up=10)  # +1 point everywhere
    same = _runs(tmp_path, "fedrep", [(0.81, 0.71), (0.81, 0.71)], up=5)
    rows = board([(m, compare(d, alone), b) for m, d, b in (("fedper", small, 30.0), ("fedrep", same, 15.0))])
    assert rows[0]["method"] == "fedrep" and not rows[0]["goal"]  # +1 < +3 points
    assert rows[0]["mean_gain"] == pytest.approx(0.01) and rows[0]["worse_off"] == []


def test_a_sweep_point_gives_each_factory_its_own_size_and_the_mean_gain(tmp_path):
    alone = _runs(tmp_path, "local", [(0.50, 0.90), (0.54, 0.90)])
    fed = _runs(tmp_path, "fedavg_ft", [(0.70, 0.88), (0.70, 0.86)])
    p = sweep_point("unequal", [60, 2400], compare(fed, alone))
    assert not p["equal"] and p["method"] == "fedavg_ft" and p["pairs"] == 2
    assert [(s["site"], s["images"]) for s in p["sites"]] == [("factory-a", 60), ("factory-b", 2400)]
    assert p["sites"][0]["gain"] == pytest.approx(0.18) and p["sites"][1]["gain"] == pytest.approx(-0.03)
    assert p["mean_gain"] == pytest.approx(0.075)
    assert p["goal"] is False  # +7.5 points on average, but factory-b loses by more than its spread
    assert sweep_point("eq", [600, 600], compare(fed, alone))["equal"]
    both = _runs(tmp_path, "fedavg_ft2", [(0.70, 0.95), (0.70, 0.95)])
    assert sweep_point("eq", [60, 60], compare(both, alone))["goal"] is True  # every factory gains, +11.5 mean


def test_methods_are_parsed_in_order_once_and_bad_names_are_refused_with_the_fix():
    assert parse_methods(" fedper, ditto,fedper,, fedavg_ft ", METHODS) == ["fedper", "ditto", "fedavg_ft"]
    assert parse_methods(None, METHODS) == []
    with pytest.raises(ValueError, match="unknown method 'fedavgg'; known: .*fedavg_ft"):
        parse_methods("fedavg_ft,fedavgg", METHODS)
    with pytest.raises(ValueError, match="local is the baseline"):
        parse_methods("local,ditto", METHODS)
    with pytest.raises(ValueError, match="at least one method"):
        parse_methods(" , ", METHODS)


def test_the_pilot_plan_runs_every_method_at_every_seed_against_one_local_baseline(tmp_path):
    base = make_config(tmp_path, method="fedavg_ft", name="pilot", sites=2, unseen=1)

    def load(more):
        from kumiki.config import apply_overrides, validate

        return validate(apply_overrides(json.loads(base.model_dump_json()), more))

    runs = plan(load, [], seeds=2, baseline=True, engine="local", extra_engine="inprocess",
                methods=["fedper", "ditto"])
    assert [(r.cfg.run.name, r.cfg.method.name, r.seed, r.side, r.engine) for r in runs] == [
        ("pilot", "fedper", 0, "joined", "local"), ("pilot-local", "local", 0, "alone", "inprocess"),
        ("pilot-seed1", "fedper", 1, "joined", "inprocess"), ("pilot-local-seed1", "local", 1, "alone", "inprocess"),
        ("pilot-ditto", "ditto", 0, "joined", "inprocess"), ("pilot-ditto-seed1", "ditto", 1, "joined", "inprocess")]
    assert all(r.cfg.data.partition_seed == 0 for r in runs[1:])
    groups = by_method(runs, finished={0, 1, 2, 3, 5})  # pilot-ditto (index 4) did not finish
    assert list(groups) == ["fedper", "ditto"] and [p.name for p in groups["ditto"]] == ["pilot-ditto-seed1"]


def test_methods_json_and_the_report_show_the_leaderboard_and_the_sweep_with_this_run_marked(tmp_path):
    alone = _runs(tmp_path, "local", [(0.80, 0.70), (0.82, 0.70)])
    joined = {"fedavg": _runs(tmp_path, "fedavg", [(0.70, 0.80), (0.72, 0.78)], up=50),
              "ditto": _runs(tmp_path, "ditto", [(0.86, 0.74), (0.84, 0.76)], up=100)}
    main = joined["fedavg"][0]
    rows = write_methods(main, joined, alone, rounds=10)
    saved = json.loads((main / "methods.json").read_text())
    assert [r["method"] for r in saved["board"]] == [r["method"] for r in rows] == ["ditto", "fedavg"]
    assert set(saved["comparisons"]) == {"fedavg", "ditto"} and saved["rounds"] == 10
    sweep = {"method": "fedavg_ft", "rounds": 10, "seeds": [0, 1], "mode": "full", "command": "python bench/x.py",
             "date": "2026-12-06", "points": [
                 {"label": "60 each", "sizes": [60, 60], "equal": True, "mean_gain": 0.08, "mean_gain_std": 0.02,
                  "sites": [{"site": "factory-a", "images": 60, "gain": 0.1, "std": 0.01}]},
                 {"label": "2,400 each", "sizes": [2400, 2400], "equal": True, "mean_gain": -0.01,
                  "mean_gain_std": 0.01, "sites": []},
                 {"label": "mix", "sizes": [60, 2400], "equal": False, "mean_gain": 0.02, "mean_gain_std": None,
                  "sites": [{"site": "factory-a", "images": 60, "gain": 0.12, "std": 0.03}]}]}
    (main / "sweep.json").write_text(json.dumps(sweep))
    comp = compare(joined["fedavg"], alone)
    html = "".join(_method_sections(main, comp, {"data": {"samples_per_site": 600}}))
    assert "Which method pays" in html and html.index("<strong>ditto</strong>") < html.index("<strong>fedavg</strong>")
    assert "+4.5 &plusmn; 0.7" in html and "factory-a" in html and "met by ditto" in html
    assert "Where joining pays" in html and "data:image/png;base64," in html
    assert "Joining clearly pays (mean gain above its spread) at 60 images per factory" in html
    assert "factory-a (60) +12.0 &plusmn; 3.0" in html
    # no files: no sections (a plain run's report is unchanged)
    assert _method_sections(tmp_path / "local-s0", None, {}) == []
    svg = tmp_path / "s.svg"
    rm.sweep_svg(sweep, svg)
    assert svg.read_text().count("<svg") == 1 and "images per factory" in svg.read_text()


def test_a_list_of_caps_gives_each_factory_its_own_amount_of_data(tmp_path):
    from kumiki.config import ConfigError
    from kumiki.data.prepare import materialize
    from kumiki.data.sites import load_site

    cfg = make_config(tmp_path, sites=2, unseen=1, data={"samples_per_site": [20, 40, 30]})
    sizes = [len(load_site(d).y_train) + len(load_site(d).y_test) for d in materialize(cfg, tmp_path / "sites")]
    assert sizes == [20, 40, 30]
    with pytest.raises(ConfigError, match="one cap per site"):
        make_config(tmp_path, sites=2, unseen=1, data={"samples_per_site": [20, 40]})


def test_tuning_scores_on_validation_images_cut_from_the_training_split_and_never_on_test(tmp_path):
    from bench.pilot_methods import parse_tune, validation_overrides, validation_sites
    from kumiki.config import apply_overrides, validate
    from kumiki.data.prepare import materialize

    cfg = make_config(tmp_path, sites=2, unseen=1, data={"samples_per_site": 60, "site_names": ["f-a", "f-b", "f-c"]})
    full = {d.name: d for d in materialize(cfg, tmp_path / "full")}
    val = validation_sites(cfg, tmp_path / "tune")
    assert sorted(p.name for p in (tmp_path / "tune").iterdir()) == ["validation"]  # no test split left on disk
    for name, d in full.items():
        rows = lambda f, k="x": {r.tobytes() for r in np.load(f)[k]}  # noqa: E731
        train, test = rows(d / "train.npz"), rows(d / "test.npz")
        v_train, v_val = rows(val / name / "train.npz"), rows(val / name / "test.npz")
        assert v_train | v_val == train and not (v_train & v_val) and not ((v_train | v_val) & test)
        assert len(v_val) == round(0.2 * len(train))
    tuned = validate(apply_overrides(json.loads(cfg.model_dump_json()), validation_overrides(cfg, val)))
    assert tuned.data.dataset == "site-folders" and tuned.data.path == str(val)
    assert parse_tune("method.ft_lr=0.005, 0.01") == ("method.ft_lr", ["0.005", "0.01"])
    with pytest.raises(ValueError, match="at least two values"):
        parse_tune("train.lr=0.1,0.2")


def test_with_the_safeguard_the_served_model_is_the_headline_and_the_personalized_one_stays_beside_it(tmp_path):
    alone = _runs(tmp_path, "local", [(0.80, 0.70), (0.82, 0.70)])
    fed = _runs(tmp_path, "fedavg_ft", [(0.70, 0.74), (0.72, 0.76)])  # factory-a loses 10 points joined
    for d, served in zip(fed, [(0.81, 0.74), (0.83, 0.76)]):  # ... and serves its own model instead
        s = json.loads((d / "summary.json").read_text())
        s["safeguard"] = {"served": {"mean": sum(served) / 2, "per_site": dict(zip(["factory-a", "factory-b"], served))},
                          "serves": {"factory-a": "own", "factory-b": "joined"}}
        (d / "summary.json").write_text(json.dumps(s))
    [row] = board([("fedavg_ft", compare(fed, alone), None)])
    assert row["safeguard"] and row["sites"]["factory-a"]["mean"] == pytest.approx(0.01)
    assert row["mean_gain"] == pytest.approx(0.03) and row["worse_off"] == [] and row["goal"]
    assert row["joined"]["mean_gain"] == pytest.approx(-0.025) and row["joined"]["worse_off"] == ["factory-a"]
    assert row["serves"]["factory-a"] == {"own": 2}
    html = rm.methods_html({"rounds": 10, "board": [row]})
    assert "fedavg_ft</strong> + safeguard" in html and "own model served 2/2" in html and "&minus;" not in html
    assert "-2.5 &plusmn; 0.7" in html  # the personalized model's mean gain beside the served one


def test_kumiki_pilot_refuses_a_bad_methods_list_before_any_run_starts(tmp_path):
    from typer.testing import CliRunner

    from launch.cli import cli

    out = f'run.output_dir="{tmp_path}"'
    r = CliRunner().invoke(cli, ["pilot", "--methods", "fedavg_ft,fedavgg", "--set", out])
    assert r.exit_code == 2 and "unknown method 'fedavgg'" in r.output
    r = CliRunner().invoke(cli, ["pilot", "--methods", "fedavg_ft,ditto", "--no-baseline", "--set", out])
    assert r.exit_code == 2 and "drop --no-baseline" in r.output
    assert not any(tmp_path.iterdir())  # nothing ran
