"""BatchNorm statistics for a site that never trained: re-estimate them on its own data.

Where a method keeps BN running statistics personal (DualFed always, FedHB with
``bn_stats = personal``), an unseen site has none of its own, and the seeded
initial statistics (mean 0, variance 1) are meaningless for a trained model. The
shared path then needs an explicit policy (DualFed spec, section 8): forward passes
in train mode over the site's own unlabelled training split, no weight update, so
nothing personal travels (``target_reestimate``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kumiki.split import ParamSplit

BN_STATS = ("running_mean", "running_var")


def has_personal_bn(split: ParamSplit) -> bool:
    """True when the split keeps some BatchNorm running statistics at home."""
    return any(name.endswith(BN_STATS) for name in split.personal)


@torch.no_grad()
def reestimate_bn(module: nn.Module, batches: Iterable) -> None:
    """Recompute every BN layer's running statistics in ``module`` as the average over ``batches``."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    was_training = module.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    module.train()
    for xb, _ in batches:
        module(xb)
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    module.train(was_training)
