"""Tasks and their metrics: hand values, direction, range checks, site folders, per-task summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client.tasks import Classification, Language, score, task_for
from kumiki.data.sites import SiteDataError, load_site, write_site
from kumiki.tasks import IGNORE, TASKS, metric_key, metric_of_key
from server.recorder import describe, task_sections
from strategies.replies import BadReply, eval_metrics, parse_profile


class _Fixed(torch.nn.Module):
    """Returns the logits it was built with, whatever the input (a stand-in model)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.logits = logits

    def forward(self, x):
        return self.logits[: len(x)] + 0 * self.w


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    x = np.zeros((3, 5), np.int64)
    y = np.random.default_rng(0).integers(0, 256, (3, 5))
    r = score(Language(), _Fixed(torch.zeros(3, 5, 256)), x, y, lambda m, xb: m(xb))
    assert r["score"] == pytest.approx(256.0, rel=1e-6)
    assert r["loss"] == pytest.approx(math.log(256), rel=1e-6)


def test_perplexity_is_token_weighted_over_sequences_of_different_lengths():
    """Sequence A scores 3 tokens, B one (the rest is -100): exp(mean NLL over 4 tokens), not a mean of two
    per-sequence perplexities."""
    logits = torch.full((2, 3, 4), -1e4)
    y = np.array([[0, 1, 2], [3, IGNORE, IGNORE]], np.int64)
    # A predicts its tokens with p = 1/2 (two logits tied), B predicts its token with p = 1
    for t, tok in enumerate([0, 1, 2]):
        logits[0, t, tok] = logits[0, t, (tok + 1) % 4] = 0.0
    logits[1, 0, 3] = 0.0
    r = score(Language(), _Fixed(logits), np.zeros((2, 3), np.int64), y, lambda m, xb: m(xb))
    nll = 3 * math.log(2) / 4
    assert r["score"] == pytest.approx(math.exp(nll), rel=1e-5)
    per_sequence_mean = (2.0 + 1.0) / 2
    assert abs(r["score"] - per_sequence_mean) > 0.1


def test_classification_score_is_the_share_correct_and_the_loss_is_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    y = np.array([0, 1, 1, 1])
    r = score(Classification(), _Fixed(logits), np.zeros((4, 1, 1, 1), np.float32), y, lambda m, xb: m(xb))
    assert r["score"] == 0.75
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(y))))


def test_bottom10_takes_the_worst_sites_in_the_metrics_direction():
    vals = {f"s{i}": v for i, v in enumerate([10.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.5, 2.5])}
    assert describe(vals, higher_is_better=True)["bottom10"] == pytest.approx((1.5 + 2.0) / 2)
    assert describe(vals, higher_is_better=False)["bottom10"] == pytest.approx((10.0 + 9.0) / 2)


def test_metric_keys_name_their_task():
    assert metric_key("personalized", "language") == "personalized-perplexity"
    assert metric_of_key("global-miou") is TASKS["segmentation"]
    assert metric_of_key("train-loss") is None and metric_of_key("personalized-loss") is None
    assert task_for("language").info.higher_is_better is False


class _Content(dict):
    """A reply's content as the reply checks read it (records by name)."""

    @property
    def metric_records(self):
        return self

    @property
    def config_records(self):
        return self


@pytest.mark.parametrize("key,value,ok", [
    ("personalized-perplexity", 0.5, False), ("personalized-perplexity", 3.0, True),
    ("global-miou", 1.2, False), ("global-miou", 0.7, True), ("adapted-psnr", 35.0, True),
    ("adapted-psnr", -1.0, False), ("personalized-accuracy", 1.5, False),
])
def test_each_task_metric_is_range_checked_in_replies(key, value, ok):
    content = _Content({"metrics": {"num-examples": 10, key: value}})
    if ok:
        assert eval_metrics(content, announced_test=10)[key] == value
    else:
        with pytest.raises(BadReply, match="outside"):
            eval_metrics(content, announced_test=10)


