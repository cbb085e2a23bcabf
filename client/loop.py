"""The one local training loop. Methods plug in a loss and the parameters to train.

The loop owns batching, seeding, device placement, freezing, optimizer creation
(a fresh optimizer per call, ``train.optimizer``: SGD by default; its momentum or Adam moments never
leak between a method's stages),
the non-finite-loss guard and metrics. A method stage is one ``Trainer.fit``
call; DualFed's two stages or FedRep's head-then-body are two calls.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from client.tasks import Classification, score

# The first torch.optim optimizer imports torch._dynamo (~2.5 s of CPU in torch 2.13). A site process pays it
# here, when it loads the ClientApp, rather than inside its first training message (warm SuperExecs have it
# preloaded already: launch/fastpath.py DEFAULT_PRELOAD).
import torch._dynamo  # noqa: E402,F401  isort: skip

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: a loss term of the parameters alone (FedProx's proximal term, Ditto's pull, a prior): it never sees the data
Penalty = Callable[[nn.Module], torch.Tensor]
PredictFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
StepHook = Callable[[nn.Module], None]


class NonFiniteLoss(FloatingPointError):
    """Local training diverged; the site refuses to upload the result."""


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_from(text: str) -> int:
    """A 64-bit seed from a label (SHA-256, unlike hash(): the same in every process and machine)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class Trainer:
    """Binds one site's train split, optimizer knobs and seeds for one message."""

    def __init__(self, x: np.ndarray, y: np.ndarray, train_cfg, seed: int | str, device: torch.device | None = None,
                 dp=None):
        self.device = device or resolve_device(train_cfg.device)
        self._x = torch.from_numpy(x).to(self.device)
        self._y = torch.from_numpy(y).to(self.device)
        self.cfg = train_cfg
        self.seed = seed
        self.steps = 0
        #: batches of the training split handed out so far (any use: a step, BN statistics): evaluation under DP
        #: compares it before and after building a model, to tell a model trained outside DP-SGD (client/app.py)
        self.reads = 0
        #: ``client.privacy.DPContext`` in a training message with ``privacy.enabled``: every fit is DP-SGD (the loop
        #: uses it through its methods only, so it never imports ``client.privacy``: privacy builds on the loop)
        self.dp = dp

    @property
    def x(self) -> torch.Tensor:
        """The training split's inputs; every read counts in ``reads`` (a method reading them to build a model)."""
        self.reads += 1
        return self._x

    @property
    def y(self) -> torch.Tensor:
        self.reads += 1
        return self._y

    def seed_for(self, tag: str) -> int:
        """A 64-bit seed from the site's seed and a stage tag (the same on every machine)."""
        return seed_from(f"{self.seed}:{tag}")

    def _generator(self, tag: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_for(tag))

    def batches(self, tag: str, x: torch.Tensor | None = None, y: torch.Tensor | None = None):
        x = self._x if x is None else x
        y = self._y if y is None else y
        order = torch.randperm(len(y), generator=self._generator(tag)).to(self.device)
        # ceil(N / B) batches of near-equal size (B or a little less), not full batches plus a remainder:
        # a remainder of 2 or 8 examples gives BatchNorm extreme statistics and SupCon almost no pairs,
        # and one such step once threw a DualFed site's encoder 5x further than usual (digits, CNN-S).
        for idx in torch.tensor_split(order, max(1, math.ceil(len(y) / self.cfg.batch_size))):
            if len(idx) < 2 and len(y) >= 2:  # BatchNorm cannot train on a single example
                continue
            self.reads += 1
            yield x[idx], y[idx]

    def poisson_batches(self, tag: str, x: torch.Tensor | None = None, y: torch.Tensor | None = None):
        """DP-SGD's sampling: each example joins each of the epoch's 1/q batches with probability q
        (what the accountant assumes); a batch may be empty. The draws are the DP context's: secret
        (``client.privacy``), or seeded from the site's seed under ``privacy.reproducible_noise``."""
        x = self._x if x is None else x
        y = self._y if y is None else y
        dp = self.dp
        g = self._generator(tag) if dp.reproducible else dp.generator(f"poisson:{tag}")
        for _ in range(max(1, round(1 / dp.sample_rate))):
            dp.refresh(g)
            idx = (torch.rand(len(y), generator=g) < dp.sample_rate).nonzero().squeeze(1).to(self.device)
            self.reads += 1
            yield x[idx], y[idx]

    def fit(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict],
        loss_fn: LossFn = cross_entropy,
        epochs: int | None = None,
        lr: float | None = None,
        tag: str = "main",
        after_step: StepHook | None = None,
        eval_modules: Iterable[nn.Module] = (),
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        before_step: StepHook | None = None,
        max_steps: int | None = None,
        penalty: Penalty | None = None,
    ) -> dict[str, float]:
        """Train only ``params`` (everything else frozen) with a fresh ``train.optimizer``; return mean loss.

        ``eval_modules`` stay in eval mode, so a frozen part's BatchNorm layers normalize
        with their running statistics and do not update them (FedRep's head stage, a head
        fitted on a frozen body): frozen then means bit-identical, buffers included.
        ``data`` replaces the site's (x, y), e.g. by features a frozen encoder computed once.
        ``epochs=None`` means ``train.local_epochs``; ``epochs=0`` means no step at all.
        ``params`` may be optimizer parameter groups (dicts with their own ``lr``: FLoRAL's base,
        adaptors and router); ``before_step`` edits gradients between backward and step
        (FLoRAL's preconditioning); ``max_steps`` stops early (a new site's router warm-up).
        ``penalty(model)`` is a term of the parameters alone, added to every batch's loss. Under DP-SGD its gradient
        is added after clipping and noise (post-processing: no privacy cost): inside the loss, Opacus would drop it,
        as it builds the gradient from per-example gradients of the data's loss only.
        """
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else ([{"params": params}] if params else [])
        ids = {id(p) for g in groups for p in g["params"]}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        model.to(self.device).train()
        for m in eval_modules:
            m.eval()
        opts, gsm = self._optimizers(model, groups, lr, tag)
        private = gsm is not None  # DP-SGD: Poisson batches, each one an accountant step
        batches = self.poisson_batches if private else self.batches
        total, count, count_steps = 0.0, 0, 0
        try:
            for epoch in range(self.cfg.local_epochs if epochs is None else epochs):
                for xb, yb in batches(f"{tag}:{epoch}", *(data or (None, None))):
                    if max_steps is not None and count_steps >= max_steps:
                        break
                    count_steps += 1
                    if private:
                        self.dp.steps += 1  # accounted even when the draw is empty (conservative)
                        if len(yb) == 0:
                            continue
                    loss = loss_fn(model, xb, yb)
                    term = penalty(model) if penalty is not None else None
                    if term is not None and not private:
                        loss = loss + term  # plain SGD: one loss, one backward
                    if not torch.isfinite(loss) or (term is not None and not torch.isfinite(term)):
                        raise NonFiniteLoss(f"non-finite loss in stage {tag!r}, epoch {epoch}")
                    if opts:
                        for o in opts.values():
                            o.zero_grad(set_to_none=True)
                        if private and "plain" in opts:  # trained in the clear: no per-example gradients kept
                            for p in (p for g in opts["plain"].param_groups for p in g["params"]):
                                p.grad_sample = None
                        loss.backward()
                        if "private" in opts:
                            self.dp.refresh(opts["private"].generator)
                            opts["private"].pre_step()  # clip per example, add noise: p.grad is now private
                        if term is not None and private:  # post-processing of the private gradient
                            self._add_gradient(term, [p for g in groups for p in g["params"]])
                        if before_step is not None:
                            before_step(model)
                        if self.cfg.grad_clip is not None:
                            nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], self.cfg.grad_clip)
                        for name, o in opts.items():
                            (o.original_optimizer if name == "private" else o).step()
                    if after_step is not None:
                        after_step(model)
                    if term is not None and private:
                        loss = loss.detach() + term.detach()
                    total += float(loss.detach()) * len(yb)
                    count += len(yb)
                    self.steps += 1
        finally:
            if gsm is not None:
                gsm._close()  # hooks and per-example gradients off: the model is a plain module again
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        return {"loss": total / max(count, 1), "examples": float(count)}

    @staticmethod
    def _add_gradient(term: torch.Tensor, params: list[nn.Parameter]) -> None:
        """``p.grad += d term / d p`` for every trained parameter the term depends on."""
        if not term.requires_grad:
            return  # a zero term (no anchor yet)
        grads = torch.autograd.grad(term, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def _make_optimizer(self, lr: float | None) -> Callable[[list[dict]], torch.optim.Optimizer]:
        """``train.optimizer`` over parameter groups: SGD (momentum) or Adam/AdamW (betas); fresh per call."""
        c = self.cfg
        kw = {"lr": lr or c.lr, "weight_decay": c.weight_decay}
        if c.optimizer == "sgd":
            return lambda groups: torch.optim.SGD(groups, momentum=c.momentum, **kw)
        cls = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
        return lambda groups: cls(groups, betas=tuple(c.betas), **kw)

    def _optimizers(self, model: nn.Module, groups: list[dict], lr: float | None, tag: str):
        """A fresh optimizer per call: ``({name: optimizer}, GradSampleModule or None)``. With DP the private
        parameters' optimizer is wrapped in Opacus' DPOptimizer (per-example clipping and noise), and the
        parameters a ``privacy.scope = "shared"`` run trains in the clear get a plain one."""
        if not groups:
            return {}, None
        make = self._make_optimizer(lr)
        if self.dp is None:
            return {"plain": make(groups)}, None
        dp = self.dp
        private, clear = [], []
        for g in groups:
            is_private = [dp.private is None or id(p) in dp.private for p in g["params"]]
            mine = [p for p, keep in zip(g["params"], is_private) if keep]
            rest = [p for p, keep in zip(g["params"], is_private) if not keep]
            private += [{**g, "params": mine}] if mine else []
            clear += [{**g, "params": rest}] if rest else []
        opts = {"plain": make(clear)} if clear else {}
        if not private:
            return opts, None
        opts["private"], gsm = dp.optimizer(model, private, make, tag)  # client.privacy.DPContext
        return opts, gsm

def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, predict: PredictFn = forward,
             device: torch.device | None = None, batch_size: int = 512, task=None) -> dict[str, float]:
    """``predict``'s metric (``score``; also ``accuracy`` for classification) and mean loss over a split.

    ``task`` is a ``client.tasks.Task`` (default: classification)."""
    task = task or Classification()
    out = score(task, model, x, y, predict, device, batch_size)
    if task.name == "classification":
        out["accuracy"] = out["score"]
    return out
