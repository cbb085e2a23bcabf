"""DualFed (spec ``dualfed.md`` section 11): split, stages, SupCon, messages, restart, behaviour."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from client.loop import Trainer
from client.methods.base import SiteJob
from client.methods.dualfed import DualFedObjective, supcon_loss
from client.state import SiteState
from kumiki import contract as C
from kumiki.config import PrivacySection, TrainSection
from kumiki.data.sites import SiteData
from kumiki.data.sources import load_digits
from launch.engines.inprocess import run_inprocess
from kumiki.methods.dualfed import DualFedConfig
from kumiki.split import ParamSplit
from models import ModelSpec, build_model
from server.federation import build_strategy
from strategies.base import SiteProfile, Update
from tests.conftest import make_config, personalized_means, untimed
from tests.replies import names_of



def site_job(cfg: DualFedConfig, n: int = 96, **train) -> SiteJob:
    x, y = load_digits()
    idx = np.random.default_rng(0).permutation(len(y))[: 2 * n]
    spec = ModelSpec("mlp", (1, 8, 8), 10, hidden=128)
    model = build_model(spec, cfg.variant)
    split = ParamSplit.build(model, cfg.split_rules())
    tcfg = TrainSection(**{"batch_size": 32, "lr": 0.05, "device": "cpu", **train})
    data = SiteData("site-0", "train", x[idx[:n]], y[idx[:n]], x[idx[n:]], y[idx[n:]], {})
    received = {k: v.clone() for k, v in model.state_dict().items() if k in split.shared}
    return SiteJob(model, split, Trainer(data.x_train, data.y_train, tcfg, seed="t"), data, SiteState("fp"),
                   C.Job(1, cfg, tcfg, spec, PrivacySection()), received)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def record_stages(sj: SiteJob) -> list[tuple[dict, dict, dict]]:
    """Wrap Trainer.fit: (before, after, grads) of the whole site model per stage."""
    stages, fit = [], sj.trainer.fit

    def recording(model, params, *a, **kw):
        before = snapshot(sj.model)
        out = fit(model, params, *a, **kw)
        grads = {n: p.grad for n, p in sj.model.named_parameters()}
        stages.append((before, snapshot(sj.model), grads))
        return out

    sj.trainer.fit = recording
    return stages


def changed(before, after, prefix):
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


# ----------------------------------------------------------------------------- split and model
def test_split_matches_spec_table():
    cfg = DualFedConfig()
    model = build_model(ModelSpec("cnn", (1, 28, 28), 10), cfg.variant)
    split = ParamSplit.build(model, cfg.split_rules())
    params = dict(model.named_parameters())
    assert set(split.shared) == {k for k in params if k.startswith(("encoder.", "shared_head."))}
    assert any(k.startswith("encoder.features.1.") for k in split.shared), "encoder BN affine is shared"
    for k in split.personal:
        assert k.startswith(("projector.", "personal_head.")) or k.endswith(
            ("running_mean", "running_var", "num_batches_tracked"))
    assert {k for k in model.state_dict() if "running" in k} <= set(split.personal)
    # spec section 3: CNN-S encoder 420,544; projector 16,960; heads 1,290 each
    count = lambda p: sum(v.numel() for k, v in params.items() if k.startswith(p))  # noqa: E731
    assert (count("encoder."), count("projector."), count("shared_head."), count("personal_head.")) == (
        420_544, 16_960, 1_290, 1_290)


def test_ensemble_logits_are_the_sum_of_both_heads():
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10, hidden=128), "dual").eval()
    x = torch.from_numpy(load_digits()[0][:16])
    obj = DualFedObjective(DualFedConfig())
    with torch.no_grad():
        z = model.encoder(x)
        expected = model.shared_head(z) + model.personal_head(model.projector(z))
        assert torch.allclose(obj.predict_personal(model, x), expected)
        assert torch.equal(obj.predict_global(model, x), model.shared_head(z))


# ----------------------------------------------------------------------------- stages
def test_stage_a_freezes_shared_head_and_stage_b_freezes_everything_but_it():
    sj = site_job(DualFedConfig())
    stages = record_stages(sj)
    DualFedObjective(sj.job.method).fit(sj)
    assert len(stages) == 2
    (a0, a1, a_grads), (b0, b1, _) = stages
    # stage A: omega bit-identical and outside the graph; theta, phi, psi move
    assert not changed(a0, a1, "shared_head.")
    assert a_grads["shared_head.weight"] is None and a_grads["shared_head.bias"] is None
    for part in ("encoder.", "projector.", "personal_head."):
        assert changed(a0, a1, part), f"stage A did not train {part}"
    # stage B: only omega moves; every encoder parameter, the projector and personal head bit-identical
    params = {n for n, _ in sj.model.named_parameters()}
    assert not {k for k in changed(b0, b1, "encoder.") if k in params}
    assert not changed(b0, b1, "projector.") and not changed(b0, b1, "personal_head.")
    assert changed(b0, b1, "shared_head.") == {"shared_head.weight", "shared_head.bias"}
    assert {k for k in changed(b0, b1, "encoder.") if "running" in k}, "train-mode BN stats update in stage B"


def test_stage_b_in_eval_bn_mode_leaves_every_encoder_tensor_bit_identical():
    sj = site_job(DualFedConfig(stage_b_bn_mode="eval"))
    stages = record_stages(sj)
    DualFedObjective(sj.job.method).fit(sj)
    b0, b1, _ = stages[1]
    assert not changed(b0, b1, "encoder.") and not changed(b0, b1, "projector.")
    assert changed(b0, b1, "shared_head.")


@pytest.mark.parametrize("con_lambda", [0.0, 10.0, "auto-group"])
def test_stage_a_encoder_gradient_comes_from_the_personal_branch_only(con_lambda):
    """Spec 11.4: the encoder's stage-A gradient equals that of CE(h_psi(g_phi(f_theta(x)))) + lambda * SupCon,
    computed independently on a copy; the shared head is not in the graph even where it could take a gradient.
    ``auto`` on a group-norm encoder means lambda = 1 (the job's model decides, not a default)."""
    cfg = DualFedConfig(con_lambda="auto" if con_lambda == "auto-group" else con_lambda)
    sj = site_job(cfg)
    if con_lambda == "auto-group":
        sj.job = dataclasses.replace(sj.job, model=dataclasses.replace(sj.job.model, norm="group"))
        con_lambda = 1.0
    model = sj.model.train()
    ref = copy.deepcopy(model)
    x, y = torch.from_numpy(sj.data.x_train[:32]), torch.from_numpy(sj.data.y_train[:32])
    DualFedObjective(cfg).stage_a_loss(sj)(model, x, y).backward()
    z_tilde = ref.projector(ref.encoder(x))
    (F.cross_entropy(ref.personal_head(z_tilde), y) + con_lambda * supcon_loss(z_tilde, y, cfg.con_temp)).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if name.startswith("shared_head."):
            assert p.grad is None, "the shared head's loss must not reach stage A"
        else:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), name
    if con_lambda:  # SupCon is part of stage A: dropping it changes the encoder's gradient
        plain = copy.deepcopy(ref)
        plain.zero_grad()
        F.cross_entropy(plain.personal_head(plain.projector(plain.encoder(x))), y).backward()
        enc = [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
        grads = dict(model.named_parameters())
        assert any(not torch.allclose(grads[n].grad, dict(plain.named_parameters())[n].grad, atol=1e-4) for n in enc)


def test_new_client_trains_fresh_personal_parts_on_the_frozen_shared_path():
    """Spec section 8, new-client personalization: theta and omega frozen (BN statistics re-estimated on the
    site, then fixed), a fresh seeded projector and personal head trained with the stage-A loss."""
    cfg = DualFedConfig()
    sj = site_job(cfg)
    sj.role = "unseen"
    stale = {k: v.clone() for k, v in sj.model.state_dict().items()}
    for name in ("projector.0.weight", "personal_head.weight"):  # stale personal parts must not be reused
        sj.model.state_dict()[name].add_(1.0)
    before = snapshot(sj.model)
    reestimated = DualFedObjective(cfg).global_model(sj).state_dict()
    losses = []
    fit = sj.trainer.fit

    def spy(model, params, loss_fn, **kw):
        losses.append(loss_fn)
        return fit(model, params, loss_fn, **kw)

    sj.trainer.fit = spy
    adapted = DualFedObjective(cfg).adapt_unseen(sj, epochs=3)
    assert adapted is not sj.model and all(torch.equal(v, before[k]) for k, v in sj.model.state_dict().items())
    after = adapted.state_dict()
    for k, v in after.items():
        if k.startswith(("encoder.", "shared_head.")):
            assert torch.equal(v, reestimated[k]), f"{k} must stay frozen (statistics: re-estimated, then fixed)"
    fresh = build_model(sj.job.model, cfg.variant).state_dict()
    assert not torch.equal(after["personal_head.weight"], fresh["personal_head.weight"]), "the head trained"
    assert not torch.equal(after["personal_head.weight"], before["personal_head.weight"])
    assert torch.equal(stale["personal_head.weight"], fresh["personal_head.weight"])  # site_job starts fresh
    assert len(losses) == 1 and "stage_a_loss" in losses[0].__qualname__


def test_fresh_optimizer_per_stage_with_momentum(monkeypatch):
    made = []
    real = torch.optim.SGD

    def spy(params, **kw):
        opt = real(params, **kw)
        made.append((opt, [len(opt.state)]))
        return opt

    monkeypatch.setattr(torch.optim, "SGD", spy)
    sj = site_job(DualFedConfig(), momentum=0.5)
    DualFedObjective(sj.job.method).fit(sj)
    assert len(made) == 2 and made[0][0] is not made[1][0]
    assert all(state_len == [0] for _, state_len in made), "momentum buffers start empty in each stage"


# ----------------------------------------------------------------------------- SupCon
def test_supcon_matches_hand_computed_values():
    # unit vectors at 0, 90, 180, 270 degrees (scaled: the loss normalizes), tau = 1
    f = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -5.0]])
    lse = math.log(2 + math.exp(-1))  # every anchor's denominator: two dots of 0, one of -1
    # labels 0,0,1,1: each anchor has one positive at dot 0 -> -log(e^0 / (2 + e^-1)) each
    got = supcon_loss(f, torch.tensor([0, 0, 1, 1]), tau=1.0)
    assert got.item() == pytest.approx(lse / (1 + 1e-6), rel=1e-6)
    # labels 0,0,0,1: anchor 3 has no positive (contributes 0, still counted in |B| = 4)
    # anchor 0: positives 1 (dot 0), 2 (dot -1) -> (lse + (1 + lse)) / 2; anchor 1: 0 and 2 at dot 0 -> lse;
    # anchor 2: positives 0 (dot -1), 1 (dot 0) -> (1 + lse + lse) / 2
    d = 2 + 1e-6
    expected = ((2 * lse + 1) / d + 2 * lse / d + (2 * lse + 1) / d + 0.0) / 4
    got = supcon_loss(f, torch.tensor([0, 0, 0, 1]), tau=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_supcon_equals_the_code_definition_and_is_finite_at_low_temperature():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    u = f / f.norm(dim=1, keepdim=True)
    total = 0.0
    for a in range(12):
        denom = sum(math.exp(float(u[a] @ u[b]) / 0.3) for b in range(12) if b != a)
        pos = [p for p in range(12) if p != a and y[p] == y[a]]
        total += -sum(math.log(math.exp(float(u[a] @ u[p]) / 0.3) / denom) for p in pos) / (len(pos) + 1e-6)
    assert supcon_loss(f, y, 0.3).item() == pytest.approx(total / 12, rel=1e-5)
    big = torch.randn(64, 16, generator=g) * 1e4
    assert torch.isfinite(supcon_loss(big, torch.randint(0, 2, (64,), generator=g), 0.05))


def test_unseen_site_reestimates_encoder_bn_statistics_on_a_private_copy():
    sj = site_job(DualFedConfig())  # 96 examples: three full batches of 32
    sj.role = "unseen"
    before = snapshot(sj.model)
    model = DualFedObjective(sj.job.method).global_model(sj)
    assert model is not sj.model and all(torch.equal(v, sj.model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        pre_bn = sj.model.encoder.net[1](sj.model.encoder.net[0](torch.from_numpy(sj.data.x_train)))
    bn = model.encoder.net[2]
    assert torch.allclose(bn.running_mean, pre_bn.mean(0), atol=1e-5)
    assert not torch.allclose(before["encoder.net.2.running_mean"], bn.running_mean)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()
               if "running" not in k and "num_batches" not in k)
    sj.role = "train"
    assert DualFedObjective(sj.job.method).global_model(sj) is sj.model, "training sites keep their own statistics"


# ----------------------------------------------------------------------------- server
def test_server_mean_is_uniform_by_default_and_weighted_on_request(tmp_path):
    def aggregate(weighting):
        cfg = make_config(tmp_path, method="dualfed", knobs={"weighting": weighting})
        strategy = build_strategy(cfg)
        ups = []
        for i, (value, n) in enumerate([(1.0, 10), (2.0, 30), (6.0, 60)]):
            arrays = {k: np.full_like(v, value) for k, v in strategy.shared.items()}
            ups.append(Update(SiteProfile(i, f"site-{i}", "train", "", n, 1), arrays, n, {}))
        return strategy.aggregate_shared(ups)

    for arr in aggregate("uniform").values():
        assert np.allclose(arr, 3.0)
    for arr in aggregate("num_examples").values():
        assert np.allclose(arr, 0.1 * 1 + 0.3 * 2 + 0.6 * 6)


# ----------------------------------------------------------------------------- end to end
def test_messages_restart_and_unseen_bn(tmp_path):
    cfg = make_config(tmp_path, method="dualfed", rounds=2, sites=3, unseen=1, model={"hidden": 128})
    grids = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    grid = grids[0]
    split = ParamSplit.build(build_model(ModelSpec("mlp", (1, 8, 8), 10, hidden=128), "dual"), cfg.method.split_rules())
    assert all(not r.has_error() for r in grid.replies)
    for msg in list(grid.sent) + list(grid.replies):
        for key in msg.content.array_records:
            names = set(msg.content[key].keys())
            assert not names & set(split.personal), f"personal tensors left a site: {names & set(split.personal)}"
            assert not any(n.startswith(("projector.", "personal_head.")) or "running" in n for n in names)
    ups = [r for r in grid.replies if C.ARRAYS in r.content.array_records]
    assert ups and all(names_of(r.content) == set(split.shared) for r in ups)
    assert summary["unseen"]["mean"] is not None and summary["global"]["mean"] is not None

    # restart: rebuilding each site from the last evaluate message and its state file gives identical results
    last_eval = [m for m in grid.sent if m.metadata.message_type == "evaluate"][-4:]
    before = {m.metadata.dst_node_id: r.content[C.METRICS] for m, r in zip(last_eval, grid.replies[-4:])}
    for msg in last_eval:
        nid = msg.metadata.dst_node_id
        again = grid.app(msg, grid.contexts[nid]).content[C.METRICS]
        assert untimed(again) == untimed(before[nid])
    # ... and the state file is what makes it so (the personal parts are not the initial ones)
    state_file = cfg.run_dir() / "state" / "site-0" / "site_state.pt"
    saved = torch.load(state_file, weights_only=True)
    assert set(saved["personal"]) == set(split.personal) and saved["last_round"] == 2
    state_file.unlink()
    msg = last_eval[0]
    ctx = grid.contexts[msg.metadata.dst_node_id]
    refused = grid.app(msg, ctx)  # a vanished state file after round 2 is an error, not a silent restart
    assert refused.has_error() and "StateMissing" in refused.error.reason
    ctx.node_config["on-missing-state"] = "reset"  # ... unless the site says to restart fresh
    fresh = grid.app(msg, ctx).content[C.METRICS]
    assert fresh["personalized-loss"] != before[msg.metadata.dst_node_id]["personalized-loss"]


def test_beats_fedavg_on_personalized_accuracy(tmp_path):
    """Digits, 6 sites, Dirichlet(0.3), MLP (spec: 64-128-64), 15 rounds, seed 0.

    Measured last-round margins over FedAvg at seeds 0..3: 0.049, 0.056, 0.048, 0.050.
    """
    acc = personalized_means(tmp_path, ("fedavg", "dualfed"), rounds=15, sites=6, model={"hidden": 128})
    assert acc["dualfed"] >= acc["fedavg"] + 0.02, acc


def test_auto_supcon_weight_follows_the_encoder_normalization():
    assert DualFedConfig().supcon_weight("batch") == 10.0 and DualFedConfig().supcon_weight("none") == 10.0
    assert DualFedConfig().supcon_weight("group") == 1.0
    assert DualFedConfig(con_lambda=40).supcon_weight("group") == 40.0
    with pytest.raises(ValueError, match="con_lambda"):
        DualFedConfig(con_lambda=-1)