def test_a_profile_with_an_unknown_task_is_refused_and_a_known_one_is_kept():
    base = {"site": "f-1", "role": "train", "num-train": 5, "num-test": 2}
    assert parse_profile(1, _Content({"profile": {**base, "task": "segmentation"}}))["task"] == "segmentation"
    assert parse_profile(1, _Content({"profile": base}))["task"] == "classification"
    with pytest.raises(BadReply, match="task"):
        parse_profile(1, _Content({"profile": {**base, "task": "juggling"}}))


def _meta(task: str, **kw) -> dict:
    return {"name": "s", "role": "train", "task": task, **kw}


def test_a_language_site_folder_loads_and_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (4, 8))
    y = np.roll(x, -1, axis=1)
    y[:, -1] = IGNORE
    site = load_site(write_site(tmp_path / "lm", _meta("language", num_classes=256, input_shape=[8]), x, y, x, y))
    assert site.task == "language" and site.x_train.dtype == np.int64 and (site.y_train[:, -1] == IGNORE).all()
    bad = x.copy()
    bad[0, 0] = 300
    with pytest.raises(SiteDataError, match="token ids outside"):
        load_site(write_site(tmp_path / "bad", _meta("language", num_classes=256), bad, y, x, y))


def test_masks_must_be_zero_or_one_and_may_be_stored_as_integers(tmp_path):
    x = np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float32)
    mask = (x > 0.5).astype(np.float32)
    folder = write_site(tmp_path / "seg", _meta("segmentation"), x, mask, x, mask)
    np.savez(folder / "test.npz", x=x, y=(x > 0.5).astype(np.uint8))  # 0/1 integers: not pixels to scale
    assert load_site(folder).y_test.max() == 1.0
    with pytest.raises(SiteDataError, match="masks"):
        load_site(write_site(tmp_path / "half", _meta("segmentation"), x, mask * 0.5, x, mask))


def test_an_unknown_task_in_site_json_is_refused(tmp_path):
    x = np.zeros((2, 1, 2, 2), np.float32)
    folder = write_site(tmp_path / "s", _meta("classification"), x, np.zeros(2), x, np.zeros(2))
    (folder / "site.json").write_text(json.dumps(_meta("juggling")))
    with pytest.raises(SiteDataError, match="unknown task"):
        load_site(folder)


def test_per_task_sections_describe_each_task_over_its_own_sites_only():
    ev = {"a": {"personalized-accuracy": 0.9, "global-accuracy": 0.8},
          "b": {"personalized-accuracy": 0.7, "global-accuracy": 0.6},
          "c": {"personalized-miou": 0.5, "global-miou": 0.4},
          "u": {"global-miou": 0.3, "adapted-miou": 0.45}}
    roles = {"a": "train", "b": "train", "c": "train", "u": "unseen"}
    tasks = {"a": "classification", "b": "classification", "c": "segmentation", "u": "segmentation"}
    out = task_sections(ev, roles, tasks)
    assert out["classification"]["metric"] == "accuracy"
    assert out["classification"]["personalized"]["mean"] == pytest.approx(0.8)
    assert out["classification"]["unseen"] is None
    assert out["segmentation"]["personalized"]["per_site"] == {"c": 0.5}
    assert out["segmentation"]["unseen"]["per_site"] == {"u": 0.3}
    assert out["segmentation"]["unseen_adapted"]["mean"] == pytest.approx(0.45)


def test_a_method_that_trains_classification_only_refuses_other_tasks(monkeypatch, tmp_path):
    from kumiki.config import ConfigError, validate
    from kumiki.data import sources

    monkeypatch.setitem(sources.DATASET_TASK, "digits", "segmentation")
    raw = {"run": {"name": "t", "rounds": 1, "output_dir": str(tmp_path)}, "method": {"name": "dualfed"},
           "data": {"dataset": "digits", "sites": 2}}
    with pytest.raises(ConfigError, match="dualfed trains classification only"):
        validate(raw)
    raw["method"] = {"name": "fedavg"}
    assert validate(raw).site_tasks() == ["segmentation", "segmentation"]


