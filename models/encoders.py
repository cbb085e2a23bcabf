"""Encoders x -> z in R^d: CNN-S for small grayscale images and an MLP."""

from __future__ import annotations

import torch
from torch import nn


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def _norm1d(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "group":
        return nn.GroupNorm(min(8, width), width)
    return nn.Identity()


def cnn_trunk(channels: int, norm: str = "batch") -> nn.Sequential:
    """CNN-S's convolutions: (C, H, W) -> a (64, H/4, W/4) feature map (M-Fed's dense decoders read it)."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), _norm2d(norm, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), _norm2d(norm, 64), nn.ReLU(), nn.MaxPool2d(2),
    )


class CNNEncoder(nn.Module):
    """CNN-S: two conv-norm-ReLU-pool blocks, then Linear to d (the DualFed spec's small encoder)."""

    def __init__(self, input_shape: tuple[int, int, int], hidden: int = 128, norm: str = "batch"):
        super().__init__()
        c, h, w = input_shape
        self.features = cnn_trunk(c, norm)
        flat = 64 * (h // 4) * (w // 4)
        self.fc = nn.Linear(flat, hidden)
        self.out_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.features(x).flatten(1)))


class MLPEncoder(nn.Module):
    """Flatten -> Linear-norm-ReLU -> Linear-ReLU; d = hidden // 2."""

    def __init__(self, input_shape: tuple[int, int, int], hidden: int = 128, norm: str = "batch"):
        super().__init__()
        c, h, w = input_shape
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), _norm1d(norm, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden // 2), nn.ReLU(),
        )
        self.out_dim = hidden // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ENCODERS = {"cnn": CNNEncoder, "mlp": MLPEncoder}
