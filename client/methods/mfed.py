"""M-Fed site update (Zhou et al., arXiv 2504.09800; spec ``mfed.md`` section 4, a reconstruction).

Site k learns task t with model y = d_k(E(x)). Each round it receives the encoder E_bar and its task
group's global decoder D_bar_t, and keeps its own local decoder d_k in its state (``extra['decoder']``,
with the decoder's BN buffers):

1. E_k <- E_bar; d_k <- the persisted d_k (``decoder_init = keep_local``; D_bar_t at its first round), or
   d_k <- D_bar_t every round (``from_global``);
2. local epochs over (E_k, d_k), D_bar_t frozen, minimizing (``decoder_reg``)::

       prox         l_t(d_k(E_k(x)), y) + (w/2) ||d_k - D_bar_t||^2        (over the decoder's parameters)
       output       l_t(d_k(E_k(x)), y) + w l_t(D_bar_t(E_k(x)), y)        (D_bar_t's loss trains E_k)
       consistency  l_t(d_k(E_k(x)), y) + w Div(d_k(E_k(x)), D_bar_t(E_k(x)))   (KL for classes, MSE otherwise)
       none         l_t(d_k(E_k(x)), y)

   with w = mu (prox) or gamma, times min(1, round / mu_ramp_rounds) under ``mu_schedule = linear_ramp``,
   and w = 0 while the server has not aggregated the task yet (it says so in ``extra['has-global']``);
3. upload E_k and d_k (the split's shared tensors and the site's group); persist d_k.

Personalized prediction: E_bar + d_k. Global: E_bar + D_bar_t. An unseen site fine-tunes the decoder alone
from D_bar_t, the encoder frozen (BN statistics too), for ``eval.unseen_adapt_epochs`` (the spec's
``new_client_epochs``). With ``encoder_scope = none`` nothing travels: local training of the same model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from client.bn import has_personal_bn, reestimate_bn
from client.loop import LossFn
from client.methods.base import SiteJob, SiteObjective
from client.state import StateMismatch
from client.tasks import Task, task_for
from kumiki.methods.mfed import mfed_key, mfed_parse_group
from models import build_model

#: ``extra`` array the server sends: 1 once its task group's global decoder is an aggregate
HAS_GLOBAL = "has-global"


def prox_term(decoder: nn.Module, anchor: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """(w/2) sum over the decoder's parameters of ||d_k - D_bar_t||^2 (buffers are not parameters)."""
    total = torch.zeros((), device=next(decoder.parameters()).device)
    for name, p in decoder.named_parameters():
        total = total + (p - anchor[name].to(p.device)).pow(2).sum()
    return 0.5 * weight * total


