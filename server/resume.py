"""Server resume: continue a run from its last server checkpoint, as if it had never stopped.

After every round the round driver writes ``checkpoints/resume.npz`` (atomically, beside the model export
``checkpoints/global.npz``): the round, ``KumikiStrategy.state_dict()``'s arrays (shared, group and method
tensors such as FedHB's precision) and its JSON-able state (accepted rounds per site, spent budgets, central
DP releases, the sampling RNG) as ``__meta__``.

``resume_point(cfg)`` says where a run continues: the checkpoint's round, after checking that the config is
the run's own (only the keys in ``MAY_CHANGE`` may differ, e.g. more ``run.rounds``). Sites keep their state
files; a site asked to train a round it already trained (the server died after the site's reply, before its
checkpoint) trains it again from the state it had before (``client.state``), so nothing is repeated or skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kumiki.atomic import atomic_npz

RESUME_FILE = "resume.npz"
#: config keys a resumed run may change: how long it runs and operational timeouts, never what it computes
MAY_CHANGE = ("run.rounds", "run.output_dir", "server.round_timeout_s", "server.discovery_timeout_s", "train.device")


class ResumeError(RuntimeError):
    """The run cannot be resumed; the message says why and what to do."""


def write_resume_state(strategy, ck_dir: Path, rnd: int) -> None:
    arrays, meta = strategy.state_dict()
    atomic_npz(ck_dir / RESUME_FILE, __round__=np.array(rnd), __meta__=np.array(json.dumps(meta)), **arrays)


def read_resume_state(run_dir: str | Path) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
    """(round, arrays, meta) of the run's last checkpoint, or None if it has none."""
    path = Path(run_dir) / "checkpoints" / RESUME_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            rnd = int(z["__round__"])
            meta = json.loads(str(z["__meta__"].item()))
            arrays = {k: z[k].copy() for k in z.files if k not in ("__round__", "__meta__")}
    except (OSError, ValueError, KeyError) as e:
        raise ResumeError(f"{path} is unreadable ({e}); the run cannot be resumed from it") from None
    return rnd, arrays, meta


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_changes(recorded: dict[str, Any], cfg) -> list[str]:
    """Keys (other than ``MAY_CHANGE``) whose value differs between a run's config.json and ``cfg``."""
    from kumiki.config import ConfigError, validate

    now = _flat(json.loads(cfg.model_dump_json()))
    then = {k: v for k, v in recorded.items() if k != "engine"}
    try:  # a key this Kumiki added since the run started takes its default (the run computed with it)
        then = json.loads(validate(then).model_dump_json())
    except ConfigError:
        pass  # compared as recorded: every difference is reported
    then = _flat(then)
    return sorted(k for k in set(now) | set(then) if k not in MAY_CHANGE and now.get(k) != then.get(k))


def _round_rows(run_dir: Path) -> list[int]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("kind") == "round":
            rows.append(int(obj["round"]))
    return rows


def resume_point(cfg) -> int | None:
    """The round a resumed ``cfg`` continues after, or None when its run dir holds no earlier run (a fresh start).

    Raises :class:`ResumeError` when the run dir holds another config's run, a run whose rounds were recorded
    without a resumable checkpoint, or a run that already ran ``run.rounds`` rounds.
    """
    run_dir = cfg.run_dir()
    config_path = run_dir / "config.json"
    if not config_path.is_file() and not (run_dir / "metrics.jsonl").is_file():
        return None
    try:
        recorded = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{config_path} is missing or unreadable ({e}); cannot check that --resume continues the "
                          "same run") from None
    changed = config_changes(recorded, cfg)
    if changed:
        raise ResumeError(f"{run_dir} was run with another config ({', '.join(changed[:6])} differ); a resumed run "
                          f"may change only {', '.join(MAY_CHANGE)}. Resume with the run's own config, or start a "
                          "new run.name")
    state = read_resume_state(run_dir)
    done = state[0] if state else 0
    if state is None and _round_rows(run_dir):
        raise ResumeError(f"{run_dir} recorded rounds but has no {RESUME_FILE} checkpoint (written by Kumiki since "
                          "server resume exists); it cannot be resumed")
    if done >= cfg.run.rounds:
        raise ResumeError(f"{run_dir} already ran {done} of run.rounds = {cfg.run.rounds} rounds; to continue it, "
                          f"raise run.rounds (e.g. --set run.rounds={done + cfg.run.rounds})")
    return done