# ----------------------------------------------------------------------------- dense tasks (M-Fed, issue 9)
class _ByIndex(_Fixed):
    """Returns the outputs of the examples whose indices the inputs hold (so batches can split the split)."""

    def forward(self, x):
        return self.logits[x.flatten().long()] + 0 * self.w


def _dense(task, logits, y, batch_size=512):
    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1, 1)
    return score(task, _ByIndex(logits), x, y, lambda m, xb: m(xb), batch_size=batch_size)


def test_miou_averages_the_foreground_and_background_iou_of_the_whole_split():
    from client.tasks import Segmentation

    y = np.array([[[[1, 1], [0, 0]]], [[[0, 0], [0, 1]]]], np.float32)  # 3 foreground, 5 background pixels
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]], [[[-5.0, -5.0], [-5.0, 5.0]]]])
    # fg: 2 hits, 1 false alarm, 1 miss -> 2/4; bg: 4 hits, 1 false alarm, 1 miss -> 4/6
    r = _dense(Segmentation(), logits, y)
    assert r["score"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    # the mean of per-image mIoUs would be ((1/3 + 1/3) / 2 + 1) / 2 = 0.667: the split's counts are summed first
    assert _dense(Segmentation(), logits, y, batch_size=1)["score"] == pytest.approx(r["score"])


def test_edge_fscore_takes_the_best_threshold_and_counts_near_misses_within_the_tolerance():
    from client.tasks import Edges

    y = np.zeros((1, 1, 5, 5), np.float32)
    y[0, 0, 2, 2] = 1.0  # one true edge pixel
    logits = torch.full((1, 1, 5, 5), -10.0)
    logits[0, 0, 2, 3] = 10.0  # predicted one pixel to the right
    assert _dense(Edges(tolerance=1), logits, y)["score"] == pytest.approx(1.0)
    assert _dense(Edges(tolerance=0), logits, y)["score"] == 0.0
    logits[0, 0, 2, 2] = 0.0  # p = 0.5 on the true pixel: at thresholds < 0.5 both are predicted (P = 1/2 at tol 0)
    assert _dense(Edges(tolerance=0), logits, y)["score"] == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_class_balanced_edge_loss_per_batch_and_per_example():
    from client.tasks import balanced_bce

    y = torch.zeros(2, 1, 2, 2)
    y[0, 0, 0, 0] = 1.0  # example 0: 1 edge of 4; example 1: none
    out = torch.zeros(2, 1, 2, 2)
    base = math.log(2)  # BCE of logit 0
    # batch: 1 edge, 7 others -> the edge weighs 7: (7 + 7) / 8 pixels
    assert float(balanced_bce(out, y)) == pytest.approx(base * 14 / 8)
    # per example: the edge weighs 3 in example 0, example 1 has none: (3 + 3 + 4) / 8
    assert float(balanced_bce(out, y, per="example")) == pytest.approx(base * 10 / 8)


def test_psnr_comes_from_the_splits_total_squared_error():
    from client.tasks import Denoising

    y = np.zeros((2, 1, 2, 2), np.float32)
    out = torch.zeros(2, 1, 2, 2)
    out[0] += 0.1  # squared error 0.01 on 4 pixels, 0 on the other image
    r = _dense(Denoising(), out, y)
    assert r["loss"] == pytest.approx(0.005) and r["score"] == pytest.approx(10 * math.log10(1 / 0.005))
    # the mean of per-image PSNRs would be (20 + 100) / 2 = 60 dB: a perfect image must not hide a bad one
    assert r["score"] == pytest.approx(23.01, abs=0.01)
