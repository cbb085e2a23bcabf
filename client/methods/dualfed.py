"""DualFed site update (Zhu et al., ACM MM 2024; spec ``dualfed.md`` sections 4 and 8).

Round t, after the shared encoder theta and shared head omega are loaded (projector
phi_i, personal head psi_i and all BN buffers keep their persisted values):

Stage A, ``stage_epochs`` over the local data; trains theta, phi_i, psi_i (omega frozen,
not even in the graph)::

    z = f_theta(x),  z~ = g_phi(z),  L_A = CE(h_psi(z~), y) + lambda * L_con(z~, y)

Stage B, ``stage_b_epochs`` at ``stage_b_lr``; trains omega only, on the frozen encoder's features::

    L_B = CE(h_omega(f_theta(x)), y)

Each stage is one ``Trainer.fit`` call, so each gets a fresh SGD. The model stays in
train mode (BN batch statistics; the encoder's running statistics keep updating in
stage B unless ``stage_b_bn_mode = eval``). L_con is supervised contrastive loss on
u_a = z~_a / ||z~_a||, with P(a) = {p != a : y_p = y_a} (code ``utils/Loss.py``)::

    L_con = (1/|B|) sum_a -(1/(|P(a)| + 1e-6)) sum_{p in P(a)} log( exp(u_a.u_p/tau) / sum_{b != a} exp(u_a.u_b/tau) )

Prediction: personalized = h_psi(z~) + h_omega(z) (raw logits); global = h_omega(z).
On an unseen site the global path's BN statistics are re-estimated from its
unlabelled train split (``unseen_bn = target_reestimate``, ``client.bn``); nothing
personal travels. Its adapted model is the spec's new-client procedure (``adapt_unseen``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from client.methods.base import SiteJob, SiteObjective
from models import build_model


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


class DualFedObjective(SiteObjective):
    def stage_a_loss(self, sj: SiteJob, supcon_log: list[float] | None = None):
        """L_A = CE(h_psi(z~), y) + lambda * L_con(z~, y) with z~ = g_phi(f_theta(x)); omega is not in the graph."""
        cfg, lam = self.cfg, self.cfg.supcon_weight(sj.job.model.norm)

        def loss(m, x, y):
            z_tilde = m.projector(m.encoder(x))
            con = supcon_loss(z_tilde, y, cfg.con_temp)
            if supcon_log is not None:
                supcon_log[0] += float(con.detach()) * len(y)
                supcon_log[1] += len(y)
            return F.cross_entropy(m.personal_head(z_tilde), y) + lam * con

        return loss

    @staticmethod
    def stage_b_loss(m, x, y):
        """L_B = CE(h_omega(f_theta(x)), y): the shared head on the (frozen) encoder's features."""
        return F.cross_entropy(m.shared_logits(x), y)

    def fit(self, sj: SiteJob) -> dict[str, float]:
        model, cfg, tag = sj.model, self.cfg, f"r{sj.job.round}"
        supcon = [0.0, 0]
        main = [*model.encoder.parameters(), *model.projector.parameters(), *model.personal_head.parameters()]
        a = sj.trainer.fit(model, main, self.stage_a_loss(sj, supcon), epochs=cfg.stage_epochs, tag=f"{tag}:A")
        b = self.fit_shared_head(sj, model, f"{tag}:B")
        return {"loss": a["loss"], "examples": a["examples"],
                "supcon": supcon[0] / max(supcon[1], 1), "stage-b-loss": b["loss"]}

    def fit_shared_head(self, sj: SiteJob, model: nn.Module, tag: str) -> dict[str, float]:
        """Stage B. In ``eval`` BN mode the frozen encoder is a fixed function, so its features are
        computed once and the head trains on them (the same SGD, one encoder pass for all epochs).
        ``balanced_head`` adds the log of the site's label prior to the logits in the loss
        (balanced softmax): the head then fits p(x|y) up to a constant instead of the site's p(y|x), so
        the average over label-skewed sites is not pulled toward each site's frequent labels."""
        cfg, epochs = self.cfg, self.cfg.stage_b_epochs
        balanced = cfg.balanced(sj.job.privacy.enabled)
        lr = cfg.head_lr(sj.job.train.lr, sj.job.privacy.enabled)
        shift = self.log_prior(sj, model.shared_head.out_features) if balanced else 0.0
        if cfg.stage_b_bn_mode == "train":
            loss = (lambda m, x, y: F.cross_entropy(m.shared_logits(x) + shift, y)) if balanced else self.stage_b_loss
            return sj.trainer.fit(model, model.shared_head.parameters(), loss, epochs=epochs, lr=lr, tag=tag)
        model.encoder.eval()
        with torch.no_grad():
            z = torch.cat([model.encoder(x) for x in sj.trainer.x.split(1024)])
        head_loss = lambda m, x, y: F.cross_entropy(m(x) + shift, y)  # noqa: E731 - m is the shared head here
        return sj.trainer.fit(model.shared_head, model.shared_head.parameters(), head_loss, epochs=epochs, lr=lr,
                              tag=tag, data=(z, sj.trainer.y))

    @staticmethod
    def log_prior(sj: SiteJob, classes: int) -> torch.Tensor:
        """log p_site(y) from the site's train labels (a label it lacks gets log(1e-6): no gradient to speak of)."""
        counts = torch.bincount(sj.trainer.y.long().cpu(), minlength=classes).double()
        return (counts / counts.sum()).clamp_min(1e-6).log().float().to(sj.trainer.device)

    def predict_personal(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)  # h_psi(g_phi(z)) + h_omega(z)

    def predict_global(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.shared_logits(x)

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        """New-client personalization (spec section 8): theta and omega frozen (BN statistics
        re-estimated on the site's data, then fixed), a fresh seeded projector and personal head
        trained with the stage-A loss; evaluated as the ensemble."""
        model = self.global_model(sj)
        model = copy.deepcopy(model) if model is sj.model else model
        fresh = build_model(sj.job.model, sj.job.method)
        model.projector.load_state_dict(fresh.projector.state_dict())
        model.personal_head.load_state_dict(fresh.personal_head.state_dict())
        model.to(sj.trainer.device)
        params = [*model.projector.parameters(), *model.personal_head.parameters()]
        sj.trainer.fit(model, params, self.stage_a_loss(sj), epochs=epochs, tag=f"new{sj.job.round}",
                       eval_modules=[model.encoder])
        return model
