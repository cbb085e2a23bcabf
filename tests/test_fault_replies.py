"""Fault family: hostile or malformed replies. Each goes through the real ClientApp, grid and strategy.

Every case was observed to crash, abort or take over a run before issue 7 (see the issue). Now a
bad reply is a logged rejection of that one reply: the run completes, the other sites' updates
aggregate, and the global model keeps its dtype and stays finite.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord

from kumiki import contract as C
from launch.engines.inprocess import run_inprocess
from strategies.aggregate import clip_to_median_norm, coordinate_median, trimmed_mean
from tests.conftest import make_config
from tests.replies import arrays_of, on_arrays, rewrite_replies

def _rows(cfg):
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if r["kind"] == "round"}


def _global(cfg):
    with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
        return {k: z[k].copy() for k in z.files if k != "__round__"}


def _metric(key, value, record=C.METRICS):
    def apply(rep):
        m = dict(rep.content[record].items())
        m[key] = value
        rep.content[record] = MetricRecord(m)
    return apply


def _run(tmp_path, hook, rounds=2, **kw):
    cfg = make_config(tmp_path, rounds=rounds, sites=3, **kw)
    summary = run_inprocess(cfg, quiet=True, grid_hook=hook)
    return cfg, summary, _rows(cfg)


@pytest.mark.parametrize("change, needle", [
    (lambda a: {k: v.astype(np.int64) if v.dtype.kind == "f" else v for k, v in a.items()}, "dtype int64"),
    (lambda a: {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in a.items()}, "dtype float64"),
    (lambda a: {k: (v.astype(np.complex64) * np.nan) if v.dtype.kind == "f" else v for k, v in a.items()},
     "dtype complex64"),
], ids=["int64", "float64", "complex-nan"])
def test_tensors_of_another_dtype_are_rejected_and_the_model_keeps_float32(tmp_path, change, needle):
    cfg, summary, rows = _run(tmp_path, rewrite_replies("train", on_arrays(change)))
    [rej] = rows[1]["sites"]["rejected"]
    assert rej["site"] == "site-1" and needle in rej["reason"]
    assert rows[1]["sites"]["aggregated"] and rows[2]["sites"]["rejected"] == []
    g = _global(cfg)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for k, v in g.items() if "num_batches" not in k)
    assert summary["personalized"]["mean"] > 0.2


@pytest.mark.parametrize("value", [1e12, float("nan"), float("inf"), 0.5, 0, -3], ids=str)
def test_num_examples_must_be_a_positive_integer_within_the_announcement(tmp_path, value):
    """1e12 examples used to make the global model that site's tensors exactly; NaN/inf/0.5 crashed the run."""
    poisoned = {}

    def change(rep):
        _metric(C.NUM_EXAMPLES, value)(rep)
        poisoned.update(arrays_of(rep.content))

    cfg, _, rows = _run(tmp_path, rewrite_replies("train", change), rounds=1)
    [rej] = rows[1]["sites"]["rejected"]
    assert rej["site"] == "site-1" and "num-examples" in rej["reason"]
    g = _global(cfg)
    assert not all(np.array_equal(g[k], poisoned[k]) for k in poisoned), "the hostile site did not take over"


@pytest.mark.parametrize("change, needle", [
    (_metric("personalized-accuracy", 37.0), "outside [0, 1]"),
    (_metric("global-loss", float("nan")), "not a finite number"),
    (_metric("personalized-accuracy", [0.9, 0.9]), "not a finite number"),
    (lambda rep: rep.content.metric_records.pop(C.METRICS), "lacks its 'metrics' record"),
], ids=["accuracy-37", "nan-loss", "list-metric", "no-metrics"])
def test_bad_evaluation_replies_are_dropped_not_averaged(tmp_path, change, needle):
    """An accuracy of 37 used to move the reported mean to 12.4; a list metric or no record aborted the run."""
    cfg, summary, rows = _run(tmp_path, rewrite_replies("evaluate", change, rounds=(1, 2)))
    assert all(any(needle in r["reason"] for r in rows[k]["sites"]["rejected"]) for k in (1, 2))
    per_site = summary["personalized"]["per_site"]
    assert set(per_site) == {"site-0", "site-2"} and all(0.0 <= v <= 1.0 for v in per_site.values())


@pytest.mark.parametrize("field, value, needle", [
    ("num-train", "lots", "num-train"),
    ("num-train", 10**12, "exceeds"),
    ("role", "admin", "role"),
    ("site", "../../etc", "not a name"),
], ids=["lots", "huge", "role", "path"])
def test_a_bad_profile_drops_that_node_only(tmp_path, field, value, needle):
    def change(rep):
        p = dict(rep.content[C.PROFILE].items())
        p[field] = value
        rep.content[C.PROFILE] = ConfigRecord(p)

    cfg, summary, rows = _run(tmp_path, rewrite_replies("query.profile", change))
    assert set(summary["personalized"]["per_site"]) == {"site-0", "site-2"}
    assert rows[1]["sites"]["sampled"] == 2
    final = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert final["status"] != "ok" and any(needle in r["reason"] for r in final["participation"]["dropped"])


