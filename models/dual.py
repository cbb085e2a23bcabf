"""DualFed's two-branch classifier (Zhu et al., ACM MM 2024; spec ``dualfed.md`` section 3).

::

    x -> encoder (shared) -> z in R^d
           z  -> shared_head   Linear(d, C)                                   (shared)
           z  -> projector     Linear(d,d/2)-ReLU-BN1d(d/2)-Linear(d/2,d)-BN1d(d) -> z~   (personal)
           z~ -> personal_head Linear(d, C)                                   (personal)

The attribute names are the contract DualFed's split rules rely on.
``forward`` is the personalized prediction: the sum of both heads' raw logits.
"""

from __future__ import annotations

import torch
from torch import nn


class DualClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, projector_hidden: int | None = None):
        super().__init__()
        d = encoder.out_dim
        h = projector_hidden or d // 2
        self.encoder = encoder
        self.shared_head = nn.Linear(d, num_classes)
        self.projector = nn.Sequential(
            nn.Linear(d, h), nn.ReLU(), nn.BatchNorm1d(h), nn.Linear(h, d), nn.BatchNorm1d(d),
        )
        self.personal_head = nn.Linear(d, num_classes)

    def shared_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The global (generalization) path: encoder + shared head only."""
        return self.shared_head(self.encoder(x))

    def personal_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.personal_head(self.projector(self.encoder(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return self.shared_head(z) + self.personal_head(self.projector(z))
