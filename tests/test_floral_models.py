"""FLoRAL model side (spec ``floral.md`` section 11, items 4-9): init, clamp, router noise, rank rule,
ConvLoRA shapes, preconditioning, the hooked mixture, deepcopy, state names, the Ensemble baseline."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from models.lora import (ConvLoRA, EnsembleModel, FloralModel, LinearLoRA, Router, count_parameters,
                         precondition_, resolve_rank)
from models.spec import ModelSpec, build_model

MLP = ModelSpec("mlp", (1, 8, 8), 10)
CNN = ModelSpec("cnn", (1, 8, 8), 10)


def randomize_adaptors(model: FloralModel, seed: int = 1) -> None:
    """B starts at 0, which would hide every adaptor term; give all factors and biases random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adaptor_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


# --- 7. rank rule ------------------------------------------------------------------------------------

def test_rank_rule_values_and_floor():
    assert resolve_rank(784, 200, 0.01) == 1
    assert resolve_rank(784, 200, 0.1) == 15
    assert resolve_rank(200, 10, 0.1) == 1
    assert resolve_rank(4, 4, 0.01) == 1  # floor(0.02) = 0 -> 1
    assert resolve_rank(784, 200, 3) == 3 and resolve_rank(784, 200, "full") == 200
    assert ConvLoRA(nn.Conv2d(32, 64, 3, padding=1), 0.1).rank == 6  # d_in 32*3, d_out 64*3
    assert LinearLoRA(nn.Linear(784, 200), 0.1).A.weight.shape == (15, 784)


def test_parameter_counts_match_spec_small_models():
    # spec section 3: MnistNN at C=4 and BN-free CNN-S per adaptor set, both budgets
    mnist = nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))
    assert count_parameters(FloralModel(mnist, 4, 0.01), "adaptors.") == 5616
    assert count_parameters(FloralModel(mnist, 4, 0.1), "adaptors.") == 60720
    cnn = build_model(ModelSpec("cnn", (1, 28, 28), 10, norm="none"))
    f = FloralModel(cnn, 4, 0.1)
    assert [f.adaptors[0][k].rank for k in f.adaptors[0]] == [1, 6, 12, 1]
    assert count_parameters(f, "adaptors.0.") == 41367
    assert count_parameters(FloralModel(cnn, 4, 0.01), "adaptors.0.") == 4023


# --- 4. initialisation -------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: LinearLoRA(nn.Linear(60, 40), 8),
                                  lambda: ConvLoRA(nn.Conv2d(6, 12, 3), 8)])
def test_init_b_zero_a_uniform_within_bound(make):
    torch.manual_seed(0)
    lora = make()
    fan_in = lora.A.weight[0].numel()  # d_in: C_in * numel(kernel of A), or in_features
    bound = math.sqrt(6 / fan_in)
    a = lora.A.weight
    assert torch.all(lora.B.weight == 0)
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound  # fills U(-bound, bound)
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    assert lora.B.bias is not None and lora.B.bias.abs().sum() > 0  # torch default, non-zero


def test_conv_dims_code_is_the_official_c_times_two_rule():
    """Issue 25: the official conv.py counts C * numel(torch.Tensor((1, k))) = 2C for every 2-D kernel."""
    conv = nn.Conv2d(32, 64, 3, padding=1)
    assert ConvLoRA(conv, 0.1).rank == 6 and ConvLoRA(conv, 0.1, dims="code").rank == 4  # (96, 192) vs (64, 128)
    assert ConvLoRA(nn.Conv2d(32, 64, 5), 0.1, dims="code").rank == 4  # k does not enter
    assert ConvLoRA(nn.Conv2d(32, 64, 1), 0.1, dims="code").rank == 4  # a 1x1 kernel counts 2 as well
    torch.manual_seed(0)
    a = ConvLoRA(nn.Conv2d(64, 64, 5), 8, dims="code").A.weight
    bound = math.sqrt(6 / (64 * 2))  # init bound from 2 C_in, not C_in * 5
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    with pytest.raises(ValueError, match="dims"):
        ConvLoRA(conv, 0.1, dims="official")
    from kumiki.methods import FloralConfig

    model = build_model(ModelSpec("cnn", (1, 8, 8), 10), FloralConfig(conv_dims="code"))
    assert model.adaptors[0]["encoder_features_4"].rank == 4
    assert build_model(ModelSpec("cnn", (1, 8, 8), 10), FloralConfig()).adaptors[0]["encoder_features_4"].rank == 6