def test_two_nodes_claiming_one_site_name_keep_the_first(tmp_path):
    def change(rep):
        p = dict(rep.content[C.PROFILE].items())
        p["site"] = "site-0"
        rep.content[C.PROFILE] = ConfigRecord(p)

    cfg, summary, _ = _run(tmp_path, rewrite_replies("query.profile", change))
    assert set(summary["personalized"]["per_site"]) == {"site-0", "site-2"}
    final = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert any("second node claims site name 'site-0'" in r["reason"] for r in final["participation"]["dropped"])


# ----------------------------------------------------------------------------- robust aggregation
def test_robust_rules_by_hand():
    ups = [{"w": np.array([1.0, 10.0], np.float32), "n": np.array(3)},
           {"w": np.array([2.0, 20.0], np.float32), "n": np.array(4)},
           {"w": np.array([3.0, 30.0], np.float32), "n": np.array(5)},
           {"w": np.array([4.0, 40.0], np.float32), "n": np.array(6)},
           {"w": np.array([1000.0, -1000.0], np.float32), "n": np.array(7)}]
    assert np.allclose(coordinate_median(ups)["w"], [3.0, 20.0])
    # beta 0.2 of 5 drops one value at each end per coordinate: [2, 3, 4] and [10, 20, 30]
    assert np.allclose(trimmed_mean(ups, 0.2)["w"], [3.0, 20.0])
    assert coordinate_median(ups)["n"] == 3 and trimmed_mean(ups, 0.2)["w"].dtype == np.float32
    ref = {"w": np.array([1.0, 1.0], np.float32), "n": np.array(0)}
    clipped = clip_to_median_norm(ups, ref, bound=2.0)
    deltas = [u["w"] - ref["w"] for u in ups]
    norms = [np.linalg.norm(d) for d in deltas]  # changes from the reference, not the raw values
    limit = 2.0 * np.median(norms)
    assert np.allclose(clipped[0]["w"], ups[0]["w"])  # small changes untouched
    capped = clipped[4]["w"] - ref["w"]
    assert np.isclose(np.linalg.norm(capped), limit, rtol=1e-5)  # the outlier capped ...
    assert np.allclose(capped / np.linalg.norm(capped), deltas[4] / norms[4], atol=1e-6)  # ... not turned
    assert [int(c["n"]) for c in clipped] == [3, 4, 5, 6, 7], "integer buffers are left as sent"
    assert clipped[4]["w"].dtype == np.float32


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean", "norm_bound"])
def test_a_scaled_update_cannot_drag_the_model_under_a_robust_rule(tmp_path, aggregation):
    """A site that sends its update scaled by 1000 moves the mean far; a robust rule keeps the model near the others."""
    def scale(arrays):
        return {k: v * 1000 if v.dtype.kind == "f" else v for k, v in arrays.items()}

    server = {"aggregation": aggregation, "trim_fraction": 0.34}  # 3 sites: trim one per end
    base_cfg, _, _ = _run(tmp_path / "clean", None, rounds=1, server=server)
    mean_cfg, _, _ = _run(tmp_path / "mean", rewrite_replies("train", on_arrays(scale)), rounds=1)
    rob_cfg, _, _ = _run(tmp_path / "robust", rewrite_replies("train", on_arrays(scale)), rounds=1, server=server)
    clean, attacked, robust = _global(base_cfg), _global(mean_cfg), _global(rob_cfg)
    k = "head.weight"
    assert np.abs(attacked[k] - clean[k]).max() > 10, "the attack works on the plain mean"
    assert np.abs(robust[k] - clean[k]).max() < 0.5, f"{aggregation} keeps the model near the clean one"


def test_robust_rule_that_does_not_fit_the_method_is_refused(tmp_path):
    from kumiki.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="norm_bound"):
        load_config('[run]\nname="x"\nrounds=1\n[method]\nname="fedhb"\n[data]\nsites=2\n'
                    '[server]\naggregation="median"\n')


def test_a_trimmed_mean_that_would_trim_nothing_is_refused():
    from kumiki.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="trims nothing"):
        load_config('[run]\nname="x"\nrounds=1\n[method]\nname="fedavg"\n[data]\nsites=3\n'
                    '[server]\naggregation="trimmed_mean"\ntrim_fraction=0.2\n')


def test_profile_group_is_a_bounded_string():
    from flwr.app import RecordDict

    from strategies.replies import BadReply, parse_profile

    def profile(**kw):
        base = {"site": "s", "role": "train", "num-train": 5, "num-test": 2}
        return RecordDict({C.PROFILE: ConfigRecord({**base, **kw})})

    assert parse_profile(1, profile(group="g" * 128))["group"] == "g" * 128
    assert parse_profile(1, profile())["group"] == ""
    with pytest.raises(BadReply, match="group"):
        parse_profile(1, profile(group="g" * 129))
    with pytest.raises(BadReply, match="group"):
        parse_profile(1, profile(group=5))
