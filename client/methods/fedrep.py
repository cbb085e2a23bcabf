"""FedRep site update (Collins et al., ICML 2021, arXiv 2102.07078).

Receive the representation phi (everything but the head: ``encoder.*`` on the classifiers, the embeddings
and blocks of the language model); keep the personal head h_k (``head.*``).

1. phi frozen: ``head_epochs`` (tau_h) epochs of SGD on the head; the body runs in
   eval mode, so phi (BN running statistics included) is bit-identical afterwards;
2. the new head frozen: ``body_epochs`` (tau_phi) epochs of SGD on phi;

each a ``Trainer.fit`` call (fresh optimizer, same lr), then upload phi.
No zero-shot global path; unseen sites fit a fresh head on the frozen phi, as FedPer's.
"""

from __future__ import annotations

from torch import nn

from client.methods.base import SiteJob, SiteObjective
from client.methods.fedper import body_modules, body_parameters, fresh_head_on_frozen_body


class FedRepObjective(SiteObjective):
    has_global = False

    def fit(self, sj: SiteJob) -> dict[str, float]:
        model, tag = sj.model, f"r{sj.job.round}"
        head = sj.trainer.fit(model, model.head.parameters(), sj.task_loss, epochs=self.cfg.head_epochs,
                              tag=f"{tag}:head", eval_modules=body_modules(model))
        body = sj.trainer.fit(model, body_parameters(model), sj.task_loss, epochs=self.cfg.body_epochs,
                              tag=f"{tag}:body")
        return {"loss": body["loss"], "examples": body["examples"], "head-loss": head["loss"]}

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        return fresh_head_on_frozen_body(sj, epochs)
