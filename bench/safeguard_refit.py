"""Does the safeguard's refit help? The own model's recipe trained on the fit part against the whole split.

    .venv/bin/python bench/safeguard_refit.py runs/pilot --seeds 3      # any finished run with the pilot's factories

Outside the federation: for each training factory of a finished run (its ``sites/`` folders), the own model's
recipe (the plain classifier from the run's seeded initialization, the run's ``[train]`` knobs, one pass of
``train.local_epochs`` per round for ``--rounds`` rounds) is trained on the fit part (the training split less
the safeguard's holdout) and on the whole training split, from the same initialization with ``--seeds`` batch
orders each, and scored on the factory's test split. Prints the mean test accuracy of each (issue 24: the
refit was measured no better; docs/safeguard.md). Seconds to minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from client import safeguard
    from client.loop import Trainer, cross_entropy, evaluate
    from kumiki.config import validate
    from kumiki.data.sites import load_site
    from models import build_model
    from server.federation import model_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None, help="default: the run's rounds")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    raw = json.loads((a.run_dir / "config.json").read_text())
    raw.pop("engine", None)  # recorded beside the config, not a config key
    cfg = validate(raw)
    spec, rounds = model_spec(cfg), a.rounds or cfg.run.rounds
    names = [n for n in cfg.data.site_names[:cfg.data.sites]] or sorted(
        d.name for d in (a.run_dir / "sites").iterdir())[:cfg.data.sites]
    res: dict[str, list[float]] = {"fit part": [], "whole split": []}
    for site in names:
        data = load_site(a.run_dir / "sites" / site)
        fit, _ = safeguard.split(data, cfg.safeguard.val_fraction)
        for label, d in (("fit part", fit), ("whole split", data)):
            for s in range(a.seeds):
                model = build_model(spec, "plain")
                for r in range(1, rounds + 1):
                    Trainer(d.x_train, d.y_train, cfg.train, seed=f"refit{s}:{site}:{r}:{label}").fit(
                        model, model.parameters(), cross_entropy, tag=f"r{r}")
                res[label].append(evaluate(model, data.x_test, data.y_test)["score"])
    for label, v in res.items():
        print(f"{label}: {100 * np.mean(v):.1f}% ± {100 * np.std(v) / np.sqrt(len(v)):.1f} (standard error; "
              f"{len(v)} models, {len(names)} factories x {a.seeds} seeds, {rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
