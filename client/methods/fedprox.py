"""FedProx site objective (Li et al., 2020).

    h_k(w) = F_k(w) + (mu / 2) * ||w - w_t||^2

added to every minibatch loss, over the tensors received from the server
(w_t); its gradient is mu * (w - w_t). The term is the loop's ``penalty`` (it never sees the data), so under
DP-SGD its gradient is added after clipping and noise rather than lost.
"""

from __future__ import annotations

import torch

from client.loop import Penalty
from client.methods.base import SiteJob, SiteObjective


def proximal_term(model: torch.nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    params = dict(model.named_parameters())
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, ref in anchor.items():
        if name in params:
            total = total + (params[name] - ref.to(total.device)).pow(2).sum()
    return 0.5 * mu * total


def anchored(sj: SiteJob, mu: float) -> Penalty:
    """(mu / 2) ||w - w_t||^2 over the received floating tensors, as the loop's ``penalty``."""
    anchor = {k: v.detach().clone() for k, v in sj.received.items() if v.is_floating_point()}
    return lambda model: proximal_term(model, anchor, mu)


class FedProxObjective(SiteObjective):
    def penalty(self, sj: SiteJob) -> Penalty:
        return anchored(sj, self.cfg.mu)
