"""DualFed site update (Zhu et al., ACM MM 2024; spec ``dualfed.md`` sections 4 and 8).

Round t, after the shared encoder theta and shared head omega are loaded (projector
phi_i, personal head psi_i and all BN buffers keep their persisted values):

Stage A, ``stage_epochs`` over the local data; trains theta, phi_i, psi_i (omega frozen,
not even in the graph)::

    z = f_theta(x),  z~ = g_phi(z),  L_A = CE(h_psi(z~), y) + lambda * L_con(z~, y)

Stage B, ``stage_epochs``; trains omega only, on the frozen encoder's features::

    L_B = CE(h_omega(f_theta(x)), y)

Each stage is one ``Trainer.fit`` call, so each gets a fresh SGD. The model stays in
train mode (BN batch statistics; the encoder's running statistics keep updating in
stage B unless ``stage_b_bn_mode = eval``). L_con is supervised contrastive loss on
u_a = z~_a / ||z~_a||, with P(a) = {p != a : y_p = y_a} (code ``utils/Loss.py``)::

    L_con = (1/|B|) sum_a -(1/(|P(a)| + 1e-6)) sum_{p in P(a)} log( exp(u_a.u_p/tau) / sum_{b != a} exp(u_a.u_b/tau) )

Prediction: personalized = h_psi(z~) + h_omega(z) (raw logits); global = h_omega(z).
On an unseen site the global path's BN statistics are re-estimated from its
unlabelled train split (``unseen_bn = target_reestimate``); nothing personal travels.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from client.methods.base import SiteJob, SiteObjective


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss (module docstring); anchors without positives add 0 but count in |B|."""
    u = F.normalize(features, dim=1)
    logits = u @ u.T / tau
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    # log of the softmax over b != a, as a stable log-sum-exp (same value as the code's exp/sum)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    per_anchor = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1) / (positives.sum(1) + 1e-6)
    return -per_anchor.mean()


@torch.no_grad()
def reestimate_bn(module: nn.Module, batches) -> None:
    """Recompute every BN layer's running statistics in ``module`` as the average over ``batches``."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    module.train()
    for xb, _ in batches:
        module(xb)
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom


class DualFedObjective(SiteObjective):
    def fit(self, sj: SiteJob) -> dict[str, float]:
        model, cfg, tag = sj.model, self.cfg, f"r{sj.job.round}"
        supcon_sum = [0.0, 0]

        def stage_a(m, x, y):
            z_tilde = m.projector(m.encoder(x))
            con = supcon_loss(z_tilde, y, cfg.con_temp)
            supcon_sum[0] += float(con.detach()) * len(y)
            supcon_sum[1] += len(y)
            return F.cross_entropy(m.personal_head(z_tilde), y) + cfg.con_lambda * con

        def stage_b(m, x, y):
            if cfg.stage_b_bn_mode == "eval":
                m.encoder.eval()
            return F.cross_entropy(m.shared_logits(x), y)

        main = [*model.encoder.parameters(), *model.projector.parameters(), *model.personal_head.parameters()]
        a = sj.trainer.fit(model, main, stage_a, epochs=cfg.stage_epochs, tag=f"{tag}:A")
        b = sj.trainer.fit(model, model.shared_head.parameters(), stage_b, epochs=cfg.stage_epochs, tag=f"{tag}:B")
        return {"loss": a["loss"], "examples": a["examples"],
                "supcon": supcon_sum[0] / max(supcon_sum[1], 1), "stage-b-loss": b["loss"]}

    def predict_personal(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)  # h_psi(g_phi(z)) + h_omega(z)

    def global_model(self, sj: SiteJob) -> nn.Module:
        if sj.role != "unseen":
            return sj.model  # the shared path with this site's own BN statistics
        model = copy.deepcopy(sj.model)
        reestimate_bn(model.encoder, sj.trainer.batches("bn"))
        return model

    def predict_global(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.shared_logits(x)