def test_zero_bias_init_starts_at_the_base_model():
    base = build_model(CNN)
    x = torch.randn(4, 1, 8, 8)
    zero = FloralModel(copy.deepcopy(base), 3, 0.1, bias_init="zero")
    default = FloralModel(copy.deepcopy(base), 3, 0.1)
    for m in (zero, default):
        m.eval()
    want = base.eval()(x)
    assert torch.allclose(zero(x), want, atol=1e-6)
    assert not torch.allclose(default(x), want, atol=1e-4)  # code default: b_c != 0
    assert all(torch.all(b == 0) for n, b in zero.named_parameters() if n.endswith("B.bias"))


# --- 5. clamp ------------------------------------------------------------------------------------------

def test_clamp_gives_floor_weight_without_renormalising():
    # y = base(x) + alpha * sum_c w_c * (b_c a_c x): base 0, adaptor terms 1*x and 100*x
    f = FloralModel(nn.Sequential(nn.Linear(1, 1, bias=False)), 2, budget=1, alpha=1.0)
    with torch.no_grad():
        f.base[0].weight.zero_()
        for c, gain in enumerate((1.0, 100.0)):
            f.adaptors[c]["0"].A.weight.fill_(1.0)
            f.adaptors[c]["0"].B.weight.fill_(gain)
    y = f(torch.ones(1, 1), pi=torch.tensor([0.999, 0.001]))
    assert y.item() == pytest.approx(0.999 * 1 + 0.01 * 100, abs=1e-5)  # weights (0.999, 0.01)


# --- 6. router noise -----------------------------------------------------------------------------------

def test_router_noise_train_only_uniform_unit_interval():
    r = Router(500, sigma=1.0, tau=1.0)
    with torch.no_grad():
        r.theta.copy_(torch.linspace(-1, 1, 500))
    r.train()
    p1, u1 = r(), r.last_noise
    p2, u2 = r(), r.last_noise
    assert not torch.allclose(p1, p2)
    for p, u in ((p1, u1), (p2, u2)):
        assert u.min() >= 0 and u.max() < 1 and u.max() > 0.9 and u.min() < 0.1
        assert torch.allclose(p, torch.softmax(r.theta + u, 0))
    r.eval()
    assert torch.equal(r(), r()) and torch.allclose(r(), torch.softmax(r.theta, 0))


def test_router_sigma_tau_and_reseed():
    r = Router(4, sigma=0.5, tau=2.0)
    r.reseed(7)
    p = r()
    u = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(p, torch.softmax((r.theta + 0.5 * u) / 2.0, 0))
    r.reseed(7)
    assert torch.equal(r(), p)


def test_one_router_draw_per_forward():
    f = FloralModel(build_model(MLP), 3, 0.1)
    calls = []
    orig = f.router.forward
    f.router.forward = lambda *a: calls.append(1) or orig(*a)
    f.train()(torch.randn(4, 1, 8, 8))
    assert len(calls) == 1 and f.last_pi.shape == (3,)


# --- 8. ConvLoRA shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("c_in,c_out", [(8, 4), (4, 8)])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 2, 1, 1), ((3, 5), 2, 1, 1), ((5, 3), (2, 1), (2, 0), 1), ((3, 5), 1, (1, 2), (2, 1))])
def test_convlora_output_shape_matches_base(c_in, c_out, kernel, stride, padding, dilation):
    base = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation)
    lora = ConvLoRA(base, 2)
    x = torch.randn(2, c_in, 11, 13)
    assert lora(x).shape == base(x).shape
    # stride/padding/dilation are split: A takes the width parts, B the height parts
    assert lora.A.stride == (1, base.stride[1]) and lora.B.stride == (base.stride[0], 1)
    assert lora.A.padding == (0, base.padding[1]) and lora.B.padding == (base.padding[0], 0)


def test_convlora_copies_groups_and_bias_follows_base():
    lora = ConvLoRA(nn.Conv2d(4, 8, 3, groups=2), 4)
    assert lora.A.groups == lora.B.groups == 2
    assert ConvLoRA(nn.Conv2d(4, 8, 3, bias=False), 2).B.bias is None
    assert LinearLoRA(nn.Linear(4, 8), 2, bias=False).B.bias is None


# --- 9. preconditioning --------------------------------------------------------------------------------

