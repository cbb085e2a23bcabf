"""The manager's question (issue 12, part 5): each factory's gain over training alone, with its spread over
seeds, and what a new factory gets on day one; in comparison.json, the report and `kumiki pilot`."""

from __future__ import annotations

import json
import re
import statistics

import numpy as np
import pytest
from typer.testing import CliRunner

from launch.cli import cli
from launch.pilot import plan
from server.compare import compare, read_comparison, write_comparison
from server.report import render_report
from tests.conftest import make_config

PROFILES = {"factory-a": {"role": "train", "group": "", "domain": "rotate:25", "num_train": 480, "num_test": 120},
            "factory-b": {"role": "train", "group": "", "domain": "line 2", "num_train": 300, "num_test": 75},
            "factory-c": {"role": "unseen", "group": "", "domain": None, "num_train": 90, "num_test": 30}}


def fake_run(root, name, method, seed, pers, unseen=None, adapted=None, metric="accuracy"):
    """A finished run dir with the contract's summary.json and config.json (no training)."""
    d = root / name
    d.mkdir(parents=True)

    def block(per_site):
        if per_site is None:
            return None
        return {"mean": statistics.fmean(per_site.values()), "per_site": per_site}

    summary = {"method": method, "dataset": "x", "metric": metric, "rounds": 3, "sites": 2,
               "personalized": block(pers), "global": {"mean": None, "per_site": {}}, "unseen": block(unseen),
               "unseen_adapted": block(adapted), "status": "ok", "participation": {"profiles": PROFILES}}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.json").write_text(json.dumps({"run": {"name": name, "seed": seed, "rounds": 3},
                                               "eval": {"unseen_adapt_epochs": 5}, "engine": "inprocess"}))
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "final"}) + "\n")
    return d


def test_gains_are_paired_by_seed_with_their_spread_and_the_new_factory_is_compared_to_training_alone(tmp_path):
    joined = [fake_run(tmp_path, "fed", "fedavg_ft", 0, {"factory-a": 0.80, "factory-b": 0.70},
                       {"factory-c": 0.30}, {"factory-c": 0.90}),
              fake_run(tmp_path, "fed-seed1", "fedavg_ft", 1, {"factory-a": 0.84, "factory-b": 0.66},
                       {"factory-c": 0.40}, {"factory-c": 0.94})]
    # given in the other order: pairing goes by run.seed, not by position
    alone = [fake_run(tmp_path, "loc-seed1", "local", 1, {"factory-a": 0.74, "factory-b": 0.70}, None,
                      {"factory-c": 0.80}),
             fake_run(tmp_path, "loc", "local", 0, {"factory-a": 0.75, "factory-b": 0.72}, None, {"factory-c": 0.86})]
    comp = compare(joined, alone)
    assert comp["paired_by"] == "seed" and comp["seeds"] == [0, 1] and comp["higher_is_better"]
    a, b = comp["train"]
    assert a["site"] == "factory-a" and a["domain"] == "rotate:25" and (a["num_train"], a["num_test"]) == (480, 120)
    assert a["gain"]["values"] == pytest.approx([0.05, 0.10])  # 0.80 - 0.75, 0.84 - 0.74
    assert a["gain"]["mean"] == pytest.approx(0.075) and a["gain"]["std"] == pytest.approx(0.0353553, abs=1e-6)
    assert b["gain"]["values"] == pytest.approx([-0.02, -0.04]) and b["gain"]["max"] == pytest.approx(-0.02)
    assert comp["overall"] == {"gain_mean": pytest.approx(0.0225), "sites_gaining": 1, "sites": 2,
                               "served_gain_mean": None, "sites_losing_served": []}  # no safeguard in these runs
    [c] = comp["unseen"]
    assert c["zero_shot"]["mean"] == pytest.approx(0.35) and c["adapted"]["mean"] == pytest.approx(0.92)
    assert c["alone"]["mean"] == pytest.approx(0.83) and c["gain_adapted"]["values"] == pytest.approx([0.04, 0.14])

    write_comparison(joined[0], comp)
    html = render_report(joined[0]).read_text()
    assert "What joining gains each factory" in html
    assert re.search(r"factory-a</strong>: 74\.5% &plusmn; 0\.7 alone &rarr; 82\.0% &plusmn; 2\.8 joined: "
                     r"\+7\.5 &plusmn; 3\.5 points", html), "the per-factory sentence"
    assert "1 of 2</strong> training factories" in html and "camera tilted 25°" in html
    assert "New factory <strong>factory-c</strong> on day one: zero-shot 35.0%" in html
    assert html.count("data:image/png") >= 2  # the comparison plot among the report's figures


