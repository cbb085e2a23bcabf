"""Per-site differential privacy: Opacus DP-SGD in the one loop, and a ledger that never resets.

Privacy unit: one training example of one site (per-example DP within a factory). Every
``Trainer.fit`` of a training message runs DP-SGD when ``privacy.enabled``: Poisson batches at
sample rate q = batch_size / N, per-example gradients (Opacus ``GradSampleModule``), clipping to
``max_grad_norm`` and Gaussian noise (Opacus ``DPOptimizer``), one accountant step per batch.

The accountant's history lives in the site's **privacy ledger**, a JSON file in the site's
privacy dir (node config ``privacy-dir``, default its state dir) named after a hash of the
site's training data: it is not part of the run's fingerprinted state, so epsilon keeps growing
across rounds, restarts and new runs over the same records, and a site whose next round could
exceed ``target_epsilon`` declines to train (``BudgetExhausted``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client.loop import seed_from
from kumiki.accounting import epsilon, solve_noise

log = logging.getLogger("kumiki.privacy")


class BudgetExhausted(RuntimeError):
    """The site's next round would spend more than ``privacy.target_epsilon``: it declines to train."""


def register_grad_samplers() -> None:
    """Per-example gradients Opacus has no rule for: FLoRAL's router (``models.lora.router_per_example_grad``)."""
    from opacus.grad_sample import register_grad_sampler

    from models.lora import Router, router_per_example_grad

    register_grad_sampler(Router)(router_per_example_grad)


def data_hash(x: np.ndarray, y: np.ndarray) -> str:
    """The records the budget protects: a change of data is a new ledger."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Ledger:
    """The accountant history (noise multiplier, sample rate, steps) of one site's records, on disk."""

    path: Path
    noise_multiplier: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)
    #: steps of the site's last training round (the next round's projection)
    last_steps: int = 0

    @classmethod
    def open(cls, root: str | Path, digest: str) -> Ledger:
        path = Path(root) / f"privacy-{digest}.json"
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            return cls(path, raw["noise_multiplier"], [tuple(h) for h in raw["history"]], int(raw.get("last_steps", 0)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            # never start from zero silently: an unreadable ledger would under-report epsilon
            raise RuntimeError(f"privacy ledger {path} is unreadable ({e}); restore it from a backup — "
                               "deleting it would reset the site's privacy budget") from None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"noise_multiplier": self.noise_multiplier, "last_steps": self.last_steps,
                                   "history": [list(h) for h in self.history]}))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))


@dataclass
class DPContext:
    """What the loop needs for DP-SGD in one training message; counts the steps it takes."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    seed: int
    #: ids of the parameters trained privately (None: every trained parameter)
    private: set[int] | None = None
    steps: int = 0

    def generator(self, tag: str) -> torch.Generator:
        return torch.Generator().manual_seed(seed_from(f"{self.seed}:{tag}"))


def start(sj, privacy_dir: str | Path, seed: str) -> tuple[Ledger, DPContext]:
    """Open the site's ledger, fix its noise multiplier and refuse a round that could exceed the budget.

    The round's steps are projected as the last round's (the first: the method's epochs per round
    of 1/q Poisson batches each); the release check (``finish``) catches any round that runs longer.
    """
    p, n = sj.job.privacy, sj.data.num_train
    q = min(1.0, sj.trainer.cfg.batch_size / n)
    per_epoch = max(1, round(1 / q))
    ledger = Ledger.open(privacy_dir, data_hash(sj.data.x_train, sj.data.y_train))
    epochs = sj.job.method.epochs_per_round(sj.trainer.cfg)  # DualFed, FedRep, Ditto pass more than once
    if ledger.noise_multiplier is None:
        planned = max(sj.job.rounds, 1) * epochs * per_epoch
        ledger.noise_multiplier = p.noise_multiplier or solve_noise(p.target_epsilon, p.delta, q, planned, p.accountant)
        log.info("site %s: noise multiplier %.3f (q = %.4f, %d planned steps)", sj.data.name, ledger.noise_multiplier,
                 q, planned)
    sigma = p.noise_multiplier or ledger.noise_multiplier
    projected = ledger.last_steps or epochs * per_epoch
    spent = epsilon(p.accountant, ledger.history, p.delta)
    after = epsilon(p.accountant, [*ledger.history, (sigma, q, projected)], p.delta)
    if after > p.target_epsilon:
        raise BudgetExhausted(f"privacy budget: epsilon {spent:.3f} spent, one more round ({projected} steps at "
                              f"sigma {sigma:.3f}) would reach {after:.3f} > privacy.target_epsilon "
                              f"{p.target_epsilon:g}; this site declines to train and keeps evaluating")
    private = None
    if p.scope == "shared":  # the tensors that travel: everything the split does not keep home
        private = {id(t) for k, t in sj.model.named_parameters() if k not in sj.split.personal}
    return ledger, DPContext(sigma, p.max_grad_norm, q, sj.trainer.cfg.batch_size, seed=seed_from(seed), private=private)


def finish(ledger: Ledger, dp: DPContext, p) -> float:
    """The release check, then the record (both before anything leaves the site); the epsilon spent.

    Only what is released costs privacy: a round whose actual steps would take epsilon past the
    target (a method with several passes per round can outrun the projection) is withheld, so the
    budget is a hard limit; the ledger then keeps the round's length as its next projection.
    """
    after = epsilon(p.accountant, [*ledger.history, (dp.noise_multiplier, dp.sample_rate, dp.steps)], p.delta)
    ledger.last_steps = dp.steps or ledger.last_steps
    if after > p.target_epsilon:
        ledger.save()
        raise BudgetExhausted(f"privacy budget: this round's {dp.steps} steps would take epsilon to {after:.3f} > "
                              f"privacy.target_epsilon {p.target_epsilon:g}; its update is withheld and this site "
                              "declines to train from now on")
    ledger.add(dp.noise_multiplier, dp.sample_rate, dp.steps)
    ledger.save()
    return epsilon(p.accountant, ledger.history, p.delta)


def spent(sj, privacy_dir: str | Path) -> float:
    """Epsilon spent so far on this site's records (evaluation reports it; it never trains here)."""
    p = sj.job.privacy
    ledger = Ledger.open(privacy_dir, data_hash(sj.data.x_train, sj.data.y_train))
    return epsilon(p.accountant, ledger.history, p.delta)