def _random_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_precondition_linear_matches_solve():
    f = FloralModel(nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)), 2, budget=3).double()
    randomize_adaptors(f)
    raw, eps = _random_grads(f), 1e-5
    precondition_(f, eps)
    eye = torch.eye(3, dtype=torch.double)
    for c in range(2):
        for key in ("0", "2"):
            lora, pre = f.adaptors[c][key], f"adaptors.{c}.{key}."
            a, b = lora.A.weight, lora.B.weight
            want_a = torch.linalg.solve(b.T @ b + eps * eye, raw[pre + "A.weight"])
            want_b = raw[pre + "B.weight"] @ torch.linalg.inv(a @ a.T + eps * eye)
            assert torch.allclose(lora.A.weight.grad, want_a, atol=1e-8)
            assert torch.allclose(lora.B.weight.grad, want_b, atol=1e-8)
            assert torch.equal(lora.B.bias.grad, raw[pre + "B.bias"])
    for n, p in f.named_parameters():
        if not n.startswith("adaptors."):
            assert torch.equal(p.grad, raw[n])  # base and router untouched


def test_precondition_conv_matches_hand_formula():
    f = FloralModel(nn.Sequential(nn.Conv2d(3, 5, 3)), 2, budget=2).double()
    randomize_adaptors(f)
    raw, eps = _random_grads(f), 1e-5
    precondition_(f, eps)
    for c in range(2):
        lora = f.adaptors[c]["0"]
        a, b = lora.A.weight, lora.B.weight  # (r, C_in, 1, k), (C_out, r, k, 1)
        # P_A[a,b,i,j] = sum_m B[m,a,i,j] B[m,b,i,j]; P_B[a,b,i,j] = sum_n A[a,n,i,j] A[b,n,i,j]
        p_a = sum((b[:, :, i, j].T @ b[:, :, i, j]).pow(2).sum() for i in range(3) for j in range(1)).sqrt()
        p_b = sum((a[:, :, i, j] @ a[:, :, i, j].T).pow(2).sum() for i in range(1) for j in range(3)).sqrt()
        assert torch.allclose(lora.A.weight.grad, raw[f"adaptors.{c}.0.A.weight"] / (p_a + eps))
        assert torch.allclose(lora.B.weight.grad, raw[f"adaptors.{c}.0.B.weight"] / (p_b + eps))
        assert torch.equal(lora.B.bias.grad, raw[f"adaptors.{c}.0.B.bias"])
    assert torch.equal(f.router.theta.grad, raw["router.theta"])


def test_precondition_skips_missing_grads():
    f = FloralModel(nn.Sequential(nn.Linear(4, 3)), 2, budget=2)
    f.adaptors[0]["0"].A.weight.grad = torch.ones(2, 4)
    precondition_(f)  # every other grad is None: no error, stays None
    assert f.adaptors[0]["0"].B.weight.grad is None and f.adaptors[1]["0"].A.weight.grad is None


# --- the hooked mixture, names, deepcopy -----------------------------------------------------------------