def divergence(task: str, local: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Div(d_k(z), D_bar_t(z)): KL(softmax(global) || softmax(local)) for classification, MSE of the outputs else."""
    if task == "classification":
        return F.kl_div(F.log_softmax(local, 1), F.softmax(target, 1), reduction="batchmean")
    return F.mse_loss(local, target)


def frozen_copy(decoder: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """D_bar_t as a module: the decoder's architecture with the received weights, no gradients, eval mode."""
    g = copy.deepcopy(decoder)
    g.load_state_dict(state)
    for p in g.parameters():
        p.requires_grad_(False)
    return g.eval()


class MFedObjective(SiteObjective):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.has_global = cfg.encoder_scope != "none"  # local-only has no shared path

    def make_task(self, name: str) -> Task:
        if name == "edges":
            return task_for(name, tolerance=self.cfg.edge_tolerance_px, balance=self.cfg.edge_balance)
        return task_for(name)

    # -- which decoder is this site's ------------------------------------------
    def bind(self, sj: SiteJob) -> str:
        """Check the site's group against its task, the federation and its state; select its decoder."""
        task, kind = mfed_parse_group(sj.group)
        if task != sj.task.name:
            raise ValueError(f"site {sj.data.name} learns {sj.task.name} but its group is {sj.group!r} (a "
                             f"{task} group); fix the group in its site.json or node config")
        if (task, kind) not in self.cfg.slots():
            raise ValueError(f"site {sj.data.name}: group {sj.group!r} is not in this federation (method.tasks / "
                             "method.sites name its tasks and decoders)")
        saved = sj.state.extra.get("group")
        if saved is not None and saved != sj.group:
            raise StateMismatch(f"site {sj.data.name} trained in group {saved!r} and now says {sj.group!r}: a site "
                                "cannot change task or decoder; give it a new name and state-dir instead")
        key = mfed_key(task, kind)
        sj.model.use(key)
        return key

    def global_decoder(self, sj: SiteJob, key: str) -> dict[str, torch.Tensor]:
        """D_bar_t as received (its state dict; empty when nothing of it travels)."""
        prefix = f"decoders.{key}."
        return {n[len(prefix):]: t.detach().clone() for n, t in sj.received.items() if n.startswith(prefix)}

    def weight(self, sj: SiteJob, has_global: bool) -> float:
        cfg = self.cfg
        if not has_global or cfg.decoder_reg == "none":
            return 0.0
        w = cfg.mu if cfg.decoder_reg == "prox" else cfg.gamma
        if cfg.mu_schedule == "linear_ramp":
            w *= min(1.0, sj.job.round / cfg.mu_ramp_rounds)
        return w

    # -- training ------------------------------------------------------------------
    def objective(self, sj: SiteJob, key: str, anchor: dict[str, torch.Tensor], w: float,
                  log: list[float] | None = None) -> LossFn:
        """The local loss of the module docstring, for the site's decoder ``key``."""
        task, reg = sj.task, self.cfg.decoder_reg
        target = frozen_copy(sj.model.decoders[key], anchor) if w and reg in ("output", "consistency") else None

        def loss(m, x, y):
            z = m.encoder(x)
            out = m.decoders[key](z)
            if not w:
                term = out.new_zeros(())
            elif reg == "prox":
                term = prox_term(m.decoders[key], anchor, w)
            elif reg == "output":
                term = w * task.loss(target(z), y)
            else:
                term = w * divergence(task.name, out, target(z))
            if log is not None:
                log[0] += float(term.detach()) * len(y)
                log[1] += len(y)
            return task.loss(out, y) + term

        return loss

    def fit(self, sj: SiteJob) -> dict[str, float]:
        key = self.bind(sj)
        model = sj.model
        decoder = model.decoders[key]
        anchor = self.global_decoder(sj, key)
        flag = (sj.extra or {}).get(HAS_GLOBAL)
        has_global = bool(anchor) and flag is not None and bool(flag.reshape(-1)[0])
        local = sj.state.extra.get("decoder")
        if self.cfg.decoder_init == "keep_local" and local is not None:
            decoder.load_state_dict(local)  # d_k goes on from where this site left it, not from D_bar_t
        log = [0.0, 0]
        w = self.weight(sj, has_global)
        penalty = None
        if w and self.cfg.decoder_reg == "prox":  # a term of the parameters alone: the loop's penalty, so that
            def penalty(m, w=w):  # DP-SGD adds its gradient after clipping and noise instead of dropping it
                term = prox_term(m.decoders[key], anchor, w)
                log[0] += float(term.detach())
                log[1] += 1
                return term
            w = 0.0
        loss = self.objective(sj, key, anchor, w, None if penalty else log)
        out = sj.trainer.fit(model, [*model.encoder.parameters(), *decoder.parameters()], loss,
                             tag=f"r{sj.job.round}", penalty=penalty)
        sj.state.extra["decoder"] = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
        sj.state.extra["group"] = sj.group
        return {**out, "decoder-term": log[0] / max(log[1], 1)}

    # -- evaluation ------------------------------------------------------------------
    def personalized_model(self, sj: SiteJob) -> nn.Module:
        """E_bar + d_k (before the site's first round: what it received)."""
        key = self.bind(sj)
        local = sj.state.extra.get("decoder")
        if local is None:
            return sj.model
        model = copy.deepcopy(sj.model)
        model.decoders[key].load_state_dict(local)
        return model

    def global_model(self, sj: SiteJob) -> nn.Module:
        """E_bar + D_bar_t. An unseen site re-estimates personal encoder BN statistics on its unlabelled data
        (the decoder's statistics are its task group's and stay as received)."""
        self.bind(sj)
        if sj.role != "unseen" or not has_personal_bn(sj.split):
            return sj.model
        model = copy.deepcopy(sj.model)
        reestimate_bn(model.encoder, sj.trainer.batches("bn"))
        return model

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        """A new site: its decoder fine-tuned from D_bar_t on the frozen encoder (local-only: its own model
        trained from the seeded start)."""
        key = self.bind(sj)
        if not self.has_global:
            model = copy.deepcopy(sj.model)
            model.load_state_dict(build_model(sj.job.model, sj.job.method).state_dict())
            model.use(key).to(sj.trainer.device)
            sj.trainer.fit(model, [*model.encoder.parameters(), *model.decoder.parameters()], sj.task_loss,
                           epochs=epochs, tag=f"local{sj.job.round}")
            return model
        model = self.global_model(sj)
        model = copy.deepcopy(model) if model is sj.model else model
        sj.trainer.fit(model, model.decoders[key].parameters(), sj.task_loss, epochs=epochs,
                       tag=f"new{sj.job.round}", eval_modules=[model.encoder])
        return model
