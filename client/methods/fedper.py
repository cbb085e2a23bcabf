"""FedPer site update (Arivazhagan et al., arXiv 1912.00818).

Load the received base (``encoder.*``), keep the site's own head (``head.*``,
personal by the split), train all layers jointly for E epochs, upload the base.

There is no shared head, hence no zero-shot global path (``has_global = False``).
An unseen site gets the baselines spec's new-client protocol, also FedRep's: a
fresh seeded head fitted for ``eval.unseen_adapt_epochs`` on the frozen base (BN
statistics frozen too) on the site's own train split.
"""

from __future__ import annotations

import copy

from torch import nn

from client.methods.base import SiteJob, SiteObjective
from models import build_model


def body_modules(model: nn.Module) -> list[nn.Module]:
    """Everything but the head: the classifiers' ``encoder``, the language model's embeddings and blocks."""
    return [m for n, m in model.named_children() if n != "head"]


def body_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in body_modules(model) for p in m.parameters()]


def fresh_head_on_frozen_body(sj: SiteJob, epochs: int) -> nn.Module:
    """A private copy of the model whose head is re-initialized and fitted with the body frozen."""
    model = copy.deepcopy(sj.model)
    model.head.load_state_dict(build_model(sj.job.model, sj.job.method).head.state_dict())
    model.to(sj.trainer.device)
    if epochs > 0:
        sj.trainer.fit(model, model.head.parameters(), sj.task_loss, epochs=epochs, tag=f"newhead{sj.job.round}",
                       eval_modules=body_modules(model))
    return model


class FedPerObjective(SiteObjective):
    """Training is the base objective's (all layers, CE); only the split differs from FedAvg."""

    has_global = False

    def adapt_unseen(self, sj: SiteJob, epochs: int) -> nn.Module:
        return fresh_head_on_frozen_body(sj, epochs)
