"""FedHB site step (Kim & Hospedales, arXiv 2305.04979 v1; spec ``fedhb.md`` sections 5, 7, 10).

The server sends L_0 = (m, w): the global posterior mean m as the model's tensors and
the per-coordinate precision w under ``extra`` (``precision/<tensor>``). With
q_i = N(m_i, eps^2 I) and eps -> 0, the site minimizes its block of the negative
ELBO (spec section 5, mean-reduced CE, n_i = |D_i|)::

    J_i(m_i) = mean_{(x,y) in D_i} CE(f(x; m_i), y) + (1/(2 n_i)) sum_k w_k (m_ik - m_k)^2

i.e. a FedProx-type problem with a per-coordinate pull mu_k = w_k / n_i, starting
from m_i <- m (``client_init = global``) or from the site's last m_i (``warm``).

``prox_update = implicit`` (default): SGD steps on the CE term only, each followed by
the exact proximal step of the prior term (unconditionally stable)::

    m_ik <- (m_ik + lr mu_k m_k) / (1 + lr mu_k)  =  argmin_x (x - m_ik)^2/(2 lr) + (mu_k/2)(x - m_k)^2

``explicit``: the quadratic is added to every minibatch loss (gradient mu_k (m_ik - m_k)).

The uploaded m_i is also kept in the site state (``extra['m_i']``, used by ``warm``).
Personalization (spec section 10): before personalized evaluation the site solves
J_i from L_0 for ``personalize_epochs`` on a private copy and evaluates that copy; it
never reaches the server. Global prediction: the posterior mean m itself. An unseen
site runs the same held-out personalization (spec section 10, the method's main claim)
for ``eval.unseen_adapt_epochs``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from client.methods.base import SiteJob, SiteObjective


class FedHBObjective(SiteObjective):
    def _pull(self, sj: SiteJob, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (m_k, mu_k = w_k / n_i) for every parameter the server gave a precision for."""
        prefix, n = self.cfg.precision_prefix, sj.data.num_train
        extra = sj.extra or {}
        out = {}
        for name, p in model.named_parameters():
            if prefix + name in extra and name in sj.received:
                w = extra[prefix + name].to(p.device, p.dtype)
                out[name] = (sj.received[name].detach().to(p.device, p.dtype), w / n)
        return out

    def solve(self, sj: SiteJob, model: nn.Module, epochs: int | None, tag: str) -> dict[str, float]:
        """Minimize J_i from ``model``'s current weights (module docstring)."""
        pull = self._pull(sj, model)
        lr, task_loss = sj.trainer.cfg.lr, sj.task_loss
        if self.cfg.prox_update == "explicit":  # the prior is the loop's penalty: under DP it acts after the noise
            def prior(m):
                params = dict(m.named_parameters())
                return 0.5 * sum((mu * (params[k] - anchor).pow(2)).sum() for k, (anchor, mu) in pull.items())
            return sj.trainer.fit(model, model.parameters(), task_loss, epochs=epochs, tag=tag,
                                  penalty=prior if pull else None)

        @torch.no_grad()
        def implicit_step(m: nn.Module) -> None:
            params = dict(m.named_parameters())
            for k, (anchor, mu) in pull.items():
                a = lr * mu
                params[k].copy_((params[k] + a * anchor) / (1 + a))

        return sj.trainer.fit(model, model.parameters(), task_loss, epochs=epochs, tag=tag,
                              after_step=implicit_step if pull else None)

    def fit(self, sj: SiteJob) -> dict[str, float]:
        last = sj.state.extra.get("m_i")
        if self.cfg.client_init == "warm" and last:
            sj.model.load_state_dict(last, strict=False)
        metrics = self.solve(sj, sj.model, None, f"r{sj.job.round}")
        sj.state.extra["m_i"] = {k: p.detach().cpu().clone() for k, p in sj.model.named_parameters()}
        return metrics

    def personalize(self, sj: SiteJob, epochs: int) -> nn.Module:
        """J_i solved from L_0 on a private copy (spec section 10); never reaches the server."""
        model = copy.deepcopy(sj.model)  # starts from L_0's mean m
        if epochs > 0:
            self.solve(sj, model, epochs, f"p{sj.job.round}")
        return model

    def personalized_model(self, sj: SiteJob) -> nn.Module:
        return self.personalize(sj, self.cfg.personalize_epochs)

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        return self.personalize(sj, epochs)
