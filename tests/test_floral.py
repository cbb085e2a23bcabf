"""FLoRAL (spec ``floral.md`` section 11): server weights, factor-wise averaging, router privacy,
bad router reports, the site loop (groups, preconditioning, noise), the synthetic linear task and
the label-shift behaviour. The model pieces (ranks, init, clamp, shapes) are in test_floral_models.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from client.loop import Trainer
from client.methods.base import SiteJob
from client.methods.floral import FloralObjective
from client.state import SiteState
from kumiki import contract as C
from kumiki.config import PrivacySection, TrainSection
from kumiki.data.sites import SiteData
from kumiki.data.sources import load_digits
from kumiki.methods.floral import FloralConfig
from kumiki.methods.local_adaptors import LocalAdaptorsConfig
from kumiki.split import ParamSplit
from launch.engines.inprocess import run_inprocess
from models import ModelSpec, build_model
from models.lora import FloralModel, precondition_
from server.federation import build_strategy
from strategies.base import SiteProfile, Update
from strategies.floral import cluster_weights, floral_mean
from strategies.replies import BadReply
from tests.conftest import make_config

N = (10, 20, 30)
PI = ((0.9, 0.1), (0.5, 0.5), (0.2, 0.8))


# ----------------------------------------------------------------------------- server
def test_cluster_weights_match_the_spec_hand_values():
    pk, pc, pkc = cluster_weights(list(N), [list(p) for p in PI])
    np.testing.assert_allclose(pk, [1 / 6, 1 / 3, 1 / 2])
    np.testing.assert_allclose(pc, [0.9 / 6 + 0.5 / 3 + 0.2 / 2, 0.1 / 6 + 0.5 / 3 + 0.8 / 2])
    np.testing.assert_allclose(pkc[:, 0], [0.36, 0.40, 0.24], atol=1e-12)
    np.testing.assert_allclose(pkc[:, 1], [0.02857142857, 0.28571428571, 0.68571428571], atol=1e-10)


def _strategy(tmp_path, **knobs):
    cfg = make_config(tmp_path, method="floral", sites=3, knobs={"num_adaptors": 2, **knobs})
    return build_strategy(cfg)


def _updates(strategy, pis=PI, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for i, (n, pi) in enumerate(zip(N, pis)):
        arrays = {k: (v + g.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
                  for k, v in strategy.shared.items()}
        metrics = {f"train-pi-{c}": p for c, p in enumerate(pi)}
        out.append(Update(SiteProfile(i + 1, f"site-{i}", "train", "", n, 5), arrays, n, metrics))
    return out


def test_base_uses_p_k_and_each_adaptor_factor_its_own_p_k_given_c_never_the_product(tmp_path):
    s = _strategy(tmp_path)
    ups = _updates(s)
    got = s.aggregate_shared(ups)
    pk, _, pkc = cluster_weights(list(N), [list(p) for p in PI])
    names = list(s.shared)
    base = [k for k in names if k.startswith("base.") and s.shared[k].dtype.kind == "f"]
    a0 = next(k for k in names if k.startswith("adaptors.0.") and k.endswith("A.weight"))
    b0 = a0.replace("A.weight", "B.weight")
    a1 = a0.replace("adaptors.0.", "adaptors.1.")
    assert base and s.cluster_of[a0] == 0 and s.cluster_of[a1] == 1 and not any(k.startswith("router") for k in names)
    for k in base:
        np.testing.assert_allclose(got[k], sum(w * u.arrays[k] for w, u in zip(pk, ups)), rtol=1e-5, atol=1e-6)
    for k, c in ((a0, 0), (b0, 0), (a1, 1)):
        np.testing.assert_allclose(got[k], sum(w * u.arrays[k] for w, u in zip(pkc[:, c], ups)), rtol=1e-5, atol=1e-6)
    # the factors are averaged separately: their product is not the mean of the sites' products
    mean_of_products = sum(w * (u.arrays[b0] @ u.arrays[a0]) for w, u in zip(pkc[:, 0], ups))
    assert not np.allclose(got[b0] @ got[a0], mean_of_products, atol=1e-3)


def test_an_adaptor_no_site_weighs_is_kept_unless_the_code_rule_is_asked_for(tmp_path):
    s = _strategy(tmp_path)
    pinned = [(1.0, 0.0)] * 3
    before = {k: v.copy() for k, v in s.shared.items()}
    got = s.aggregate_shared(_updates(s, pinned))
    a1 = [k for k in s.shared if k.startswith("adaptors.1.")]
    assert a1 and all(np.array_equal(got[k], before[k]) for k in a1)
    code = floral_mean([u.arrays for u in _updates(s, pinned)], list(N), [list(p) for p in pinned], s.cluster_of,
                       before, absent="code")
    assert all(np.array_equal(code[k], before[k]) for k in a1), "p(c) = 0: the code's 0/0 is not taken"


def test_the_code_rule_averages_a_barely_weighed_adaptor_with_weights_summing_to_one(tmp_path):
    """absent_cluster = "code" (issue 25): the official code's eps sits on sum n_k only and cancels, so an
    adaptor with 0 < p(c) < 1e-6 is the p(k|c)-weighted mean, not shrunk by an eps added to p(c)."""
    s = _strategy(tmp_path)
    tiny = [(1.0 - 1e-9, 1e-9), (1.0 - 3e-9, 3e-9), (1.0 - 2e-9, 2e-9)]
    before = {k: v.copy() for k, v in s.shared.items()}
    ups = _updates(s, tiny)
    a1 = [k for k in s.shared if k.startswith("adaptors.1.")]
    keep = floral_mean([u.arrays for u in ups], list(N), [list(p) for p in tiny], s.cluster_of, before)
    assert all(np.array_equal(keep[k], before[k]) for k in a1)
    code = floral_mean([u.arrays for u in ups], list(N), [list(p) for p in tiny], s.cluster_of, before, absent="code")
    _, _, pkc = cluster_weights(list(N), [list(p) for p in tiny])
    assert pkc[:, 1].sum() == pytest.approx(1.0)
    for k in a1:
        np.testing.assert_allclose(code[k], sum(w * u.arrays[k] for w, u in zip(pkc[:, 1], ups)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pi", [None, (0.7, 0.7), (float("nan"), 1.0), (1.5, -0.5)])
def test_a_reply_without_a_valid_router_report_is_rejected(tmp_path, pi):
    s = _strategy(tmp_path)
    [u] = _updates(s)[:1]
    u.metrics = {} if pi is None else {f"train-pi-{c}": p for c, p in enumerate(pi)}
    with pytest.raises(BadReply, match="router"):
        s.aggregate_shared([u])


def test_robust_coordinatewise_rules_are_refused_for_floral(tmp_path):
    from kumiki.config import ConfigError

    with pytest.raises(ConfigError, match="floral"):
        make_config(tmp_path, method="floral", server={"aggregation": "median", "discovery_timeout_s": 20.0})


# ----------------------------------------------------------------------------- site
def site_job(cfg, n: int = 96) -> SiteJob:
    x, y = load_digits()
    idx = np.random.default_rng(0).permutation(len(y))[: 2 * n]
    spec = ModelSpec("mlp", (1, 8, 8), 10, hidden=64)
    model = build_model(spec, cfg)
    split = ParamSplit.build(model, cfg.split_rules())
    tcfg = TrainSection(batch_size=32, lr=0.05, device="cpu")
    data = SiteData("s", "train", x[idx[:n]], y[idx[:n]], x[idx[n:]], y[idx[n:]], {})
    received = {k: v.clone() for k, v in model.state_dict().items() if k in split.shared}
    return SiteJob(model, split, Trainer(data.x_train, data.y_train, tcfg, seed="t"), data, SiteState("fp"),
                   C.Job(1, cfg, tcfg, spec, PrivacySection()), received)


def test_split_keeps_the_router_home_and_shares_base_and_adaptors():
    split = ParamSplit.build(build_model(ModelSpec("mlp", (1, 8, 8), 10), FloralConfig()), FloralConfig().split_rules())
    assert split.personal == ("router.theta",)
    assert all(k.startswith(("base.", "adaptors.")) for k in split.shared)
    local = LocalAdaptorsConfig()
    split = ParamSplit.build(build_model(ModelSpec("mlp", (1, 8, 8), 10), local), local.split_rules())
    assert "router.theta" in split.personal and all(k.startswith("base.") for k in split.shared)
    assert any(k.startswith("adaptors.0.") for k in split.personal)


def test_site_trains_three_groups_at_their_rates_preconditions_and_reports_the_clean_router(monkeypatch):
    cfg = FloralConfig(num_adaptors=2, router_lr=0.7, adaptor_lr=0.02)
    sj = site_job(cfg)
    seen = {}
    fit = sj.trainer.fit

    def spy(model, params, loss_fn, **kw):
        seen["groups"] = params
        seen["before_step"] = kw.get("before_step")
        return fit(model, params, loss_fn, **kw)

    sj.trainer.fit = spy
    theta0 = sj.model.router.theta.detach().clone()
    metrics = FloralObjective(cfg).fit(sj)
    base, adaptors, router = seen["groups"]
    assert (base["lr"], adaptors["lr"], router["lr"]) == (0.05, 0.02, 0.7)
    assert {id(p) for p in router["params"]} == {id(sj.model.router.theta)}
    assert {id(p) for p in adaptors["params"]} == {id(p) for p in sj.model.adaptor_parameters()}
    assert len(base["params"]) + len(adaptors["params"]) + 1 == len(list(sj.model.parameters()))
    assert seen["before_step"] is not None
    assert not torch.equal(sj.model.router.theta, theta0), "the router trains"
    clean = torch.softmax(sj.model.router.theta.detach().double(), 0).tolist()
    assert [metrics["pi-0"], metrics["pi-1"]] == pytest.approx(clean, abs=1e-12)
    assert FloralObjective(FloralConfig(precondition=False)).precondition(sj.model) is None


def test_the_router_never_decays_whatever_train_weight_decay_says():
    """Issue 25: the official code's router group has weight_decay 0; the base and adaptors keep the user's."""
    cfg = FloralConfig(num_adaptors=2)
    sj = site_job(cfg)
    sj.trainer.cfg = TrainSection(batch_size=32, lr=0.05, weight_decay=0.5, device="cpu")
    for router_only in (False, True):
        groups = FloralObjective(cfg).groups(sj, sj.model, router_only=router_only)
        opt = sj.trainer._make_optimizer(None)(groups)
        decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        assert decay.pop(id(sj.model.router.theta)) == 0.0
        assert set(decay.values()) <= {0.5} and (router_only or decay)


def test_local_adaptors_is_floral_at_one_percent():
    """Issue 25: the official local-adaptor baseline inherits FLoRAL's rank 0.01 (FLoRAL(1%))."""
    cfg = LocalAdaptorsConfig()
    assert cfg.rank_budget == 0.01 and FloralConfig().rank_budget == 0.1
    model = build_model(ModelSpec("mlp", (1, 28, 28), 10, hidden=200), cfg)
    first = next(iter(model.adaptors[0].values()))
    assert first.rank == 1  # 0.01 * 784 * 200 / 984 = 1.59 -> 1 (FLoRAL(10%): 15)


