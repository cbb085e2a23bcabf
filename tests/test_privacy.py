"""Privacy (issue 11): DP-SGD in the one loop for every method, a ledger that never resets,
a hard budget stop, and the refusals for what per-example DP cannot train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from client.loop import Trainer
from client.privacy import DPContext, Ledger
from kumiki.accounting import epsilon, solve_noise
from kumiki.config import ConfigError, TrainSection
from kumiki.registry import METHODS
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config, language_method, make_lm_config

GN = {"arch": "mlp", "norm": "group", "hidden": 64}
#: methods whose DP run needs method knobs: DualFed trains privately without SupCon and with a fixed projector
KNOBS = {"dualfed": {"con_lambda": 0.0}}


def dp_config(tmp_path, method="fedavg", name="t", rounds=2, **privacy):
    fix = {"fix_model": True} if method == "dualfed" else {}
    if language_method(method):  # the byte-level LM on the Markov tree (LayerNorm: DP-SGD trains it as is)
        return make_lm_config(tmp_path, method=method, name=name, rounds=rounds, sites=2,
                              privacy={"enabled": True, "target_epsilon": 4.0, **privacy})
    return make_config(tmp_path, method=method, name=name, rounds=rounds, sites=2, model=GN, knobs=KNOBS.get(method),
                       privacy={"enabled": True, "target_epsilon": 4.0, **fix, **privacy})


# ----------------------------------------------------------------------------- config
def test_batchnorm_models_are_refused_with_the_keys_that_fix_them(tmp_path):
    with pytest.raises(ConfigError, match=r'model.norm = \\?"group\\?".*privacy.fix_model = true'):
        make_config(tmp_path, privacy={"enabled": True})  # the default model has BatchNorm
    assert dp_config(tmp_path).privacy.enabled


def test_fix_model_replaces_batchnorm_on_both_sides_so_dp_trains_the_default_model(tmp_path):
    from models import build_model
    from server.federation import model_spec

    cfg = make_config(tmp_path, rounds=1, sites=2, model={"arch": "cnn"},
                      privacy={"enabled": True, "fix_model": True, "noise_multiplier": 1.0})
    spec = model_spec(cfg)
    assert spec.dp_fix and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in build_model(spec).modules())
    assert any(isinstance(m, nn.GroupNorm) for m in build_model(spec).modules())
    s = run_inprocess(cfg, quiet=True)
    assert s["status"] == "ok" and all(e > 0 for e in s["privacy"]["epsilon_per_site"].values())


@pytest.mark.parametrize("knobs, privacy, needle", [
    ({}, {"fix_model": True}, "method.con_lambda = 0"),  # SupCon couples a batch's examples
    ({"con_lambda": 0.0}, {}, "privacy.fix_model = true"),  # the projector's BatchNorm
])
def test_dualfed_under_dp_needs_its_two_fixes_named(tmp_path, knobs, privacy, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(tmp_path, method="dualfed", model=GN, knobs=knobs, privacy={"enabled": True, **privacy})


# ----------------------------------------------------------------------------- the loop
def _toy(dp: DPContext | None, scale: float = 100.0):
    torch.manual_seed(0)
    x = (np.random.default_rng(0).normal(size=(64, 1, 2, 2)) * scale).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 64).astype(np.int64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    trainer = Trainer(x, y, TrainSection(batch_size=64, lr=1.0, device="cpu"), seed="toy", dp=dp)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, model.parameters(), epochs=1)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    return step, trainer


def test_clipping_bounds_the_update_and_noise_changes_it():
    # q = 1 (batch = N): one Poisson batch of every example; lr 1, so the step is the privatized mean gradient
    clear, _ = _toy(None)
    assert clear.norm() > 10, "the toy's raw gradient is large"
    quiet, trainer = _toy(DPContext(1e-6, max_grad_norm=1.0, sample_rate=1.0, expected_batch_size=64, seed=0))
    assert quiet.norm() <= 1.0 + 1e-4, "the mean of per-example gradients clipped to C has norm <= C"
    assert trainer.dp.steps == 1
    noisy, _ = _toy(DPContext(1.0, max_grad_norm=1.0, sample_rate=1.0, expected_batch_size=64, seed=0))
    # noise std per coordinate: sigma * C / expected batch size
    assert (noisy - quiet).std() == pytest.approx(1.0 / 64, rel=0.6)
    again, _ = _toy(DPContext(1.0, max_grad_norm=1.0, sample_rate=1.0, expected_batch_size=64, seed=0))
    assert not torch.equal(noisy, again), "secret: the same site, round and stage never draw the same noise"
    seeded = [_toy(DPContext(1.0, max_grad_norm=1.0, sample_rate=1.0, expected_batch_size=64, seed=0,
                             reproducible=True))[0] for _ in range(2)]
    assert torch.equal(*seeded), "privacy.reproducible_noise: seeded, the same draws (research only)"


def test_poisson_batches_have_the_sample_rate_on_average():
    dp = DPContext(1.0, 1.0, sample_rate=0.25, expected_batch_size=16, seed=0)
    t = Trainer(np.zeros((64, 1, 2, 2), np.float32), np.zeros(64, np.int64), TrainSection(batch_size=16, device="cpu"),
                seed="p", dp=dp)
    sizes = [len(y) for e in range(50) for _, y in t.poisson_batches(f"e{e}")]
    assert len(sizes) == 50 * 4 and np.mean(sizes) == pytest.approx(16, rel=0.1) and len(set(sizes)) > 3


# ----------------------------------------------------------------------------- the ledger
def test_ledger_is_monotonic_and_solve_noise_meets_the_target(tmp_path):
    sigma = solve_noise(4.0, 1e-5, 0.1, 100, "rdp")
    assert epsilon("rdp", [(sigma, 0.1, 100)], 1e-5) == pytest.approx(4.0, abs=0.05)
    ledger = Ledger.open(tmp_path, "abc")
    eps = []
    for _ in range(3):
        ledger.add(sigma, 0.1, 30)
        ledger.save()
        ledger = Ledger.open(tmp_path, "abc")  # a restart reads it back
        eps.append(epsilon("rdp", ledger.history, 1e-5))
    assert eps[0] < eps[1] < eps[2] and ledger.history == [(sigma, 0.1, 90)]
    (tmp_path / "privacy-abc.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="reset the site's privacy budget"):
        Ledger.open(tmp_path, "abc")


def test_epsilon_grows_every_round_and_across_runs_then_sites_stop_and_the_run_ends_cleanly(tmp_path):
    first = run_inprocess(dp_config(tmp_path, name="a", rounds=3), quiet=True)
    rounds = [json.loads(line) for line in open(tmp_path / "runs" / "a" / "metrics.jsonl")]
    per_round = [r["epsilon"] for r in rounds if r.get("kind") == "round"]
    for site in ("site-0", "site-1"):
        series = [r[site] for r in per_round]
        assert all(a < b for a, b in zip(series, series[1:])), series
    assert first["status"] == "ok" and max(first["privacy"]["epsilon_per_site"].values()) <= 4.0
    from server.report import render_report

    assert "privacy spent per round" in render_report(tmp_path / "runs" / "a").read_text()
    # a new run over the same records: the ledger goes on; nobody can afford a round, the run ends after one
    second = run_inprocess(dp_config(tmp_path, name="b", rounds=3), quiet=True)
    assert second["status"] == "ok" and second["rounds"] == 1 and "privacy budget" in second["ended"]
    assert second["privacy"]["stopped_at_round"] == {"site-0": 1, "site-1": 1}
    for site, e in second["privacy"]["epsilon_per_site"].items():
        assert e >= first["privacy"]["epsilon_per_site"][site], "epsilon never decreases"
    assert second["personalized"]["mean"] is not None, "sites out of budget still evaluate"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_dp_trains_every_supported_method_without_a_special_case(tmp_path, method):
    s = run_inprocess(dp_config(tmp_path, method=method, rounds=1, noise_multiplier=1.0, target_epsilon=20.0), quiet=True)
    assert s["status"] == "ok", s.get("participation")
    eps = s["privacy"]["epsilon_per_site"]
    assert set(eps) == {"site-0", "site-1"} and all(0 < e <= 20.0 for e in eps.values())


def test_dp_plans_each_methods_passes_per_round(tmp_path):
    """Ditto (two tracks) and FedRep (head then body) train every planned round within the solved budget."""
    for method in ("ditto", "fedrep"):
        s = run_inprocess(dp_config(tmp_path / method, method=method, rounds=2), quiet=True)
        assert s["rounds"] == 2 and not s["privacy"]["stopped_at_round"], s["privacy"]
        assert all(3.5 < e <= 4.0 for e in s["privacy"]["epsilon_per_site"].values()), s["privacy"]


def test_a_round_that_would_overrun_the_budget_is_withheld_so_epsilon_never_exceeds_it(tmp_path, monkeypatch):
    """A method that makes more passes than it declares (here Ditto claiming one): the round is withheld."""
    from kumiki.methods.ditto import DittoConfig

    monkeypatch.setattr(DittoConfig, "epochs_per_round", lambda self, train: train.local_epochs)
    s = run_inprocess(dp_config(tmp_path, method="ditto", rounds=1), quiet=True)
    assert s["status"] == "ok" and s["privacy"]["stopped_at_round"] == {"site-0": 1, "site-1": 1}, s["privacy"]
    assert s["privacy"]["epsilon_per_site"] == {"site-0": 0.0, "site-1": 0.0}, "nothing was released"
    # over more rounds the projection learns the method's pace: it trains while the budget lasts, never past it
    s = run_inprocess(dp_config(tmp_path / "more", method="ditto", rounds=4), quiet=True)
    assert s["rounds"] < 4 and s["privacy"]["stopped_at_round"]
    assert all(0 < e <= 4.0 for e in s["privacy"]["epsilon_per_site"].values())


def test_scope_shared_trains_only_travelling_tensors_privately(tmp_path):
    from client.privacy import start
    from tests.test_site_objectives import site_job
    from kumiki.methods.fedper import FedPerConfig
    from kumiki.config import PrivacySection
    from dataclasses import replace

    sj = site_job(FedPerConfig(), norm="group")
    sj.job = replace(sj.job, privacy=PrivacySection(enabled=True, scope="shared", noise_multiplier=1.0), rounds=2)
    _, dp = start(sj, tmp_path, "s")
    shared = {id(p) for n, p in sj.model.named_parameters() if n.startswith("encoder.")}
    assert dp.private == shared and dp.noise_multiplier == 1.0
    sj.job = replace(sj.job, privacy=PrivacySection(enabled=True, noise_multiplier=1.0), rounds=2)
    assert start(sj, tmp_path, "s")[1].private is None, "scope all: every trained parameter"


# ----------------------------------------------------------------------------- central DP
def test_central_dp_mean_clips_each_site_then_noises_the_uniform_mean():
    from strategies.aggregate import central_dp_mean

    ref = {"w": np.zeros(4, np.float32), "n": np.array(3)}
    far = {"w": np.array([30.0, 40.0, 0, 0], np.float32), "n": np.array(5)}  # change norm 50 -> clipped to 1
    near = {"w": np.array([0, 0, 0.3, 0.4], np.float32), "n": np.array(5)}  # norm 0.5, kept
    got = central_dp_mean([far, near], ref, clip=1.0, noise_multiplier=1e-9, rng=np.random.default_rng(0))
    np.testing.assert_allclose(got["w"], [0.3, 0.4, 0.15, 0.2], atol=1e-6)
    assert got["n"] == 5
    big = {"w": np.zeros(20000, np.float32)}
    noisy = central_dp_mean([big, big], big, clip=2.0, noise_multiplier=1.5, rng=np.random.default_rng(0))
    assert noisy["w"].std() == pytest.approx(1.5 * 2.0 / 2, rel=0.05)


def test_central_dp_bounds_a_hostile_site_and_reports_its_epsilon_then_stops_at_the_budget(tmp_path):
    from tests.replies import on_arrays, rewrite_replies

    def scale(arrays):
        return {k: v * 1000 if v.dtype.kind == "f" else v for k, v in arrays.items()}

    cfg = make_config(tmp_path, rounds=4, sites=3, model=GN,
                      privacy={"central": True, "central_clip": 0.5, "central_noise_multiplier": 2.0,
                               "target_epsilon": 4.5})  # z = 2: epsilon 3.19 after 2 releases, 4.01 after 3, 4.73 after 4
    s = run_inprocess(cfg, quiet=True, grid_hook=rewrite_replies("train", on_arrays(scale)))
    c = s["privacy"]["central"]
    assert c["unit"].startswith("one site") and c["epsilon"] == pytest.approx(4.011, abs=0.01)
    assert s["rounds"] == c["releases"] < 4 and "central privacy budget" in s["ended"], s
    rows = [json.loads(line) for line in open(cfg.run_dir() / "metrics.jsonl")]
    series = [r["central_epsilon"] for r in rows if r.get("kind") == "round"]
    assert all(a < b for a, b in zip(series, series[1:]))
    ck = np.load(cfg.run_dir() / "checkpoints" / "global.npz")
    assert all(np.isfinite(ck[k]).all() and np.abs(ck[k]).max() < 50 for k in ck.files if k != "__round__")


@pytest.mark.parametrize("method, server", [("fedhb", {}), ("floral", {}), ("local", {}),
                                            ("fedavg", {"aggregation": "median"})])
def test_central_dp_is_refused_where_it_cannot_protect_the_update(tmp_path, method, server):
    with pytest.raises(ConfigError, match="privacy.central"):
        make_config(tmp_path, method=method, privacy={"central": True},
                    server={"discovery_timeout_s": 20.0, **server})


def test_floral_router_per_example_gradient_equals_each_examples_own_gradient():
    """The grad sampler Opacus uses for the router (J^T g_b) against autograd on one example at a time."""
    from opacus import GradSampleModule
    from torch.nn import functional as F

    from client.privacy import register_grad_samplers
    from models import ModelSpec, build_model
    from kumiki.methods.floral import FloralConfig

    register_grad_samplers()
    # router_noise 0: a training-mode forward of one example draws the same pi as the batch's
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10, hidden=32, norm="group"),
                        FloralConfig(num_adaptors=3, router_noise=0.0))
    for p in model.adaptors.parameters():
        p.data.normal_(0, 0.5)  # B = 0 at init would leave the router without gradient
    model.router.theta.data = torch.tensor([0.3, -0.2, 0.5])
    model.train()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    expected = []
    for b in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[b:b + 1]), y[b:b + 1]).backward()
        expected.append(model.router.theta.grad.clone())
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(model(x), y, reduction="sum").backward()
    torch.testing.assert_close(model.router.theta.grad_sample, torch.stack(expected), rtol=1e-4, atol=1e-6)
    gsm._close()


@pytest.mark.parametrize("method", ["fedavg", "floral"])
def test_dp_round_with_negligible_noise_and_no_clipping_equals_the_clear_round(method):
    """The DP path (per-example gradients, Opacus' optimizer, FLoRAL's router sampler and preconditioning)
    computes the same step as the clear loop when noise and clipping do nothing (one batch, q = 1)."""
    import copy

    from client.methods.base import SiteObjective
    from client.methods.floral import FloralObjective
    from kumiki.methods.fedavg import FedAvgConfig
    from kumiki.methods.floral import FloralConfig
    from models import ModelSpec, build_model
    from tests.test_floral import site_job

    cfg = FloralConfig(num_adaptors=2, router_noise=0.0, dp_precondition=True) if method == "floral" else FedAvgConfig()
    objective = FloralObjective if method == "floral" else SiteObjective
    sj = site_job(cfg, n=96)
    sj.model = build_model(ModelSpec("mlp", (1, 8, 8), 10, hidden=64, norm="group"), cfg)
    sj.trainer.cfg = sj.trainer.cfg.model_copy(update={"batch_size": 96})
    start = copy.deepcopy(sj.model)
    objective(cfg).fit(sj)
    clear = {k: v.clone() for k, v in sj.model.state_dict().items()}
    sj.model = start
    sj.trainer.dp = DPContext(1e-12, max_grad_norm=1e3, sample_rate=1.0, expected_batch_size=96, seed=0)
    objective(cfg).fit(sj)
    for k, v in sj.model.state_dict().items():
        torch.testing.assert_close(v, clear[k], rtol=0, atol=1e-5, msg=k)


def test_floral_under_dp_does_not_precondition_the_noise_unless_asked():
    """Issue 25: Opacus noises the gradient before FLoRAL's preconditioner runs, and with B = 0 (its init)
    (B^T B + eps I)^-1 multiplies the noise on A by 1/eps = 1e5. By default DP-SGD rounds skip the
    preconditioner, so A moves by about lr x noise; ``dp_precondition = true`` restores the amplification."""
    from client.methods.floral import FloralObjective
    from kumiki.methods.floral import FloralConfig
    from models import ModelSpec, build_model
    from tests.test_floral import site_job

    def max_a_change(**knobs) -> float:
        cfg = FloralConfig(num_adaptors=2, **knobs)
        sj = site_job(cfg, n=64)
        sj.model = build_model(ModelSpec("mlp", (1, 8, 8), 10, hidden=32, norm="group"), cfg)
        before = {k: v.clone() for k, v in sj.model.state_dict().items() if k.endswith("A.weight")}
        sj.trainer.dp = DPContext(1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=32, seed=0)
        FloralObjective(cfg).fit(sj)
        after = sj.model.state_dict()
        return max(float((after[k] - v).abs().max()) for k, v in before.items())

    assert max_a_change() < 0.1  # lr 0.05 x a few steps of N(0, 1/32) noise
    assert max_a_change(dp_precondition=True) > 10.0
