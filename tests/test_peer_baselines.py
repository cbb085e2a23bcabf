"""FedPer, FedRep, Ditto (spec ``baselines.md``): what stays home, stage freezing, trajectories, restart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.loop import Trainer
from client.methods.base import SiteJob
from client.methods.fedrep import FedRepObjective
from client.state import SiteState
from kumiki import contract as C
from kumiki.config import PrivacySection, TrainSection
from kumiki.data.sites import SiteData
from kumiki.data.sources import load_digits
from launch.engines.inprocess import run_inprocess
from kumiki.methods.fedrep import FedRepConfig
from kumiki.split import ParamSplit
from models import ModelSpec, build_model
from tests.conftest import make_config, untimed
from tests.replies import arrays_of



def run(tmp_path, method, rounds=2, sites=3, unseen=1, **kw):
    cfg = make_config(tmp_path, method=method, name=method, rounds=rounds, sites=sites, unseen=unseen, **kw)
    grids = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    grid = grids[0]
    assert all(not r.has_error() for r in grid.replies), [r.error.reason for r in grid.replies if r.has_error()]
    return cfg, grid, summary


def message_arrays(grid):
    """Every array in every message, both directions: (record key, tensor name, value)."""
    for msg in list(grid.sent) + list(grid.replies):
        for key in msg.content.array_records:
            for name, arr in msg.content[key].items():
                yield key, name, arr.numpy()


def replay_last_evaluation(cfg, grid):
    """Rebuild every site from the last evaluate message and its state file: metrics must be identical."""
    n = cfg.total_sites
    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"][-n:]
    for msg, reply in zip(evals, grid.replies[-n:]):
        again = grid.app(msg, grid.contexts[msg.metadata.dst_node_id]).content[C.METRICS]
        assert untimed(again) == untimed(reply.content[C.METRICS])


@pytest.mark.parametrize("method", ["fedper", "fedrep"])
def test_heads_never_travel_and_survive_a_restart(tmp_path, method):
    cfg, grid, summary = run(tmp_path, method)
    names = {name for _, name, _ in message_arrays(grid)}
    assert names and not [n for n in names if n.startswith("head.")]
    saved = torch.load(cfg.run_dir() / "state" / "site-0" / "site_state.pt", weights_only=True)
    assert set(saved["personal"]) == {"head.weight", "head.bias"}
    initial = build_model(ModelSpec("mlp", (1, 8, 8), 10, hidden=64), "plain").head.weight
    assert not torch.equal(saved["personal"]["head.weight"], initial)
    assert summary["unseen_adapted"]["mean"] is not None, "unseen sites: a fresh head on the frozen body"
    replay_last_evaluation(cfg, grid)


def test_fedrep_head_stage_then_body_stage():
    x, y = load_digits()
    cfg = FedRepConfig(head_epochs=2, body_epochs=1)
    spec = ModelSpec("mlp", (1, 8, 8), 10, hidden=64)
    model = build_model(spec, "plain")
    tcfg = TrainSection(batch_size=32, lr=0.05, device="cpu")
    sj = SiteJob(model, ParamSplit.build(model, cfg.split_rules()), Trainer(x[:96], y[:96], tcfg, seed="t"),
                 SiteData("s", "train", x[:96], y[:96], x[96:192], y[96:192], {}), SiteState("fp"),
                 C.Job(1, cfg, tcfg, spec, PrivacySection()), {})
    stages, fit = [], sj.trainer.fit

    def spy(m, params, *a, **kw):  # whole state dicts: BN running statistics are part of phi
        before = {k: p.detach().clone() for k, p in m.state_dict().items()}
        out = fit(m, params, *a, **kw)
        stages.append((before, {k: p.detach().clone() for k, p in m.state_dict().items()}, kw.get("epochs")))
        return out

    sj.trainer.fit = spy
    FedRepObjective(cfg).fit(sj)
    (h0, h1, h_epochs), (b0, b1, b_epochs) = stages
    assert (h_epochs, b_epochs) == (2, 1)
    moved = lambda a, b, part: {k for k in a if k.startswith(part) and not torch.equal(a[k], b[k])}  # noqa: E731
    assert any("running_mean" in k for k in h0), "the body has BatchNorm statistics to protect"
    assert not moved(h0, h1, "encoder."), "stage 1 leaves phi bit-identical, BN statistics included"
    assert moved(h0, h1, "head.") == {"head.weight", "head.bias"}
    assert not moved(b0, b1, "head.") and moved(b0, b1, "encoder.")


def test_ditto_global_trajectory_is_fedavg_and_v_never_travels(tmp_path):
    def final_global(cfg):
        with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
            return {k: z[k] for k in z.files}

    avg_cfg, _, avg = run(tmp_path, "fedavg")
    cfg, grid, ditto = run(tmp_path, "ditto", knobs={"lam": 0.1})
    g_avg, g_ditto = final_global(avg_cfg), final_global(cfg)
    assert all(np.array_equal(g_avg[k], g_ditto[k]) for k in g_avg), "the global track is exactly FedAvg's"
    assert ditto["global"] == avg["global"]
    assert ditto["personalized"]["mean"] != avg["personalized"]["mean"], "evaluation uses v_k"
    sent = [arr for _, _, arr in message_arrays(grid)]
    for site in ("site-0", "site-1", "site-2"):
        v = torch.load(cfg.run_dir() / "state" / site / "site_state.pt", weights_only=True)["extra"]["v"]
        for name, t in v.items():
            if t.is_floating_point() and t.numel() > 1:
                assert not any(arr.shape == t.shape and np.array_equal(arr, t.numpy()) for arr in sent), name
    replay_last_evaluation(cfg, grid)


def test_ditto_lambda_pulls_v_toward_the_global_model(tmp_path):
    """lambda = 0 is free local training from w_t; a large lambda (lr * lambda = 1.5, still stable) pins v_k to w_t."""
    def distance(lam, name):
        cfg, grid, _ = run(tmp_path / name, "ditto", rounds=1, sites=2, unseen=0, knobs={"lam": lam})
        v = torch.load(cfg.run_dir() / "state" / "site-0" / "site_state.pt", weights_only=True)["extra"]["v"]
        first = next(m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.dst_node_id == 1)
        w = arrays_of(first.content)  # the w_t site-0 (node 1) received in round 1
        return max(float(np.abs(v[k].numpy() - a).max()) for k, a in w.items() if "running" not in k
                   and "num_batches" not in k)

    free, pinned = distance(0.0, "zero"), distance(30.0, "big")
    assert pinned < 0.2 * free, (pinned, free)


def test_unseen_sites_adapt_by_each_methods_protocol(tmp_path):
    """FedPer/FedRep fit a fresh head on the frozen body (no zero-shot path); Ditto trains v from the global w."""
    for method in ("fedper", "fedrep"):
        _, _, summary = run(tmp_path / method, method)
        assert summary["unseen"] is None and summary["global"]["mean"] is None, "no shared head: no zero-shot path"
        assert summary["unseen_adapted"]["mean"] > 0.2
    cfg, grid, summary = run(tmp_path / "ditto", "ditto", eval={"unseen_adapt_epochs": 3})
    assert summary["unseen"]["mean"] is not None and summary["unseen_adapted"]["mean"] is not None
    # the unseen site's adapted model is the personal track from w_t, replayed by hand
    from client.app import prepare
    from client.methods.ditto import DittoObjective
    from client.loop import evaluate

    msg = [m for m in grid.sent if m.metadata.message_type == "evaluate" and m.metadata.dst_node_id == 4][-1]
    sj, obj, _, _ = prepare(msg, grid.contexts[4], for_training=False)
    assert sj.role == "unseen" and isinstance(obj, DittoObjective)
    w = {k: v.clone() for k, v in sj.model.state_dict().items()}
    v = obj.adapt_unseen(sj, 3)
    assert all(torch.equal(t, w[k]) for k, t in sj.model.state_dict().items()), "w itself is not touched"
    assert any(not torch.equal(t, w[k]) for k, t in v.state_dict().items() if t.is_floating_point())
    acc = evaluate(v, sj.data.x_test, sj.data.y_test)["accuracy"]
    assert acc == summary["unseen_adapted"]["per_site"]["site-3"]
