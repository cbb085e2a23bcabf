"""Evaluation under per-site DP (issue 21 item 3): no metric of a model trained outside DP-SGD leaves the site.

FedAvg-FT's fine-tuned copy, FedHB's personalization and every unseen site's adaptation train on the site's
training split in the clear before they are evaluated. Read as the server would: it collects every evaluation
record a DP site sends (evaluate replies and the evaluation inside train replies) and must find none of those
paths' metrics, only ``withheld-<path> = 1``; the site keeps the figures in its own log, and the ledger holds
exactly the training steps the site reported (evaluation charges nothing and releases nothing)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from client.app import LOCAL_LOG, evaluation_metrics
from client.methods.base import SiteObjective
from client.privacy import Ledger
from kumiki import contract as C
from kumiki.accounting import epsilon
from kumiki.config import PrivacySection
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config

GN = {"arch": "mlp", "norm": "group", "hidden": 64}
DP = {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 50.0}


def _capture(seen: list, steps: dict):
    """A grid hook: every evaluation record any site sends the server (evaluate replies, train replies' own), and
    the DP steps each site reports per round."""
    def hook(grid):
        send = grid.send_and_receive

        def wrapped(messages, *, timeout=None):
            replies = send(list(messages), timeout=timeout)
            for r in replies:
                if r.has_error():
                    continue
                records = r.content.metric_records
                if r.metadata.message_type == "train":
                    nid = r.metadata.src_node_id
                    steps[nid] = steps.get(nid, 0) + int(r.content[C.METRICS]["train-dp-steps"])
                if r.metadata.message_type == "evaluate" and C.METRICS in records:
                    seen.append(dict(r.content[C.METRICS]))
                if C.EVALUATION in records:
                    seen.append(dict(r.content[C.EVALUATION]))
            return replies

        grid.send_and_receive = wrapped
    return hook


@pytest.mark.parametrize("method,knobs", [("fedavg_ft", {"ft_epochs": 1}), ("fedhb", {"personalize_epochs": 1})])
def test_a_dp_site_sends_no_metric_of_a_model_it_fine_tuned_in_the_clear(tmp_path, method, knobs):
    cfg = make_config(tmp_path, method=method, rounds=2, sites=2, unseen=1, knobs=knobs, model=GN, privacy=DP,
                      eval={"unseen_adapt_epochs": 1}, data={"samples_per_site": 160}, train={"local_epochs": 1})
    seen: list[dict] = []
    steps: dict[int, int] = {}
    s = run_inprocess(cfg, quiet=True, grid_hook=_capture(seen, steps))
    assert s["status"] == "ok" and seen
    leaked = [k for m in seen for k in m if k.startswith(("personalized-", "adapted-"))]
    assert not leaked, f"the server received metrics of a model trained outside DP-SGD: {sorted(set(leaked))}"
    train = [m for m in seen if not m.get("unseen")]
    unseen = [m for m in seen if m.get("unseen")]
    assert train and all(m.get("withheld-personalized") == 1 for m in train)
    assert unseen and all(m.get("withheld-adapted") == 1 for m in unseen)
    assert all("global-accuracy" in m for m in seen), "the global path is DP-trained: it is still reported"
    p = s["privacy"]
    assert p["withheld_metrics"] == ["adapted", "personalized"] and "outside DP-SGD" in p["covers"]
    assert s["personalized"]["mean"] is None
    # the site kept the figures for its operator
    logs = sorted((tmp_path / "runs").glob(f"{cfg.run.name}/state/*/{LOCAL_LOG}"))
    assert len(logs) == 3
    kept = [json.loads(line) for f in logs for line in f.read_text().splitlines()]
    assert any("personalized-accuracy" in r["metrics"] for r in kept)
    assert any("adapted-accuracy" in r["metrics"] for r in kept)
    # nothing was charged for evaluation: each ledger holds the training rounds' steps (two rounds of one local epoch of
    # 1/q Poisson batches), which the site reported, and the epsilon the server has is the accountant's over it
    p = PrivacySection(**DP)
    ledgers = sorted((tmp_path / "runs").rglob("privacy-*.json"))
    assert len(ledgers) == 2 and len(steps) == 2
    for f in ledgers:
        site = f.stem[len("privacy-"):]
        led = Ledger.open(f.parent, site)
        n = s["participation"]["profiles"][site]["num_train"]
        assert led.steps == 2 * round(n / cfg.train.batch_size) * cfg.train.local_epochs and led.steps in set(steps.values()), (led.steps, steps)
        assert s["privacy"]["epsilon_per_site"][site] == pytest.approx(epsilon(p.accountant, led.history, p.delta))


def _job(private: bool):
    from kumiki.methods import FedAvgFTConfig
    from tests.test_site_objectives import site_job

    sj = site_job(FedAvgFTConfig(ft_epochs=1), norm="group")
    sj.job = replace(sj.job, privacy=PrivacySection(enabled=private, noise_multiplier=1.0, target_epsilon=50.0))
    return sj


def _info(tmp_path, role="train"):
    from types import SimpleNamespace

    return SimpleNamespace(name="s", role=role, state_dir=tmp_path)


def test_without_dp_or_without_fine_tuning_the_personalized_metric_is_sent(tmp_path):
    """The rule is exact, not a blanket: no DP, or FedAvg-FT with ft_epochs = 0 under DP, sends it."""
    from client.methods.fedavg_ft import FedAvgFTObjective
    from kumiki.methods import FedAvgFTConfig

    sj = _job(private=False)
    m = evaluation_metrics(sj, FedAvgFTObjective(sj.job.method), _info(tmp_path))
    assert "personalized-accuracy" in m and "withheld-personalized" not in m
    sj = _job(private=True)
    cfg = FedAvgFTConfig(ft_epochs=0)
    sj.job = replace(sj.job, method=cfg)
    m = evaluation_metrics(sj, FedAvgFTObjective(cfg), _info(tmp_path))
    assert "personalized-accuracy" in m and "withheld-personalized" not in m
    assert not (tmp_path / LOCAL_LOG).exists()


def test_any_method_that_reads_the_training_split_to_build_a_model_is_caught(tmp_path):
    """Whatever the method: a path whose model was built from the training split (here: one direct read of the
    trainer's inputs, no Trainer.fit at all) is withheld under DP."""
    class Peeking(SiteObjective):
        def personalized_model(self, sj):
            model = sj.model
            with torch.no_grad():
                model(sj.trainer.x[:4])  # e.g. statistics of the training split
            return model

        def global_model(self, sj):
            return sj.model

        def predict_global(self, model, x):  # a path of its own, so the two are evaluated apart
            return model(x)

    sj = _job(private=True)
    m = evaluation_metrics(sj, Peeking(sj.job.method), _info(tmp_path))
    assert m.get("withheld-personalized") == 1 and "personalized-accuracy" not in m
    assert "global-accuracy" in m and "withheld-global" not in m
    kept = [json.loads(line) for line in (tmp_path / LOCAL_LOG).read_text().splitlines()]
    assert "personalized-accuracy" in kept[0]["metrics"]