def test_global_path_is_the_uniform_mixture_and_personal_path_the_sites_router():
    cfg = FloralConfig(num_adaptors=2)
    sj = site_job(cfg)
    model = sj.model.eval()
    for ad in model.adaptors:  # make the adaptors matter
        for p in ad.parameters():
            p.data.normal_()
    model.router.theta.data = torch.tensor([3.0, -3.0])
    x = torch.from_numpy(sj.data.x_test[:8])
    obj = FloralObjective(cfg)
    uniform = model(x, pi=torch.tensor([0.5, 0.5]))
    assert torch.allclose(obj.predict_global(model, x), uniform)
    assert not torch.allclose(obj.predict_personal(model, x), uniform)


def test_new_site_trains_only_its_router_for_the_configured_steps():
    cfg = FloralConfig(num_adaptors=2, unseen_router_steps=4)
    sj = site_job(cfg)
    sj.role = "unseen"
    before = copy.deepcopy(sj.model.state_dict())
    adapted = FloralObjective(cfg).adapt_unseen(sj, 5)
    steps_before = sj.trainer.steps
    assert steps_before == 4
    after = adapted.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == {"router.theta"}, moved
    assert all(torch.equal(v, before[k]) for k, v in sj.model.state_dict().items())
    untouched = FloralObjective(FloralConfig(num_adaptors=2, unseen_router_steps=0)).adapt_unseen(sj, 5)
    assert torch.equal(untouched.router.theta, torch.zeros(2)) and sj.trainer.steps == 4


