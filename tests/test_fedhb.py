"""FedHB (spec ``fedhb.md`` section 13): closed form, FedAvg/FedProx limits, proximal step, restart, behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.loop import NonFiniteLoss, Trainer
from client.methods.base import SiteJob
from client.methods.fedhb import FedHBObjective
from client.state import SiteState
from kumiki import contract as C
from kumiki.config import PrivacySection, TrainSection
from kumiki.data.sites import SiteData
from kumiki.data.sources import load_digits
from launch.engines.inprocess import run_inprocess
from kumiki.methods.fedhb import FedHBConfig
from kumiki.split import ParamSplit
from models import ModelSpec, build_model
from server.federation import build_strategy
from strategies.base import SiteProfile, Update
from strategies.fedhb import auto_psi0, niw_diag_update
from tests.conftest import make_config, personalized_means, untimed
from tests.replies import arrays_of

PREFIX = FedHBConfig.precision_prefix



# ----------------------------------------------------------------------------- server closed form
def test_server_update_equals_hand_computed_closed_form():
    """3 sites x 4 coordinates; lambda0 = 1, mu0 = 0, nu0 = 3, psi0 = 0.5, eps = 0.1 (spec 13.3)."""
    ms = [{"t": np.array([0.0, 1.0, 2.0, 3.0])}, {"t": np.array([2.0, 1.0, 2.0, 5.0])},
          {"t": np.array([4.0, 1.0, 2.0, 7.0])}]
    post = niw_diag_update(ms, lambda0=1.0, mu0=0.0, nu0=3.0, psi0=0.5, eps=0.1)
    # l = 1 + 3, nu = 3 + 3; m_k = (1*0 + sum_i m_ik) / 4; shrink = 1*3/(1+3) = 0.75; N eps^2 = 0.03
    # coordinate 0: sum 6, m_bar 2, dispersion 4+0+4 = 8, shrink term 0.75 * 2^2 = 3
    # coordinate 1: sum 3, m_bar 1, dispersion 0,       shrink term 0.75 * 1^2 = 0.75
    # coordinate 2: sum 6, m_bar 2, dispersion 0,       shrink term 0.75 * 2^2 = 3
    # coordinate 3: sum 15, m_bar 5, dispersion 4+0+4,  shrink term 0.75 * 5^2 = 18.75
    assert post.l == 4.0 and post.nu == 6.0
    assert np.allclose(post.m["t"], [1.5, 0.75, 1.5, 3.75])
    psi = [0.5 + 0.03 + 8 + 3, 0.5 + 0.03 + 0.75, 0.5 + 0.03 + 3, 0.5 + 0.03 + 8 + 18.75]
    assert np.allclose(post.psi["t"], psi)
    assert np.allclose(post.w["t"], [6 / p for p in psi])
    # lambda0 -> 0: the plain uniform mean, no shrinkage
    assert np.allclose(niw_diag_update(ms, 0.0, 0.0, 3.0, 0.5, 0.0).m["t"], [2.0, 1.0, 2.0, 5.0])


def _strategy_updates(strategy, values, sizes):
    ups = []
    for i, (fill, n) in enumerate(zip(values, sizes)):
        arrays = {k: fill(k, v) for k, v in strategy.shared.items()}
        ups.append(Update(SiteProfile(i, f"site-{i}", "train", "", n, 1), arrays, n, {}))
    return ups


def test_strategy_mean_is_uniform_precision_adaptive_and_floored(tmp_path):
    strategy = build_strategy(make_config(tmp_path, method="fedhb"))
    assert "encoder.net.2.running_mean" not in strategy.coords and "head.weight" in strategy.coords
    rng = np.random.default_rng(0)
    noise = {k: rng.normal(size=v.shape) for k, v in strategy.shared.items()}

    def site(i):  # site i: coordinate-wise spread 1, except head.bias, spread 10 (10x)
        return lambda k, v: (v + (10.0 if k == "head.bias" else 1.0) * (i - 1) * noise[k]).astype(v.dtype)

    a = strategy.aggregate_shared(_strategy_updates(strategy, [site(0), site(1), site(2)], [10, 10, 10]))
    b = strategy.aggregate_shared(_strategy_updates(strategy, [site(0), site(1), site(2)], [10, 500, 90]))
    for k in strategy.shared:
        assert np.allclose(a[k], b[k], atol=1e-6), f"{k}: m must not depend on n_i"
    w = strategy.precision
    assert np.median(w["head.bias"]) < 0.05 * np.median(w["head.weight"]), "10x dispersion -> ~100x smaller w"
    nu = strategy.method.nu0 + 3
    floor = nu / auto_psi0(nu, strategy.method.mu_max, np.mean([10, 500, 90]))
    assert all((v <= floor * (1 + 1e-6)).all() for v in w.values())
    assert set(strategy.extra_arrays(1, 1)) == {PREFIX + k for k in strategy.coords}


# ----------------------------------------------------------------------------- site step
def site_job(cfg: FedHBConfig, precision: float, lr: float = 0.05, n: int = 64) -> SiteJob:
    x, y = load_digits()
    spec = ModelSpec("mlp", (1, 8, 8), 10, hidden=64)
    model = build_model(spec, "plain")
    tcfg = TrainSection(batch_size=32, lr=lr, device="cpu")
    data = SiteData("site-0", "train", x[:n], y[:n], x[n:2 * n], y[n:2 * n], {})
    received = {k: v.clone() for k, v in model.state_dict().items()}
    extra = {PREFIX + k: torch.full_like(p, precision) for k, p in model.named_parameters()}
    return SiteJob(model, ParamSplit.build(model, cfg.split_rules()), Trainer(data.x_train, data.y_train, tcfg, seed="t"),
                   data, SiteState("fp"), C.Job(1, cfg, tcfg, spec, PrivacySection()), received, extra=extra)


def test_implicit_proximal_step_is_exact_and_stable_where_explicit_diverges():
    # lr * mu_k = 0.05 * (128 000 / 64) = 100
    sj = site_job(FedHBConfig(), precision=128_000.0)
    anchor = {k: v.clone() for k, v in sj.received.items()}
    steps = []
    obj = FedHBObjective(sj.job.method)
    fit = sj.trainer.fit

    def spy(model, params, loss_fn, **kw):
        hook = kw["after_step"]

        def wrapped(m):
            before = {k: p.detach().clone() for k, p in m.named_parameters()}
            hook(m)
            steps.append((before, {k: p.detach().clone() for k, p in m.named_parameters()}))

        kw["after_step"] = wrapped
        return fit(model, params, loss_fn, **kw)

    sj.trainer.fit = spy
    obj.fit(sj)
    a = 0.05 * 128_000.0 / 64
    for before, after in steps:
        for k in before:  # argmin_x (x - m_sgd)^2 / (2 lr) + (mu/2)(x - m_k)^2
            assert torch.allclose(after[k], (before[k] + a * anchor[k]) / (1 + a), atol=1e-6)
    assert all(torch.isfinite(p).all() for p in sj.model.parameters())
    with pytest.raises(NonFiniteLoss):
        explicit = site_job(FedHBConfig(prox_update="explicit"), precision=128_000.0)
        explicit.trainer.cfg = explicit.trainer.cfg.model_copy(update={"local_epochs": 10})
        FedHBObjective(explicit.job.method).fit(explicit)


def test_personalization_runs_on_a_private_copy_from_the_global_mean():
    sj = site_job(FedHBConfig(personalize_epochs=2), precision=10.0)
    before = {k: v.clone() for k, v in sj.model.state_dict().items()}
    tuned = FedHBObjective(sj.job.method).personalized_model(sj)
    assert tuned is not sj.model
    assert all(torch.equal(v, before[k]) for k, v in sj.model.state_dict().items())
    assert not torch.equal(tuned.head.weight, sj.model.head.weight)
    assert sj.state.extra == {}, "personalization never touches the site's training state"


# ----------------------------------------------------------------------------- limits (spec 13.1, 13.2)
def _final_global(tmp_path, method, knobs, name):
    # IID with 200 examples per site: equal n_i = 160 training examples
    cfg = make_config(tmp_path, method=method, name=name, rounds=3, sites=3, alpha=None, knobs=knobs,
                      data={"samples_per_site": 200}, train={"local_epochs": 2})  # FedHB's E, set for all
    run_inprocess(cfg, quiet=True)
    with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
        return {k: z[k] for k in z.files if k != "__round__" and not k.startswith(PREFIX)}


LIMIT = {"lambda0": 0.0, "eps": 0.0, "client_init": "global", "personalize_epochs": 0}


def test_reduces_to_fedavg_with_zero_precision(tmp_path):
    fedavg = _final_global(tmp_path, "fedavg", {}, "avg")
    fedhb = _final_global(tmp_path, "fedhb", {**LIMIT, "fixed_precision": 0.0}, "hb")
    assert fedavg.keys() == fedhb.keys()
    for k in fedavg:
        assert np.allclose(fedavg[k], fedhb[k], atol=1e-6, rtol=0), k
    with np.load(tmp_path / "runs" / "hb" / "checkpoints" / "global.npz") as z:  # L_0 = (m, w) is checkpointed
        assert {PREFIX + k for k in fedhb if k in dict(build_model(ModelSpec("mlp", (1, 8, 8), 10, 64), "plain").named_parameters())} <= set(z.files)
    default = _final_global(tmp_path, "fedhb", {}, "hb-default")  # the default is not FedAvg
    assert not np.allclose(fedavg["head.weight"], default["head.weight"], atol=1e-4)


def test_reduces_to_fedprox_with_matching_mu(tmp_path):
    n, mu = 160, 0.5
    fedprox = _final_global(tmp_path, "fedprox", {"mu": mu}, "prox")
    fedhb = _final_global(tmp_path, "fedhb", {**LIMIT, "fixed_precision": mu * n, "prox_update": "explicit"}, "hb")
    for k in fedprox:
        assert np.allclose(fedprox[k], fedhb[k], atol=1e-5, rtol=0), k
    wrong = _final_global(tmp_path, "fedprox", {"mu": mu * n}, "prox-wrong")  # the 1/n_i scaling matters
    assert not np.allclose(wrong["head.weight"], fedhb["head.weight"], atol=1e-3)


# ----------------------------------------------------------------------------- end to end
def test_messages_server_state_and_site_restart(tmp_path):
    cfg = make_config(tmp_path, method="fedhb", rounds=2, sites=3, unseen=1, knobs={"personalize_epochs": 1})
    grids = []
    run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    grid = grids[0]
    assert all(not r.has_error() for r in grid.replies)
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    replies = {m.metadata.dst_node_id: r for m, r in zip(grid.sent, grid.replies) if m in trains[-3:]}
    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"][-4:]
    h = cfg.method
    # the L_0 sent after round 2 is the closed form of the round-2 uploads
    ups = [arrays_of(r.content) for r in replies.values()]
    coords = [k for k in ups[0] if "running" not in k and "num_batches" not in k]
    n = [r.content[C.METRICS][C.NUM_EXAMPLES] for r in replies.values()]
    nu = h.nu0 + 3
    post = niw_diag_update([{k: u[k] for k in coords} for u in ups], h.lambda0, h.mu0, h.nu0,
                           auto_psi0(nu, h.mu_max, float(np.mean(n))), h.eps)
    sent = evals[0].content
    sent_arrays = arrays_of(sent)
    for k in coords:
        assert np.allclose(sent_arrays[k], post.m[k], atol=1e-6)
        assert np.allclose(sent[C.EXTRA][PREFIX + k].numpy(), post.w[k], rtol=1e-5)
    assert np.allclose(sent_arrays["encoder.net.2.running_mean"],
                       np.mean([u["encoder.net.2.running_mean"] for u in ups], axis=0), atol=1e-6)
    # the site's state file holds its uploaded m_i; replaying the last evaluation from disk is identical
    nid, reply = next(iter(replies.items()))
    site = grid.contexts[nid].node_config["site"]
    saved = torch.load(cfg.run_dir() / "state" / site / "site_state.pt", weights_only=True)
    assert saved["last_round"] == 2
    for k, v in saved["extra"]["m_i"].items():
        assert np.array_equal(v.numpy(), arrays_of(reply.content)[k])
    for msg, r in zip(evals, grid.replies[-4:]):
        again = grid.app(msg, grid.contexts[msg.metadata.dst_node_id]).content[C.METRICS]
        assert untimed(again) == untimed(r.content[C.METRICS])


def test_personal_bn_statistics_never_travel(tmp_path):
    cfg = make_config(tmp_path, method="fedhb", rounds=1, sites=2, knobs={"bn_stats": "personal", "personalize_epochs": 0})
    grids = []
    run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    for msg in list(grids[0].sent) + list(grids[0].replies):
        assert not msg.has_error()
        for key in msg.content.array_records:
            assert not [k for k in msg.content[key].keys() if "running" in k or "num_batches" in k]


def test_beats_fedavg_on_personalized_accuracy(tmp_path):
    """Digits, 6 sites, Dirichlet(0.3), MLP 64-128-64, 15 rounds, seed 0; personalization = 5 epochs of J_i.

    Measured last-round margins over FedAvg at seeds 0..3: 0.029, 0.095, 0.048, 0.037.
    """
    acc = personalized_means(tmp_path, ("fedavg", "fedhb"), rounds=15, sites=6, model={"hidden": 128})
    assert acc["fedhb"] >= acc["fedavg"] + 0.015, acc


def test_precision_is_re_estimated_every_round_and_used_by_the_sites(tmp_path):
    """The server re-estimates w from dispersion every round and sends it; the sites' update depends on it."""
    cfg = make_config(tmp_path, method="fedhb", name="hb", rounds=3, sites=3, unseen=1,
                      knobs={"personalize_epochs": 1}, eval={"unseen_adapt_epochs": 1})
    grids = []
    hb = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    trains = [m for m in grids[0].sent if m.metadata.message_type == "train"]
    w = {int(m.content[C.CONFIG][C.ROUND]): m.content[C.EXTRA] for m in trains}
    k = PREFIX + "head.weight"
    assert np.all(w[1][k].numpy() == 0.0), "round 1: init_precision 0"
    assert np.all(w[2][k].numpy() > 0.0) and not np.array_equal(w[2][k].numpy(), w[3][k].numpy())
    # the same run with the precision frozen at 0 (FedAvg-like pull) differs at the sites, not only at the server
    fixed = make_config(tmp_path, method="fedhb", name="hb0", rounds=3, sites=3, unseen=1,
                        knobs={"personalize_epochs": 1, "fixed_precision": 0.0}, eval={"unseen_adapt_epochs": 1})
    hb0 = run_inprocess(fixed, quiet=True)
    assert hb["personalized"]["per_site"] != hb0["personalized"]["per_site"]
    with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as a, np.load(fixed.run_dir() / "checkpoints" / "global.npz") as b:
        assert not np.allclose(a["head.weight"], b["head.weight"], atol=1e-5)


