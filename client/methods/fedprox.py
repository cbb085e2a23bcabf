"""FedProx site objective (Li et al., 2020).

    h_k(w) = F_k(w) + (mu / 2) * ||w - w_t||^2

added to every minibatch loss, over the tensors received from the server
(w_t); its gradient is mu * (w - w_t).
"""

from __future__ import annotations

import torch

from client.loop import LossFn
from client.methods.base import SiteJob, SiteObjective


def proximal_term(model: torch.nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    params = dict(model.named_parameters())
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, ref in anchor.items():
        if name in params:
            total = total + (params[name] - ref.to(total.device)).pow(2).sum()
    return 0.5 * mu * total


class FedProxObjective(SiteObjective):
    def loss(self, sj: SiteJob) -> LossFn:
        mu, task_loss = self.cfg.mu, sj.task_loss
        anchor = {k: v.detach().clone() for k, v in sj.received.items() if v.is_floating_point()}

        def fn(model, x, y):
            return task_loss(model, x, y) + proximal_term(model, anchor, mu)

        return fn