def test_preconditioning_changes_the_adaptor_step():
    """Without it the B = 0 adaptors move at the raw gradient's scale; with it, at the preconditioned one."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 4))
    m = FloralModel(base, 1, budget=2)
    m.adaptors[0]["0"].B.weight.data.normal_()
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    F.mse_loss(m(x), y).backward()
    raw = m.adaptors[0]["0"].A.weight.grad.clone()
    precondition_(m, 1e-5)
    B = m.adaptors[0]["0"].B.weight.detach()
    expected = torch.linalg.solve(B.T @ B + 1e-5 * torch.eye(2), raw)
    assert torch.allclose(m.adaptors[0]["0"].A.weight.grad, expected, atol=1e-5)


# ----------------------------------------------------------------------------- behaviour
def _synthetic(seed: int = 0, k: int = 10, c: int = 2, d: int = 10, out: int = 3, n: int = 64):
    """The spec's synthetic_linear task: y = (W + 2 u_c v_c^T) x, cluster = client id mod C."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d, generator=g) / d ** 0.5
    offsets = [2 * torch.outer(torch.randn(out, generator=g) / d ** 0.5, torch.randn(d, generator=g)) for _ in range(c)]
    data = []
    for i in range(k):
        x = torch.randn(n, d, generator=g)
        data.append((x, x @ (w + offsets[i % c]).T))
    return data