def _mix(f: FloralModel, w: torch.Tensor, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    key = name.replace(".", "_")
    return layer(x) + f.alpha * sum(w[c] * f.adaptors[c][key](x) for c in range(len(w)))


def reference(f: FloralModel, arch: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The mixture written out layer by layer, without hooks."""
    enc, head = f.base.encoder, f.base.head
    if arch == "mlp":
        for i, m in enumerate(enc.net):
            x = _mix(f, w, f"encoder.net.{i}", m, x) if isinstance(m, nn.Linear) else m(x)
        return _mix(f, w, "head", head, x)
    for i, m in enumerate(enc.features):
        x = _mix(f, w, f"encoder.features.{i}", m, x) if isinstance(m, nn.Conv2d) else m(x)
    z = torch.relu(_mix(f, w, "encoder.fc", enc.fc, x.flatten(1)))
    return _mix(f, w, "head", head, z)


@pytest.mark.parametrize("spec", [MLP, CNN], ids=["mlp", "cnn"])
def test_forward_equals_base_plus_weighted_adaptors(spec):
    f = FloralModel(build_model(spec), 3, 0.1, alpha=0.7).eval()
    randomize_adaptors(f)
    with torch.no_grad():
        f.router.theta.copy_(torch.tensor([2.0, 0.0, -4.0]))  # pi_3 < 0.01: clamped
    x = torch.randn(5, 1, 8, 8)
    pi = torch.softmax(f.router.theta, 0)
    w = pi.clamp(min=0.01)
    assert pi[2] < 0.01 and w[2] == 0.01
    with torch.no_grad():
        got = f(x)
    assert torch.allclose(got, reference(f, spec.arch, x, w), atol=1e-5)
    assert torch.equal(f.last_pi, pi)
    fixed = torch.tensor([0.2, 0.5, 0.3])
    assert torch.allclose(f(x, pi=fixed), reference(f, spec.arch, x, fixed), atol=1e-5)
    assert not f.base.head._forward_hooks  # hooks live only during forward


def test_state_names_and_layer_selection():
    f = FloralModel(build_model(MLP), 2, 0.1)
    assert f.layer_names == ["encoder.net.1", "encoder.net.4", "head"]  # the BN layer is never adapted
    names = list(f.state_dict())
    for n in ("base.encoder.net.1.weight", "adaptors.0.encoder_net_1.A.weight", "adaptors.0.encoder_net_1.B.weight",
              "adaptors.0.encoder_net_1.B.bias", "adaptors.1.head.B.bias", "router.theta"):
        assert n in names
    assert not any(n.startswith("adaptors.0.encoder_net_2") for n in names)
    assert {id(p) for p in f.adaptor_parameters()} | {id(p) for p in f.base_parameters()} | \
        {id(p) for p in f.router_parameters()} == {id(p) for p in f.parameters()}
    assert [p is f.router.theta for p in f.router_parameters()] == [True]
    cnn = FloralModel(build_model(CNN), 2, 0.1, layers=("encoder.features.*", "head"))
    assert cnn.layer_names == ["encoder.features.0", "encoder.features.4", "head"]
    assert isinstance(cnn.adaptors[0]["encoder_features_0"], ConvLoRA)


def test_deepcopy_same_outputs_independent_parameters():
    f = FloralModel(build_model(CNN), 2, 0.1)
    randomize_adaptors(f)
    x = torch.randn(3, 1, 8, 8)
    f.train()
    f(x).sum().backward()  # last_pi now carries autograd history
    g = copy.deepcopy(f)
    f.eval(), g.eval()
    with torch.no_grad():
        assert torch.equal(f(x), g(x))
        g.adaptors[1]["head"].B.bias.add_(1.0)
        g.base.encoder.fc.weight.mul_(0)
        want = f(x)
    assert not torch.allclose(g(x), want)
    assert torch.equal(f(x), want)
    assert all(p is not q for p, q in zip(f.parameters(), g.parameters()))


# --- Ensemble baseline ---------------------------------------------------------------------------------

def test_ensemble_is_pi_weighted_sum_of_independent_copies():
    torch.manual_seed(0)
    e = EnsembleModel(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 3)
    torch.manual_seed(0)
    e2 = EnsembleModel(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 3)
    assert all(torch.equal(p, q) for p, q in zip(e.parameters(), e2.parameters()))  # deterministic
    assert not torch.equal(e.copies[0][1].weight, e.copies[1][1].weight)  # independent
    assert list(e.state_dict()) == ["copies.0.1.weight", "copies.0.1.bias", "copies.1.1.weight",
                                    "copies.1.1.bias", "copies.2.1.weight", "copies.2.1.bias", "router.theta"]
    x = torch.randn(4, 1, 8, 8)
    e.eval()
    with torch.no_grad():
        e.router.theta.copy_(torch.tensor([1.0, -1.0, 0.5]))
        pi = torch.softmax(e.router.theta, 0)
        assert torch.allclose(e(x), sum(pi[c] * e.copies[c](x) for c in range(3)), atol=1e-6)
        skip = torch.tensor([0.9995, 0.0005, 0.0])  # copies below 1e-3 are skipped
        assert torch.allclose(e(x, pi=skip), 0.9995 * e.copies[0](x), atol=1e-6)


def test_ensemble_mixes_sequence_outputs_of_a_language_model():
    """(B, T, vocab) outputs: each example's row of pi weighs its whole sequence (issue 25: a (B, 1) weight
    did not broadcast against them, so floral_ensemble crashed on the language model)."""
    from models.lm import ByteLM

    torch.manual_seed(0)
    e = EnsembleModel(lambda: ByteLM(context=8, d=16, blocks=1, heads=2), 2)
    x = torch.randint(0, 256, (3, 8))
    e.eval()
    with torch.no_grad():
        e.router.theta.copy_(torch.tensor([0.3, -0.2]))
        pi = torch.softmax(e.router.theta, 0)
        out = e(x)
        assert out.shape == (3, 8, 256)
        assert torch.allclose(out, pi[0] * e.copies[0](x) + pi[1] * e.copies[1](x), atol=1e-6)
    e.train()
    e(x).sum().backward()  # training path (noisy per-example rows) too
    assert e.router.theta.grad is not None
