"""FLoRAL's model side: low-rank adaptors, the router, their mixture, and the Ensemble baseline.

Spec ``floral.md`` sections 3-4 (official code ``zeligism/FLoRAL``). Every adapted layer computes
``Base(x) + alpha * sum_c max(pi_c, min_prob) * (B_c(A_c(x)) + b_c)``; the clamp is not renormalised.
The adaptors see the base layer's input, so the base model's own code needs no change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fnmatch import fnmatchcase
from functools import partial

import torch
from torch import nn

BIAS_INITS = ("torch_default", "zero")
#: How ConvLoRA counts a factor's dimension (rank rule and A's init bound). ``kernel``: C times the numel of the
#: factor's kernel (C_in k_w for A, C_out k_h for B); ``code``: the official code's C * numel(Tensor(kernel_size)),
#: which is C * 2 for every 2-D kernel (``torch.Tensor((1, k))`` is a 2-vector), whatever k is.
CONV_DIMS = ("kernel", "code")
ROOT_KEY = "_root"  # adaptor key when the base model itself is the adapted layer ('' is no ModuleDict key)


def resolve_rank(d_in: int, d_out: int, budget: float | int | str) -> int:
    """Per-layer rank: a relative budget < 1 is a share of the layer's parameters (floor, at least 1);
    a number >= 1 is the rank itself; ``"full"`` is min(d_in, d_out)."""
    if budget == "full":
        return min(d_in, d_out)
    budget = float(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if budget < 1:
        return max(1, math.floor(budget * d_in * d_out / (d_in + d_out)))
    return round(budget)


def _init_factors(a: torch.Tensor, b: nn.Module, fan_in: int, bias_init: str) -> None:
    """A ~ U(+-sqrt(6/fan_in)), B = 0: the adaptor starts as its bias alone (zero with bias_init='zero')."""
    if bias_init not in BIAS_INITS:
        raise ValueError(f"bias_init must be one of {BIAS_INITS}, got {bias_init!r}")
    bound = math.sqrt(6.0 / fan_in)
    nn.init.uniform_(a, -bound, bound)
    nn.init.zeros_(b.weight)
    if b.bias is not None and bias_init == "zero":
        nn.init.zeros_(b.bias)


class LinearLoRA(nn.Module):
    """x -> B(A(x)); B carries the adaptor bias b_c when ``bias`` and the base layer has one."""

    def __init__(self, base: nn.Linear, budget: float | int | str, bias: bool = True,
                 bias_init: str = "torch_default"):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        self.rank = resolve_rank(d_in, d_out, budget)
        self.A = nn.Linear(d_in, self.rank, bias=False)
        self.B = nn.Linear(self.rank, d_out, bias=bias and base.bias is not None)
        _init_factors(self.A.weight, self.B, d_in, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def _balanced_2d(base: nn.Conv2d) -> tuple[dict, dict]:
    """Conv2d options of (A, B) for ``balanced_2d``: A = (1, k_w) conv with the base's width
    stride/padding/dilation, B = (k_h, 1) conv with the height ones, so B(A(x)) has the base's output shape.

    For square kernels this is the official rule. For non-square ones the code gives the smaller k to the
    side with more channels, which swaps the factors' kernels in half the cases and then breaks the output
    shape (the hook's sum fails); keeping each factor on its own axis agrees with the code wherever the
    code runs, and always fits.
    """
    if isinstance(base.padding, str):
        if base.padding != "valid":
            raise NotImplementedError(f"ConvLoRA: padding={base.padding!r} is not supported")
        padding = (0, 0)
    else:
        padding = base.padding
    (k_h, k_w), common = base.kernel_size, {"groups": base.groups, "padding_mode": base.padding_mode}
    a = {"kernel_size": (1, k_w), "stride": (1, base.stride[1]), "padding": (0, padding[1]),
         "dilation": (1, base.dilation[1]), **common}
    b = {"kernel_size": (k_h, 1), "stride": (base.stride[0], 1), "padding": (padding[0], 0),
         "dilation": (base.dilation[0], 1), **common}
    return a, b


class ConvLoRA(nn.Module):
    """Conv2d adaptor, ``balanced_2d`` (spec section 3): A = Conv(C_in, r, (1, k)), B = Conv(r, C_out, (k, 1)).

    ``dims`` (``CONV_DIMS``) sets d_in, d_out for the rank rule and A's init bound sqrt(6 / d_in): a 32 -> 64
    3x3 conv at budget 0.1 gets rank 6 under ``kernel`` (96, 192), 4 under ``code`` (64, 128)."""

    def __init__(self, base: nn.Conv2d, budget: float | int | str, bias: bool = True,
                 bias_init: str = "torch_default", dims: str = "kernel"):
        super().__init__()
        if dims not in CONV_DIMS:
            raise ValueError(f"dims must be one of {CONV_DIMS}, got {dims!r}")
        a_opts, b_opts = _balanced_2d(base)
        k_a, k_b = ((math.prod(a_opts["kernel_size"]), math.prod(b_opts["kernel_size"])) if dims == "kernel"
                    else (len(a_opts["kernel_size"]), len(b_opts["kernel_size"])))
        d_in, d_out = base.in_channels * k_a, base.out_channels * k_b
        self.rank = resolve_rank(d_in, d_out, budget)
        if self.rank % base.groups:
            raise ValueError(f"ConvLoRA: rank {self.rank} is not divisible by groups={base.groups}")
        self.A = nn.Conv2d(base.in_channels, self.rank, bias=False, **a_opts)
        self.B = nn.Conv2d(self.rank, base.out_channels, bias=bias and base.bias is not None, **b_opts)
        _init_factors(self.A.weight, self.B, d_in, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


class Router(nn.Module):
    """Logits theta (one per adaptor set, personal, start at 0). Training: softmax((theta + sigma*u)/tau)
    with u ~ U[0,1)^C redrawn per call; eval: softmax(theta/tau), no noise."""

    def __init__(self, num: int, sigma: float = 1.0, tau: float = 1.0):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(num))
        self.sigma, self.tau = sigma, tau
        self.generator: torch.Generator | None = None  # None: the global RNG
        self.last_noise: torch.Tensor | None = None  # the u of the latest training call (diagnostics)
        self.last_probs: torch.Tensor | None = None  # the latest pi (detached): the per-example gradient needs it

    def reseed(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """pi, shape (C,); given the batch ``x``, the same pi per example, shape (B, C): one row per
        example lets Opacus give theta a per-example gradient (``per_example_grad``), as DP-SGD needs."""
        logits = self.theta
        if self.training:
            u = torch.rand(logits.shape, generator=self.generator, dtype=logits.dtype,
                           device="cpu" if self.generator is not None else logits.device).to(logits.device)
            self.last_noise = u
            logits = logits + self.sigma * u
        pi = torch.softmax(logits / self.tau, dim=-1)
        self.last_probs = pi.detach()
        return pi if x is None else pi.expand(len(x), -1)


def router_per_example_grad(layer: Router, activations, backprops: torch.Tensor) -> dict:
    """Opacus grad sampler for Router: example b's gradient of theta is J^T g_b, with g_b = dL_b/dpi_b and
    J = (diag(p) - p p^T) / tau the softmax Jacobian at this batch's (noisy) p."""
    p = layer.last_probs.to(backprops.dtype)
    g = backprops
    return {layer.theta: (p * g - p * (g @ p).unsqueeze(1)) / layer.tau}


def _adaptable(base: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of the Linear/Conv2d layers matching any pattern. Layers inside nn.MultiheadAttention
    are skipped: it uses their weights functionally, so a forward hook would never fire."""
    mha = [n for n, m in base.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [n for n, m in base.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(fnmatchcase(n, p) for p in patterns)
            and not any(n.startswith(p + ".") for p in mha)]


def _key(name: str) -> str:
    return name.replace(".", "_") if name else ROOT_KEY


class _Routed(nn.Module):
    """What FloralModel and EnsembleModel share: a router, and copies that carry a detached ``last_pi``."""

    def __getstate__(self):
        # last_pi may carry autograd history, which deepcopy refuses; copies get a detached value
        state = super().__getstate__()
        if state.get("last_pi") is not None:
            state["last_pi"] = state["last_pi"].detach()
        return state

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.router.parameters())


class FloralModel(_Routed):
    """base + C adaptor sets on the named layers + a router; out = Base(x) + alpha * sum_c max(pi_c, min_prob)
    * (B_c(A_c(x)) + b_c) at every adapted layer (forward hooks on the base layers, adaptors see the base
    layer's input).

    The hooks live only for the duration of ``forward`` (registered, then removed), so the wrapped base
    stays a plain model, and deepcopy/pickle carry no closures.
    """

    def __init__(self, base: nn.Module, num_adaptors: int, budget: float | int | str = 0.01,
                 layers: tuple[str, ...] = ("*",), alpha: float = 1.0, min_prob: float = 0.01,
                 sigma: float = 1.0, tau: float = 1.0, bias: bool = True, bias_init: str = "torch_default",
                 conv_dims: str = "kernel"):
        super().__init__()
        if num_adaptors < 1:
            raise ValueError(f"num_adaptors must be >= 1, got {num_adaptors}")
        self.base = base
        self.layer_names = _adaptable(base, tuple(layers))
        if not self.layer_names:
            raise ValueError(f"no nn.Linear/nn.Conv2d in the base model matches layers={layers}")
        keys = [_key(n) for n in self.layer_names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"adapted layer names collide once '.' becomes '_': {self.layer_names}")
        self.alpha, self.min_prob = alpha, min_prob
        self.adaptors = nn.ModuleList(
            nn.ModuleDict({_key(n): self._adaptor(base.get_submodule(n), budget, bias, bias_init, conv_dims)
                           for n in self.layer_names})
            for _ in range(num_adaptors))
        self.router = Router(num_adaptors, sigma, tau)
        self.last_pi: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None  # clamped pi, set only during forward

    @staticmethod
    def _adaptor(layer: nn.Module, budget, bias: bool, bias_init: str, conv_dims: str) -> nn.Module:
        if isinstance(layer, nn.Conv2d):
            return ConvLoRA(layer, budget, bias=bias, bias_init=bias_init, dims=conv_dims)
        return LinearLoRA(layer, budget, bias=bias, bias_init=bias_init)

    @property
    def num_adaptors(self) -> int:
        return len(self.adaptors)

    def _hook(self, key: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        shape = (len(x),) + (1,) * (output.dim() - 1)  # one weight per example (rows of the (B, C) mixture)
        mix = sum(self._weights[:, c].reshape(shape) * ad[key](x) for c, ad in enumerate(self.adaptors))
        return output + self.alpha * mix

    def forward(self, x: torch.Tensor, pi: torch.Tensor | None = None) -> torch.Tensor:
        """One router call (one noise draw) per forward; a given ``pi`` (shape (C,)) replaces the router's."""
        if pi is None:
            rows = self.router(x)
            pi = rows[0]
        elif pi.shape != (self.num_adaptors,):
            raise ValueError(f"pi must have shape ({self.num_adaptors},), got {tuple(pi.shape)}")
        else:
            rows = pi.expand(len(x), -1)
        self.last_pi = pi
        self._weights = rows.clamp(min=self.min_prob)
        handles = [self.base.get_submodule(n).register_forward_hook(partial(self._hook, _key(n)))
                   for n in self.layer_names]
        try:
            return self.base(x)
        finally:
            for h in handles:
                h.remove()
            self._weights = None

    def adaptor_parameters(self) -> list[nn.Parameter]:
        return list(self.adaptors.parameters())

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.base.parameters())


@torch.no_grad()
def precondition_(model: FloralModel, eps: float = 1e-5) -> None:
    """In-place on every adaptor factor's .grad (spec section 4), so factors starting at B = 0 train at a
    useful speed. Linear: g_A <- (B^T B + eps I)^-1 g_A, g_B <- g_B (A A^T + eps I)^-1. Conv: each factor's
    gradient is divided by the Frobenius norm of the other factor's Gram tensor plus eps.
    Router and B.bias are left alone; a factor without a gradient is skipped."""
    for lora in model.adaptors.modules():
        if isinstance(lora, LinearLoRA):
            a, b = lora.A.weight, lora.B.weight  # (r, d_in), (d_out, r)
            eye = eps * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            if a.grad is not None:
                a.grad.copy_(torch.linalg.solve(b.T @ b + eye, a.grad))
            if b.grad is not None:
                b.grad.copy_(torch.linalg.solve((a @ a.T + eye).T, b.grad.T).T)
        elif isinstance(lora, ConvLoRA):
            a, b = lora.A.weight, lora.B.weight  # (r, C_in/g, 1, k), (C_out, r/g, k, 1)
            if a.grad is not None:
                a.grad.div_(torch.einsum("ma...,mb...->ab...", b, b).norm().add(eps))
            if b.grad is not None:
                b.grad.div_(torch.einsum("an...,bn...->ab...", a, a).norm().add(eps))


class EnsembleModel(_Routed):
    """Baseline floral_ensemble: C full copies of the base model; out = sum_c pi_c f_c(x) with the same Router;
    copies with pi_c < 1e-3 skipped (they get no gradient that step, as in the code)."""

    SKIP_BELOW = 1e-3

    def __init__(self, make_base: Callable[[], nn.Module], num_copies: int, sigma: float = 1.0,
                 tau: float = 1.0):
        super().__init__()
        if num_copies < 1:
            raise ValueError(f"num_copies must be >= 1, got {num_copies}")
        self.copies = nn.ModuleList(make_base() for _ in range(num_copies))
        self.router = Router(num_copies, sigma, tau)
        self.last_pi: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, pi: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.router(x) if pi is None else pi.expand(len(x), -1)
        pi = rows[0]
        self.last_pi = pi
        outs = []
        for c, f in enumerate(self.copies):
            if pi[c] >= self.SKIP_BELOW:
                y = f(x)  # (B, classes) for a classifier, (B, T, vocab) for a language model
                outs.append(rows[:, c].reshape((len(x),) + (1,) * (y.dim() - 1)) * y)
        return torch.stack(outs).sum(0)

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.copies.parameters())


def count_parameters(model: nn.Module, prefix: str = "") -> int:
    """Parameters whose state name starts with ``prefix`` (e.g. 'adaptors.' for FLoRAL's extra cost)."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
