"""FLoRAL site update (Almansoori et al., CPAL 2025; spec ``floral.md`` sections 4 and 8).

Round t: load the received base and the C adaptor sets, keep the site's router theta_k (personal
by the split: it is saved with the site state and never travels), then one pass of the one loop
over three SGD groups: base at ``train.lr``, adaptors at ``adaptor_lr`` (default ``train.lr``),
router at ``router_lr``; no momentum or weight decay (the method's train defaults), and the router's
group never decays, whatever ``train.weight_decay`` says (as the official code's ``get_param_groups``:
decay would pull theta back to the uniform mixture every step). In training
pi = softmax((theta + sigma u) / tau), u ~ U[0,1)^C per minibatch (the model draws it, seeded per
round); adaptor gradients are preconditioned between backward and step (PrecondLoRA; not under DP-SGD
unless ``dp_precondition``: there the hook would amplify the noise). The reply
carries p(c|k) = softmax(theta_k) as metrics ``pi-c`` (no noise, no temperature, no clamp): the
server's p(k|c) weights need it.

Evaluation: personalized = the site's own router (eval mode: no noise); global = the uniform
mixture (theta = 0), which is also an unseen site's zero-shot path. A new site's protocol trains
the router only for ``unseen_router_steps`` steps on its train split, base and adaptors frozen
(local_adaptors: its private adaptor set too, since it has nothing shared to mix).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from client.methods.base import SiteJob, SiteObjective
from models.lora import precondition_


def router_probs(model: nn.Module) -> list[float]:
    """p(c|k) = softmax(theta_k) without noise, temperature or clamp (as the official code's server reads
    the router's weights): what the server weighs adaptors with."""
    with torch.no_grad():
        return torch.softmax(model.router.theta.detach().double(), dim=0).tolist()


class FloralObjective(SiteObjective):
    dp_metrics = ("pi-",)  # softmax of the router's DP-trained theta: post-processing

    def groups(self, sj: SiteJob, model: nn.Module, router_only: bool = False) -> list[dict]:
        lr = sj.trainer.cfg.lr
        router = {"params": model.router_parameters(), "lr": self.cfg.router_lr, "weight_decay": 0.0}
        if router_only:
            return [router]
        adaptors = model.adaptor_parameters() if hasattr(model, "adaptor_parameters") else []
        fixed = {id(p) for p in [*adaptors, *router["params"]]}
        out = [{"params": [p for p in model.parameters() if id(p) not in fixed], "lr": lr}]  # base or copies
        if adaptors:
            out.append({"params": adaptors, "lr": self.cfg.adaptor_lr or lr})
        return out + [router]

    def precondition(self, model: nn.Module, private: bool = False):
        """The step hook, or None: off with ``precondition = false``, and under DP-SGD (``private``) unless
        ``dp_precondition``: Opacus adds the noise before this hook, and (B^T B + eps I)^-1 with B near 0 (its
        initialization) multiplies the noise on A by up to 1/eps, which drowns the model (issue 25)."""
        if not self.cfg.precondition or not hasattr(model, "adaptor_parameters"):
            return None
        if private and not self.cfg.dp_precondition:
            return None
        return lambda m: precondition_(m, self.cfg.precond_eps)

    def fit(self, sj: SiteJob) -> dict[str, float]:
        model = sj.model
        model.router.reseed(_seed(sj, "r"))
        out = sj.trainer.fit(model, self.groups(sj, model), sj.task_loss, tag=f"r{sj.job.round}",
                             before_step=self.precondition(model, private=sj.trainer.dp is not None))
        out.update({f"pi-{c}": p for c, p in enumerate(router_probs(model))})
        return out

    # -- evaluation -------------------------------------------------------------
    def predict_global(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg.num_adaptors
        return model(x, pi=torch.full((c,), 1.0 / c, device=x.device))

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module | None:
        """Router-only warm-up from theta = 0 (base and adaptors frozen and in eval mode)."""
        steps = self.cfg.unseen_router_steps
        model = copy.deepcopy(sj.model)
        model.to(sj.trainer.device)
        if steps == 0 or epochs == 0:
            return model
        private = any(n.startswith("adaptors.") for n in sj.split.personal)  # local_adaptors: its own set, too
        groups = self.groups(sj, model, router_only=True)
        if private:
            groups.insert(0, {"params": model.adaptor_parameters(), "lr": self.cfg.adaptor_lr or sj.trainer.cfg.lr})
        per_epoch = max(1, math.ceil(len(sj.trainer.y) / sj.trainer.cfg.batch_size))
        model.router.reseed(_seed(sj, "new"))
        frozen = [m for name, m in model.named_children() if name != "router"]
        sj.trainer.fit(model, groups, sj.task_loss, epochs=math.ceil(steps / per_epoch), max_steps=steps,
                       tag=f"new{sj.job.round}", eval_modules=frozen)  # no preconditioning: from B = 0 it diverges here
        return model


def _seed(sj: SiteJob, stage: str) -> int:
    """Router noise: deterministic per site, round and stage (same on every engine)."""
    return sj.trainer.seed_for(f"noise:{stage}")
