"""Shared test helpers: small seeded configs on digits (always installed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# one torch thread per site process (client/threads.py honours it; so do the processes tests start)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from kumiki.config import KumikiConfig, validate  # noqa: E402


def make_config(tmp_path: Path, method: str = "fedavg", rounds: int = 2, sites: int = 3, unseen: int = 0,
                arch: str = "mlp", alpha: float | None = 0.3, name: str = "t", knobs: dict | None = None,
                **sections) -> KumikiConfig:
    """A small digits config; ``knobs`` are method knobs, ``sections`` merge into sections (train={...})."""
    raw = {
        "run": {"name": name, "rounds": rounds, "seed": 0, "output_dir": str(tmp_path / "runs")},
        "method": {"name": method, **(knobs or {})},
        "data": {"dataset": "digits", "sites": sites, "unseen_sites": unseen,
                 "partition": {"kind": "dirichlet", "alpha": alpha} if alpha else {"kind": "iid"}},
        "model": {"arch": arch, "hidden": 64},
        "train": {"batch_size": 32, "lr": 0.05},
        # in-process sites answer at once; a short bound keeps a hung discovery from stalling a test
        "server": {"discovery_timeout_s": 20.0},
        # the safeguard (on by default for operators) holds out validation records and trains a second model per
        # site: off in these small configs so each test's measured numbers stay those of the method alone;
        # tests/test_safeguard.py (safeguard={...}) and the CLI and pilot tests run it
        "safeguard": {"enabled": False},
        # every round evaluated, as the tests' rows expect (eval.every = "auto" would skip rounds when evaluation
        # trains, e.g. unseen sites' adaptation): tests/test_eval_plan.py tests "auto"
        "eval": {"every": 1},
    }
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    return validate(raw)


#: the tiny LM of language tests (about 135k parameters): width 64, 2 blocks, 2 heads, 32-byte context
TINY_LM = {"hidden": 64, "blocks": 2, "heads": 2, "context": 32}
#: the baselines' optimizer on language data: WorldLM's (spec worldlm.md section 9)
LM_TRAIN = {"optimizer": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "grad_clip": 1.0, "batch_size": 16}


def make_lm_config(tmp_path: Path, method: str = "worldlm", rounds: int = 4, name: str | None = None,
                   knobs: dict | None = None, federation: dict | None = None, sites: int = 4, unseen: int = 0,
                   samples: int = 64, **sections) -> KumikiConfig:
    """A small language config: the synthetic byte-Markov tree (pairs of sites per region), the tiny LM,
    4 local steps for WorldLM and HierFAVG (one epoch of 51 sequences: the baselines' budget)."""
    from kumiki.registry import entry

    steps = "local_steps" in entry(method).config.model_fields
    raw = {"run": {"name": name or method, "rounds": rounds, "seed": 0, "output_dir": str(tmp_path / "runs")},
           "method": {"name": method, **({"local_steps": 4} if steps else {}), **(knobs or {})},
           "data": {"dataset": "markov", "sites": sites, "unseen_sites": unseen, "samples_per_site": samples},
           "model": dict(TINY_LM), "server": {"discovery_timeout_s": 20.0}, "eval": {"every": 1}}
    if not steps:
        raw["train"] = dict(LM_TRAIN)
    if federation is not None:
        raw["federation"] = federation
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    return validate(raw)


def language_method(method: str) -> bool:
    """Methods that need language data or a federation tree (they run on the Markov tree in generic tests)."""
    from kumiki.registry import entry

    cfg = entry(method).config
    return cfg.hierarchical or cfg.tasks_supported == ("language",)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is several times faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def untimed(record) -> dict:
    """A reply's metrics without the seconds the site took (``fit-time-s``, ``eval-time-s``): what a replay must
    reproduce exactly."""
    return {k: v for k, v in dict(record).items() if not str(k).endswith("-time-s")}


def personalized_means(tmp_path: Path, methods: tuple[str, ...], **kw) -> dict[str, float]:
    """Last-round personalized mean accuracy of each method on the same small config."""
    from launch.engines.inprocess import run_inprocess

    return {m: run_inprocess(make_config(tmp_path, method=m, name=m, **kw), quiet=True)["personalized"]["mean"]
            for m in methods}


def config_file(tmp_path: Path, name: str, rounds: int, data: str = 'dataset = "digits"\nsites = 2') -> Path:
    """A small TOML config on disk (for CLI tests): FedAvg, MLP, outputs under tmp_path/runs."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[run]\nname = "{name}"\nrounds = {rounds}\noutput_dir = "{tmp_path / "runs"}"\n'
                    f'[method]\nname = "fedavg"\n[data]\n{data}\n[model]\narch = "mlp"\n')
    return path
