"""Evaluation that costs less than training (issue 26 item 4): a fixed test sample in every round but the last,
the whole split at the last, and evaluation's share of the sites' rounds in summary.json. No test times anything."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

from client import eval_sample
from kumiki import contract as C
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config


def _job(sample="auto", steps=None, batch=32, epochs=1, rnd=1, rounds=3, final="auto"):
    return SimpleNamespace(eval=SimpleNamespace(sample=sample, final_sample=final), method=SimpleNamespace(local_steps=steps),
                           train=SimpleNamespace(batch_size=batch, local_epochs=epochs),
                           model=SimpleNamespace(seed=0), round=rnd, rounds=rounds)


def test_auto_sizes_the_sample_from_the_training_of_a_round():
    assert eval_sample.sample_size(_job(steps=50), num_train=20_000, num_test=5_000) == 400  # 50 x 32 / 4
    assert eval_sample.sample_size(_job(steps=50), 20_000, 5_000, task="language") == 160  # WorldLM: 50 x 32 / 10
    assert eval_sample.sample_size(_job(), num_train=240, num_test=60) is None  # images: a quarter is the split
    assert eval_sample.sample_size(_job(steps=1, batch=8), num_train=10_000, num_test=1_000) == eval_sample.MIN_AUTO
    assert eval_sample.sample_size(_job(sample=0), num_train=10_000, num_test=1_000) is None
    assert eval_sample.sample_size(_job(sample=100), num_train=10, num_test=1_000) == 100


def test_the_last_round_scores_the_whole_split_on_images_and_twice_the_sample_on_language_data():
    # WorldLM on fortunes: 50 steps x 32 a round; scoring the whole split (thousands of windows) at the last round
    # made evaluation about 45 % of a 6-round run
    assert eval_sample.final_size(_job(steps=50), 20_000, 5_000, task="language") == 320
    assert eval_sample.final_size(_job(steps=50), 20_000, 5_000) is None, "images: the whole split"
    assert eval_sample.final_size(_job(steps=50), 20_000, 300, task="language") is None, "the sample would cover it"
    assert eval_sample.final_size(_job(steps=50, sample=0), 20_000, 5_000, task="language") is None
    assert eval_sample.final_size(_job(steps=50, final=0), 20_000, 5_000, task="language") is None
    assert eval_sample.final_size(_job(final=500), 10, 5_000) == 500
    text = SimpleNamespace(num_train=20_000, x_test=np.arange(5_000), y_test=np.arange(5_000), task="language")
    x, y = eval_sample.test_split(_job(steps=50), text, "site-0", full=True)
    assert len(y) == 320 and len(set(x.tolist())) == 320
    x, y = eval_sample.test_split(_job(steps=50), text, "site-0", full=False)
    assert len(y) == 160


def test_the_sample_is_a_fixed_set_of_distinct_indices_per_site():
    a = eval_sample.indices(1000, 50, 0, "site-0")
    assert np.array_equal(a, eval_sample.indices(1000, 50, 0, "site-0"))
    assert len(set(a.tolist())) == 50 and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, eval_sample.indices(1000, 50, 0, "site-1")), "each site draws its own"


def test_the_last_round_or_the_servers_mark_asks_for_the_whole_split():
    assert not eval_sample.is_full(_job(rnd=2, rounds=3), {})
    assert eval_sample.is_full(_job(rnd=2, rounds=3), {C.EVAL_FULL: True})
    assert eval_sample.is_full(_job(rnd=3, rounds=3), {}), "a tier that drops the mark cannot sample the last round"


def test_a_run_scores_the_same_sample_every_round_and_the_whole_split_at_the_last(tmp_path, monkeypatch):
    seen: list[tuple[str, bool, int, str]] = []
    real = eval_sample.test_split

    def spy(job, data, site, full):
        x, y = real(job, data, site, full)
        seen.append((site, full, len(y), hashlib.sha1(x.tobytes() + y.tobytes()).hexdigest()))
        return x, y

    monkeypatch.setattr(eval_sample, "test_split", spy)
    cfg = make_config(tmp_path, rounds=3, sites=2, unseen=1, eval={"sample": 10})
    summary = run_inprocess(cfg, quiet=True)
    assert summary["status"] == "ok"
    records = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    rows = {(r["round"], r["site"]): r for r in records if r["kind"] == "site"}
    tests = {s: p["num_test"] for s, p in summary["participation"]["profiles"].items()}
    assert set(tests) == {"site-0", "site-1", "site-2"}
    for site, n in tests.items():
        assert n > 10
        assert [rows[(k, site)]["eval_examples"] for k in (1, 2, 3)] == [10, 10, n], site
        mine = [(full, size, h) for s, full, size, h in seen if s == site]
        sampled = {h for full, size, h in mine if not full}
        assert len([1 for full, _, _ in mine if not full]) >= 2 and len(sampled) == 1, "one sample, every round"
        assert mine[-1][:2] == (True, n), "the last round: the whole split"


def test_summary_json_reports_evaluations_share_per_site_and_overall(tmp_path):
    cfg = make_config(tmp_path, rounds=2, sites=2, name="share")
    summary = run_inprocess(cfg, quiet=True)
    share = json.loads((cfg.run_dir() / "summary.json").read_text())["eval_share"]
    assert share == json.loads(json.dumps(summary["eval_share"]))
    records = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    fit = {s: 0.0 for s in ("site-0", "site-1")}
    ev = dict(fit)
    for r in records:
        if r["kind"] == "round":
            for s, t in r["time"]["sites"].items():
                fit[s] += t["fit_s"] or 0.0
                ev[s] += t["eval_s"] or 0.0
    assert all(fit[s] > 0 and ev[s] > 0 for s in fit)
    for s in fit:
        assert share["per_site"][s] == pytest.approx(ev[s] / (fit[s] + ev[s]))
    total_ev, total_fit = sum(ev.values()), sum(fit.values())
    assert share["overall"] == pytest.approx(total_ev / (total_ev + total_fit))
    assert 0 < share["before_last"]["overall"] < 1 and set(share["before_last"]["per_site"]) == set(fit)
