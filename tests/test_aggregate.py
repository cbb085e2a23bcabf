"""Aggregation equations against hand-computed values; FedProx's term; local never aggregates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.methods.fedprox import proximal_term
from launch.engines.inprocess import run_inprocess
from strategies.aggregate import uniform_mean, weighted_mean
from tests.conftest import make_config


def test_weighted_mean_by_hand():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(7, np.int64)}
    b = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(9, np.int64)}
    out = weighted_mean([a, b], [10, 30])
    # (10 * [1, 2] + 30 * [3, 6]) / 40 = [2.5, 5.0]
    assert np.allclose(out["w"], [2.5, 5.0]) and out["w"].dtype == np.float32
    assert out["n"] == 7  # integer buffers are taken from the first update, never averaged
    assert np.allclose(uniform_mean([a, b])["w"], [2.0, 4.0])


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([{"w": np.ones(1)}], [0.0])
    with pytest.raises(ValueError):
        weighted_mean([], [])


def test_fedprox_proximal_gradient_is_mu_times_displacement():
    model = torch.nn.Linear(3, 2)
    anchor = {k: v.detach().clone() + 0.5 for k, v in model.named_parameters()}
    mu = 0.3
    proximal_term(model, anchor, mu).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, mu * (p.detach() - anchor[name]))


def _global(cfg):
    with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
        return {k: z[k].copy() for k in z.files if k != "__round__"}


def test_fedprox_mu0_equals_fedavg_and_fedavg_ft_keeps_fedavg_trajectory(tmp_path):
    base = make_config(tmp_path, method="fedavg", rounds=2, name="a")
    run_inprocess(base, quiet=True)
    prox = make_config(tmp_path, method="fedprox", rounds=2, name="b", knobs={"mu": 0.0})
    run_inprocess(prox, quiet=True)
    ft = make_config(tmp_path, method="fedavg_ft", rounds=2, name="c", knobs={"ft_epochs": 2})
    run_inprocess(ft, quiet=True)
    ga, gb, gc = _global(base), _global(prox), _global(ft)
    assert ga.keys() == gb.keys() == gc.keys() and ga
    for k in ga:
        assert np.array_equal(ga[k], gb[k]), k
        assert np.array_equal(ga[k], gc[k]), k
    # and a real mu changes the trajectory (the test above could not pass vacuously)
    prox2 = make_config(tmp_path, method="fedprox", rounds=2, name="d", knobs={"mu": 1.0})
    run_inprocess(prox2, quiet=True)
    assert any(not np.array_equal(ga[k], _global(prox2)[k]) for k in ga if ga[k].dtype.kind == "f")


def test_local_never_aggregates(tmp_path):
    cfg = make_config(tmp_path, method="local", rounds=2)
    summary = run_inprocess(cfg, quiet=True)
    assert _global(cfg) == {}  # the server holds no model at all
    assert summary["bytes"]["up_total"] == 0 and summary["bytes"]["down_total"] == 0
    assert summary["personalized"]["mean"] > 0.2  # the sites did train on their own
    assert summary["global"]["mean"] is None


def test_weighted_mean_accepts_zero_and_fractional_weights():
    a = {"w": np.array([1.0], np.float32)}
    b = {"w": np.array([5.0], np.float32)}
    assert np.allclose(weighted_mean([a, b], [0.0, 1.0])["w"], [5.0])  # a zero weight is allowed, not an error
    assert np.allclose(weighted_mean([a, b], [0.25, 0.25])["w"], [3.0])  # weights need not sum to 1 or more
    with pytest.raises(ValueError):
        weighted_mean([a, b], [-1.0, 2.0])
