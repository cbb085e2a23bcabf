"""Config: each malformed key gives an error naming that key; overrides are validated too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kumiki.config import ConfigError, KumikiConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
PILOT = ROOT / "deploy" / "pilot.toml"

GOOD = """
[run]
name = "x"
rounds = 2
[method]
name = "fedprox"
mu = 0.1
[data]
dataset = "digits"
sites = 3
partition = { kind = "dirichlet", alpha = 0.5 }
"""


def test_good_config_fills_defaults():
    cfg = load_config(GOOD)
    assert cfg.run.output_dir == "runs" and cfg.run.seed == 0
    assert cfg.method.name == "fedprox" and cfg.method.mu == 0.1
    assert cfg.data.partition.kind == "dirichlet" and cfg.data.partition.alpha == 0.5
    assert cfg.data.unseen_sites == 0 and cfg.privacy.enabled is False


@pytest.mark.parametrize("override, key", [
    ("run.rounds=0", "run.rounds"),
    ('run.name="has space"', "run.name"),
    ("run.seed=-1", "run.seed"),
    ('method.name="fedmagic"', "method"),
    ("method.mu=-0.5", "method.mu"),
    ("method.lambda=1", "method.lambda"),
    ('data.dataset="cifar10"', "data.dataset"),
    ("data.sites=0", "data.sites"),
    ("data.unseen_sites=-1", "data.unseen_sites"),
    ('data.partition.kind="zipf"', "data.partition"),
    ("data.partition.alpha=0", "data.partition.alpha"),
    ('data.domains=["tilt"]', "data.domains"),
    ("data.test_fraction=1.5", "data.test_fraction"),
    ('model.arch="resnet"', "model.arch"),
    ("train.lr=0", "train.lr"),
    ('train.batch_size="big"', "train.batch_size"),
    ("privacy.enabled=true", "privacy.enabled"),
    ("privacy.delta=2", "privacy.delta"),
    ("server.fraction_train=0", "server.fraction_train"),
    ("bogus.key=1", "bogus"),
    ("data.colour=1", "data.colour"),
])
def test_malformed_key_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(GOOD, [override])
    assert any(p.startswith(key) for p in e.value.problems), e.value.problems


def test_missing_required_section_and_file():
    with pytest.raises(ConfigError, match="run: Field required"):
        load_config('[method]\nname = "fedavg"\n[data]\nsites = 2\n')
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/kumiki.toml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(GOOD, ["run.rounds"])


def test_set_overrides_any_key_with_types():
    # Switching method starts the new method from its defaults; its knobs may come in any order.
    cfg = load_config(GOOD, ["run.rounds=7", "method.ft_epochs=3", 'method.name="fedavg_ft"', 'data.domains=["rot90", "invert"]'])
    assert cfg.run.rounds == 7 and cfg.method.name == "fedavg_ft" and cfg.method.ft_epochs == 3
    assert cfg.data.domains == ["rot90", "invert"]
    assert load_config(GOOD, ['method.name="fedprox"']).method.mu == 0.1  # same method: knobs kept
    with pytest.raises(ConfigError, match="method.mu: unknown key"):  # a knob the method does not have
        load_config(GOOD, ['method.name="fedavg"', "method.mu=0.1"])


def test_pilot_config_is_valid_and_schema_names_the_contract_keys():
    assert load_config(PILOT).run.name == "pilot"
    schema = json.dumps(KumikiConfig.model_json_schema())
    for key in ("output_dir", "unseen_sites", "partition", "alpha", "classes_per_site", "enabled"):
        assert f'"{key}"' in schema


def test_cli_validate_reports_key_and_exit_code(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("rounds = 2", "rounds = -3"))
    r = subprocess.run([sys.executable, "-m", "kumiki.cli", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "run.rounds" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kumiki.cli", "validate", str(PILOT), "--set", "run.rounds=4"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and json.loads(r.stdout)["run"]["rounds"] == 4
