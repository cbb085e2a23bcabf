"""``eval.every = "auto"`` (issue 26 item 4): evaluation near 20 % of a run when evaluation itself trains.

The rule (``server/eval_plan.py``) counts a round in epochs of training: evaluating costs each training site its
method's evaluation training (FedAvg-FT's ``ft_epochs``) plus its passes, each unseen site its adaptation; k is
the smallest that keeps evaluation / (training + evaluation) at most the goal. The last round is always evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kumiki.config import load_config
from launch.engines.inprocess import run_inprocess
from server.eval_plan import EVAL_PASSES_EPOCHS, EVAL_SHARE_GOAL, eval_every
from tests.conftest import make_config, make_lm_config

ROOT = Path(__file__).resolve().parents[1]


def _share(cfg, k: int) -> float:
    """The modelled share of a run that evaluates every k-th round (epochs of training per round)."""
    own = getattr(cfg.method, "eval_train_epochs", 0)
    ev = (cfg.data.sites * (own + EVAL_PASSES_EPOCHS)
          + cfg.data.unseen_sites * (cfg.eval.unseen_adapt_epochs + EVAL_PASSES_EPOCHS))
    return ev / (k * cfg.data.sites * cfg.train.local_epochs + ev)


@pytest.mark.parametrize("sets, expected", [
    ([], 14),  # the pilot: FedHB (5 personalization epochs vs 2), 4 sites + 1 unseen adapting 5 epochs
    (['method.name="fedavg_ft"'], 11),  # FedAvg-FT (1 epoch fine-tuning), the same sites
    (['method.name="fedavg_ft"', "data.unseen_sites=0", "data.site_names=[]"], 5),  # 1.25 epochs per evaluation vs 1
    (['method.name="fedavg"', "data.unseen_sites=0", "data.site_names=[]"], 1),  # evaluation does not train
    (['method.name="fedavg"'], 7),  # ... but the unseen site's adaptation does
    (['method.name="fedhb"', "data.unseen_sites=0", "data.site_names=[]"], 11),  # 5 personalization epochs vs 2
    (["eval.every=3"], 3),  # a number is kept
])
def test_auto_is_the_smallest_k_that_keeps_evaluation_near_the_goal(sets, expected):
    cfg = load_config(str(ROOT / "deploy" / "pilot.toml"), sets)
    assert eval_every(cfg) == expected
    if cfg.eval.every == "auto" and expected > 1:
        assert _share(cfg, expected) <= EVAL_SHARE_GOAL + 1e-9 < _share(cfg, expected - 1)


def test_methods_that_train_fixed_steps_evaluate_every_round(tmp_path):
    assert eval_every(make_lm_config(tmp_path, eval={"every": "auto"})) == 1  # WorldLM: local_steps, sampled eval


def test_an_auto_run_evaluates_every_kth_round_and_the_last_and_says_which(tmp_path):
    cfg = make_config(tmp_path, method="fedavg_ft", rounds=3, sites=2, eval={"every": "auto"})
    assert eval_every(cfg) == 5  # 2 sites x 1.25 epochs per evaluation against 2 x 1 per round
    summary = run_inprocess(cfg, quiet=True)
    assert summary["status"] == "ok"
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["round"] for r in rows if r["kind"] == "round" and r["personalized"] is not None]
    assert evaluated == [3], "rounds 1 and 2 are not evaluated; the last round always is"
    assert summary["personalized"]["mean"] is not None
    assert summary["eval_share"]["every"] == 5
    assert json.loads((cfg.run_dir() / "summary.json").read_text())["eval_share"]["every"] == 5
