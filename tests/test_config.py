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
    r = subprocess.run([sys.executable, "-m", "launch.cli", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "run.rounds" in r.stderr
    r = subprocess.run([sys.executable, "-m", "launch.cli", "validate", str(PILOT), "--set", "run.rounds=4"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and json.loads(r.stdout)["run"]["rounds"] == 4


DUALFED = GOOD.replace('name = "fedprox"\nmu = 0.1', 'name = "dualfed"')


def test_method_paper_optimizer_fills_only_the_train_keys_left_unset():
    cfg = load_config(DUALFED)
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.batch_size) == (0.01, 0.5, 64)
    assert cfg.train_from_method == {"lr": 0.01, "momentum": 0.5, "batch_size": 64}
    explicit = load_config(DUALFED + "\n[train]\nlr = 0.05\n", ["train.batch_size=16"])
    assert (explicit.train.lr, explicit.train.momentum, explicit.train.batch_size) == (0.05, 0.5, 16)
    assert explicit.train_from_method == {"momentum": 0.5}
    assert load_config(GOOD).train.lr == 0.05 and load_config(GOOD).train_from_method == {}
    hb = load_config(GOOD, ['method.name="fedhb"'])
    assert hb.train.local_epochs == 2 and hb.train.lr == 0.05
    # the resolved config (config.json) reloads to the same optimizer
    again = KumikiConfig.model_validate(json.loads(cfg.model_dump_json()))
    assert again.train == cfg.train


def test_kumiki_methods_lists_every_method_with_its_knobs_and_paper_optimizer():
    from kumiki.registry import METHODS

    r = subprocess.run([sys.executable, "-m", "launch.cli", "methods"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for name, e in METHODS.items():
        assert f"\n{name}: " in "\n" + r.stdout, name
        for knob in e.config.model_fields:
            if knob != "name":
                assert f"method.{knob} " in r.stdout, (name, knob)
    assert "train.lr = 0.01, train.momentum = 0.5, train.batch_size = 64" in r.stdout
    text = r.stdout
    r = subprocess.run([sys.executable, "-m", "launch.cli", "methods", "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    cat = {m["name"]: m for m in json.loads(r.stdout)}
    assert set(cat) == set(METHODS) and cat["fedhb"]["train_defaults"] == {"local_epochs": 2}
    assert all(k["meaning"] for m in cat.values() for k in m["knobs"]), "every knob says what it means"
    # a default factory's value is shown, never pydantic's marker for "no plain default"
    assert "PydanticUndefined" not in text + json.dumps(cat, default=str)
    assert '= ["classification", "segmentation"]' in text
    assert {k["key"]: k["default"] for k in cat["mfed"]["knobs"]}["method.tasks"] == ["classification", "segmentation"]


def test_a_required_knob_is_listed_as_required():
    from pydantic import Field

    from kumiki.methods.base import MethodConfig
    from kumiki.registry import knobs

    class NeedsTasks(MethodConfig):
        """A method whose operator must name its tasks."""

        tasks: list[str] = Field(min_length=1, description="the tasks")
        mu: float = Field(0.1, description="a weight")

    got = {k["key"]: (k["required"], k["default"]) for k in knobs(NeedsTasks)}
    assert got == {"method.tasks": (True, None), "method.mu": (False, 0.1)}


def test_eval_section_defaults_and_errors():
    assert load_config(GOOD).eval.unseen_adapt_epochs == 5
    assert load_config(GOOD, ["eval.unseen_adapt_epochs=0"]).eval.unseen_adapt_epochs == 0
    with pytest.raises(ConfigError, match="eval.unseen_adapt_epochs"):
        load_config(GOOD, ["eval.unseen_adapt_epochs=-1"])


CLUSTERS = GOOD.replace('partition = { kind = "dirichlet", alpha = 0.5 }', 'partition = { kind = "clusters" }')


def test_cluster_partition_defaults_and_transforms():
    part = load_config(CLUSTERS, ["data.sites=4"]).data.partition
    assert (part.kind, part.clusters, part.cluster_transform) == ("clusters", 4, "label_shift")
    rot = load_config(CLUSTERS, ["data.partition.clusters=2", 'data.partition.cluster_transform="rotation"'])
    assert rot.data.partition.cluster_transform == "rotation"
    # label shift leaves the images alone, so data.domains still applies
    shifted = load_config(CLUSTERS, ["data.partition.clusters=3", 'data.domains=["identity", "invert"]'])
    assert shifted.data.domains == ["identity", "invert"]


@pytest.mark.parametrize("overrides, key, words", [
    ([], "data.partition.clusters", "data.sites = 3"),  # the default 4 clusters need 4 training sites
    (["data.partition.clusters=4", "data.unseen_sites=5"], "data.partition.clusters", "training site"),
    (["data.partition.clusters=1"], "data.partition.clusters", "greater than or equal to 2"),
    (['data.partition.cluster_transform="blur"'], "data.partition.cluster_transform", "label_shift"),
    (["data.partition.alpha=0.3"], "data.partition.alpha", "unknown key"),
    (["data.partition.clusters=2", 'data.partition.cluster_transform="rotation"', 'data.domains=["invert"]'],
     "data.partition.cluster_transform", "data.domains"),
])
def test_cluster_partition_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(CLUSTERS, overrides)
    assert any(p.startswith(key) and words in p for p in e.value.problems), e.value.problems


def test_cli_messages_show_brackets_literally(tmp_path):
    """The console renders markup: a [train] hint or a bracketed value inside an error must not vanish."""
    cfg = tmp_path / "d.toml"
    cfg.write_text(DUALFED)
    r = subprocess.run([sys.executable, "-m", "launch.cli", "validate", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and "set them in [train] to override" in r.stderr
    r = subprocess.run([sys.executable, "-m", "launch.cli", "validate", str(cfg), "--set", 'data.domains=["bogus"]'],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "['bogus']" in r.stderr


def test_every_method_is_its_config_strategy_and_objective_modules_joined_by_one_registry_line():
    """Adding a method touches kumiki/methods/<name>.py, strategies/<name>.py, client/methods/<name>.py and one
    registry line (docs/write-a-method.md): each registered piece lives in the method's own module."""
    from kumiki.methods.base import MethodConfig
    from kumiki.registry import METHODS

    for name, e in METHODS.items():
        assert e.config_ref.startswith(f"kumiki.methods.{name}:"), e.config_ref
        assert e.strategy.startswith(f"strategies.{name}:") and e.objective.startswith(f"client.methods.{name}:")
        cfg = e.config
        assert issubclass(cfg, MethodConfig) and cfg.model_fields["name"].default == name
        assert (ROOT / "kumiki" / "methods" / f"{name}.py").is_file()
    # the shared base holds no method: every config class defined there is the base itself
    from kumiki.methods import base
    assert [c for c in vars(base).values() if isinstance(c, type) and issubclass(c, MethodConfig)] == [MethodConfig]
    # code written before the split still imports from the package, in a fresh interpreter too (nothing loaded yet)
    from kumiki.methods import FedProxConfig, mfed_group
    assert FedProxConfig is METHODS["fedprox"].config and mfed_group("segmentation", "convt") == "task:segmentation"
    r = subprocess.run([sys.executable, "-c", "from kumiki.methods import MFedConfig, MethodConfig; "
                        "print(MFedConfig.__module__, MethodConfig.__module__)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["kumiki.methods.mfed", "kumiki.methods.base"], r.stderr[-500:]
