"""Plain classifier: ``encoder.*`` then one linear ``head.*``.

The two attribute names are the contract split rules rely on
(FedPer/FedRep personalize ``head.*``, fine-tuning can touch only ``head.*``).
"""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
