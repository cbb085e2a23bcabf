"""train.optimizer / betas / grad_clip: the one loop builds the optimizer the config names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client.loop import Trainer
from kumiki.config import ConfigError, TrainSection, load_config

X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
Y = np.arange(8, dtype=np.int64) % 2


def _one_step(**train) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight before, weight after) one full-batch step of a linear model."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    cfg = TrainSection(batch_size=8, lr=0.1, **train)
    Trainer(X, Y, cfg, seed=0, device=torch.device("cpu")).fit(model, model.parameters(), epochs=1)
    return before, model.weight.detach().clone()


def test_adam_first_step_moves_every_weight_by_lr():
    before, after = _one_step(optimizer="adam")
    # Adam's first step is lr * g / (|g| + eps) per coordinate: every coordinate moves by ~lr (SGD's would not).
    np.testing.assert_allclose((after - before).abs().numpy(), 0.1, rtol=1e-3)
    _, sgd = _one_step()
    assert not torch.allclose((sgd - before).abs(), torch.full_like(before, 0.1), rtol=1e-3)


def test_adamw_decays_weights_decoupled():
    before, plain = _one_step(optimizer="adamw")
    _, decayed = _one_step(optimizer="adamw", weight_decay=0.5)
    # AdamW: w <- w (1 - lr wd) - lr * adam_step, so the difference is exactly lr * wd * w.
    np.testing.assert_allclose((plain - decayed).numpy(), (0.1 * 0.5 * before).numpy(), rtol=1e-4, atol=1e-6)


def test_grad_clip_bounds_the_sgd_step():
    before, free = _one_step()
    _, clipped = _one_step(grad_clip=1e-3)
    assert float((free - before).norm()) > 1e-3 * 0.1 * 1.5
    # the step is lr * g with ||g|| <= clip (weight and bias together)
    assert float((clipped - before).norm()) <= 0.1 * 1e-3 + 1e-7


def test_momentum_with_adam_is_a_config_error():
    raw = "[run]\nname='x'\nrounds=1\n[method]\nname='fedavg'\n[data]\nsites=2\n[train]\noptimizer='adam'\nmomentum=0.5\n"
    with pytest.raises(ConfigError, match="train.momentum applies to sgd only"):
        load_config(raw)
    cfg = load_config(raw.replace("momentum=0.5", "betas=[0.9, 0.95]"))
    assert cfg.train.betas == [0.9, 0.95]


def test_adam_couples_weight_decay_unlike_adamw():
    _, adam = _one_step(optimizer="adam", weight_decay=0.5)
    _, adamw = _one_step(optimizer="adamw", weight_decay=0.5)
    assert not torch.allclose(adam, adamw, atol=1e-5)
