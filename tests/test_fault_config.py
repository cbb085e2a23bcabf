"""Fault family: configs that used to validate and then break at run time (issue 7) now fail fast, by key."""

from __future__ import annotations

import pytest

from kumiki.config import ConfigError, load_config

BASE = """
[run]
name = "x"
rounds = 2
[method]
name = "fedprox"
[data]
dataset = "digits"
sites = 3
"""


@pytest.mark.parametrize("override, key, words", [
    ("train.weight_decay=inf", "train.weight_decay", "finite"),
    ("method.mu=inf", "method.mu", "finite"),
    ("server.round_timeout_s=nan", "server.round_timeout_s", "finite"),
    ('method.mu="0.1"', "method.mu", "valid number"),
    ("method.mu=true", "method.mu", "valid number"),
    ("train.local_epochs=2.0", "train.local_epochs", "valid integer"),
    ("run.rounds=true", "run.rounds", "valid integer"),
    ("data.input_shape=[0, -1, 8]", "data.input_shape.0", "greater than or equal to 1"),
    ("data.sites=1000", "data.sites", "at most 89 sites"),
], ids=lambda v: str(v)[:24])
def test_bad_values_are_rejected_by_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, [override, 'data.dataset="site-folders"', 'data.path="/x"', "data.num_classes=10"]
                    if key.startswith("data.input") else [override])
    assert key in str(e.value) and words in str(e.value), str(e.value)


def test_integers_still_fill_float_keys():
    cfg = load_config(BASE, ["method.mu=1", "train.lr=1"])
    assert cfg.method.mu == 1.0 and isinstance(cfg.train.lr, float)