def test_a_lower_is_better_metric_counts_a_fall_as_a_gain_and_no_accuracy_is_assumed(tmp_path):
    joined = fake_run(tmp_path, "lm", "worldlm", 0, {"factory-a": 40.0, "factory-b": 55.0}, metric="perplexity")
    alone = fake_run(tmp_path, "lm-local", "local", 0, {"factory-a": 50.0, "factory-b": 52.0}, metric="perplexity")
    comp = compare([joined], [alone])
    assert not comp["higher_is_better"] and not comp["fraction"]
    assert [r["gain"]["mean"] for r in comp["train"]] == pytest.approx([10.0, -3.0])
    write_comparison(joined, comp)
    html = render_report(joined).read_text()
    assert "+10 points" not in html and "+10" in html and "lower is better" in html
    assert "accuracy" not in html.lower(), "a perplexity run's report says nothing of accuracy"
    with pytest.raises(ValueError, match="different metrics"):
        compare([joined], [fake_run(tmp_path, "acc", "local", 0, {"factory-a": 0.5})])


def test_report_compare_cli_writes_the_comparison_into_the_run(tmp_path):
    joined = fake_run(tmp_path, "fed", "fedavg", 0, {"factory-a": 0.9, "factory-b": 0.8})
    alone = fake_run(tmp_path, "loc", "local", 0, {"factory-a": 0.7, "factory-b": 0.85})
    r = CliRunner().invoke(cli, ["report", str(joined), "--compare", str(alone)])
    assert r.exit_code == 0, r.output
    assert "gain +20.0 points" in r.output and read_comparison(joined)["b"]["method"] == "local"
    assert "What joining gains each factory" in (joined / "report.html").read_text()
    r = CliRunner().invoke(cli, ["report", str(joined), "--also", str(alone)])
    assert r.exit_code == 2 and "--also needs --compare" in r.output


def test_the_pilot_plan_varies_the_training_seed_on_the_same_factory_data(tmp_path):
    base = make_config(tmp_path, method="fedavg_ft", name="pilot", sites=2, unseen=1)

    def load(more):
        from kumiki.config import apply_overrides, validate

        return validate(apply_overrides(json.loads(base.model_dump_json()), more))

    runs = plan(load, [], seeds=3, baseline=True, engine="local", extra_engine="inprocess")
    assert [(r.cfg.run.name, r.cfg.method.name, r.seed, r.engine) for r in runs] == [
        ("pilot", "fedavg_ft", 0, "local"), ("pilot-local", "local", 0, "inprocess"),
        ("pilot-seed1", "fedavg_ft", 1, "inprocess"), ("pilot-local-seed1", "local", 1, "inprocess"),
        ("pilot-seed2", "fedavg_ft", 2, "inprocess"), ("pilot-local-seed2", "local", 2, "inprocess")]
    assert [r.cfg.run.seed for r in runs] == [0, 0, 1, 1, 2, 2]
    assert all(r.cfg.data.partition_seed == 0 for r in runs[1:]) and runs[0].main
    assert [r.cfg.run.name for r in plan(load, [], 2, False, "local", "inprocess")] == ["pilot", "pilot-seed1"]


def test_the_partition_seed_keeps_the_factory_data_while_the_training_seed_moves(tmp_path):
    from kumiki.data.sites import load_site
    from kumiki.data.prepare import materialize

    def data(seed, partition_seed):
        cfg = make_config(tmp_path, sites=2, run={"seed": seed}, data={"partition_seed": partition_seed,
                                                                        "site_names": ["factory-a", "factory-b"]})
        [a, _] = materialize(cfg, tmp_path / f"s{seed}-{partition_seed}")
        assert a.name == "factory-a"
        return load_site(a).y_train

    assert np.array_equal(data(1, 0), data(0, None)) and not np.array_equal(data(1, None), data(0, None))