def test_site_update_follows_the_received_precision():
    """J_i with w > 0 stays closer to m than plain local SGD (w = 0), by the implicit step's amount."""
    free, pulled = site_job(FedHBConfig(), precision=0.0), site_job(FedHBConfig(), precision=1000.0)
    for sj in (free, pulled):
        FedHBObjective(sj.job.method).fit(sj)
    m = free.received

    def dist(sj):
        return sum(float((p.detach() - m[k]).pow(2).sum()) for k, p in sj.model.named_parameters())

    assert dist(pulled) < 0.5 * dist(free), (dist(pulled), dist(free))


def test_unseen_site_adapts_by_held_out_personalization_from_l0():
    sj = site_job(FedHBConfig(), precision=20.0)
    sj.role = "unseen"
    obj = FedHBObjective(sj.job.method)
    adapted = obj.adapt_unseen(sj, 2)
    again = obj.personalize(site_job(FedHBConfig(), precision=20.0), 2)  # the same J_i from the same L_0
    for (k, a), (_, b) in zip(adapted.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert not torch.equal(adapted.head.weight, sj.model.head.weight) and sj.state.extra == {}


def test_closed_form_shrinks_toward_a_nonzero_prior_mean():
    """lambda0 = 2, mu0 = 1: m = (2 * 1 + sum) / (2 + N); psi's shrink term uses (m_bar - mu0)."""
    ms = [{"t": np.array([3.0])}, {"t": np.array([5.0])}]
    post = niw_diag_update(ms, lambda0=2.0, mu0=1.0, nu0=1.0, psi0=0.5, eps=0.0)
    assert np.allclose(post.m["t"], (2 * 1 + 8) / 4)
    # dispersion (3-4)^2 + (5-4)^2 = 2; shrink 2*2/4 = 1 times (4 - 1)^2 = 9
    assert np.allclose(post.psi["t"], 0.5 + 2 + 9)


def test_fixed_psi0_caps_the_precision_and_precision_travels_as_float32(tmp_path):
    strategy = build_strategy(make_config(tmp_path, method="fedhb", knobs={"psi0": 2.0}))
    same = {k: v.copy() for k, v in strategy.shared.items()}
    strategy.aggregate_shared(_strategy_updates(strategy, [lambda k, v: same[k]] * 3, [10, 10, 10]))
    nu = strategy.method.nu0 + 3
    w = strategy.precision
    assert all(v.dtype == np.float32 for v in w.values())
    assert all(np.allclose(v, nu / (2.0 + 3 * strategy.method.eps ** 2), rtol=1e-5) for v in w.values()), \
        "identical sites: psi = psi0 (+ N eps^2), so w = nu / psi0 exactly"


def test_warm_client_init_starts_from_the_sites_last_m_i():
    cfg = FedHBConfig(client_init="warm")
    sj = site_job(cfg, precision=0.0)
    last = {k: torch.full_like(p, 0.25) for k, p in sj.model.named_parameters()}
    sj.state.extra["m_i"] = last
    starts = []
    fit = sj.trainer.fit

    def spy(model, params, loss_fn, **kw):
        starts.append({k: p.detach().clone() for k, p in model.named_parameters()})
        return fit(model, params, loss_fn, **kw)

    sj.trainer.fit = spy
    FedHBObjective(cfg).fit(sj)
    assert all(torch.equal(starts[0][k], v) for k, v in last.items())
    glob = site_job(FedHBConfig(), precision=0.0)  # global init ignores the stored m_i
    glob.state.extra["m_i"] = last
    glob.trainer.fit = lambda model, params, loss_fn, **kw: starts.append(
        {k: p.detach().clone() for k, p in model.named_parameters()}) or {"loss": 0.0, "examples": 0.0}
    FedHBObjective(FedHBConfig()).fit(glob)
    assert not torch.equal(starts[1]["head.weight"], last["head.weight"])


def test_prior_mean_init_is_the_seeded_initial_model(tmp_path):
    init = build_strategy(make_config(tmp_path, method="fedhb", knobs={"mu0": "init"}))
    zero = build_strategy(make_config(tmp_path, method="fedhb"))
    for k in init.coords:
        assert init.mu0[k].dtype == np.float64 and np.array_equal(init.mu0[k], init.shared[k].astype(np.float64))
        assert np.all(zero.mu0[k] == 0.0)