def _federate(data, make, groups, rounds: int, precond: bool, c: int):
    """Full-participation rounds of the FLoRAL server rule over local SGD on MSE (spec section 11.12)."""
    torch.manual_seed(0)
    glob = make()
    routers = [torch.zeros(c) for _ in data]
    for _ in range(rounds):
        states, pis = [], []
        for i, (x, y) in enumerate(data):
            m = copy.deepcopy(glob)
            if hasattr(m, "router"):
                m.router.theta.data = routers[i].clone()
            opt = torch.optim.SGD(groups(m), lr=0.1)
            for j in range(0, len(x), 8):
                opt.zero_grad()
                F.mse_loss(m(x[j:j + 8]), y[j:j + 8]).backward()
                if precond:
                    precondition_(m, 1e-5)
                opt.step()
            if hasattr(m, "router"):
                routers[i] = m.router.theta.detach().clone()
                pis.append(torch.softmax(routers[i].double(), 0).tolist())
            else:
                pis.append([1.0])
            states.append({k: v.detach().numpy().copy() for k, v in m.state_dict().items() if not k.startswith("router")})
        cluster_of = {k: int(k.split(".")[1]) for k in states[0] if k.startswith("adaptors.")}
        prev = {k: v.detach().numpy() for k, v in glob.state_dict().items() if not k.startswith("router")}
        new = floral_mean(states, [len(x) for x, _ in data], pis, cluster_of, prev)
        glob.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()}, strict=False)
    mse = []
    for i, (x, y) in enumerate(data):
        m = copy.deepcopy(glob).eval()
        if hasattr(m, "router"):
            m.router.theta.data = routers[i]
        with torch.no_grad():
            mse.append(float(F.mse_loss(m(x), y)))
    return float(np.mean(mse))


def test_synthetic_linear_task_floral_mse_is_a_tenth_of_fedavgs():
    data = _synthetic()
    fedavg = _federate(data, lambda: nn.Sequential(nn.Linear(10, 3)), lambda m: m.parameters(), 60, False, 1)

    def make():
        return FloralModel(nn.Sequential(nn.Linear(10, 3)), 2, budget=0.01)

    def groups(m):
        return [{"params": m.base_parameters()}, {"params": m.adaptor_parameters()},
                {"params": m.router_parameters(), "lr": 0.3}]

    floral = _federate(data, make, groups, 60, True, 2)
    assert floral < 0.1 * fedavg, (floral, fedavg)


def test_floral_beats_fedavg_by_a_wide_margin_on_two_label_shift_clusters(tmp_path):
    """Digits, 2 label-shift clusters (y -> y + c mod 10), 6 sites, the default CNN, 15 rounds, seed 0."""
    acc = {}
    for method in ("fedavg", "floral"):
        cfg = make_config(tmp_path / method, method=method, rounds=15, sites=6, arch="cnn", alpha=None,
                          knobs={"num_adaptors": 2} if method == "floral" else None,
                          model={"arch": "cnn", "hidden": 128},
                          data={"partition": {"kind": "clusters", "clusters": 2, "cluster_transform": "label_shift"}})
        acc[method] = run_inprocess(cfg, quiet=True)["personalized"]["mean"]
    assert acc["floral"] > acc["fedavg"] + 0.15, acc
