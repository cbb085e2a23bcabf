"""Per-site differential privacy: Opacus DP-SGD in the one loop, and a ledger that never resets.

Privacy unit: one training example of one site (per-example DP within a factory). Every
``Trainer.fit`` of a training message runs DP-SGD when ``privacy.enabled``: Poisson batches at
sample rate q = batch_size / N, per-example gradients (Opacus ``GradSampleModule``), clipping to
``max_grad_norm`` and Gaussian noise (Opacus ``DPOptimizer``), one accountant step per batch.

Randomness is secret (docs/privacy.md): the noise and the Poisson draws come from the operating system's
CSPRNG (``secrets``), a fresh 64-bit seed for every batch draw and every noise draw, never from a value the
server or another site knows (the run seed, site names and rounds are all the server's). Opacus' ``secure_mode``
noise (the sum of four normals, robust to floating-point attacks) is used; its ``torchcsprng`` generator does
not exist for the pinned torch, so the seeds come from ``secrets`` instead. ``privacy.reproducible_noise`` (a
research switch whose name says it is not private) restores the old seeded draws.

The accountant's history lives in the site's **privacy ledger**, a JSON file in the site's privacy dir (node
config ``privacy-dir``, default its state dir) named after the **site** (``privacy-<site>.json``), not its
data: new or changed records continue the same ledger, so epsilon keeps growing across rounds, restarts, new
runs and new data, and a site whose next round could exceed ``target_epsilon`` declines to train
(``BudgetExhausted``). The site's state records the steps its ledger held after its last DP round; a ledger
that is missing, emptied or shorter than that is refused (``LedgerMissing``) like a missing state file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client.loop import seed_from
from kumiki.accounting import epsilon, solve_noise
from kumiki.atomic import atomic_json

log = logging.getLogger("kumiki.privacy")


class BudgetExhausted(RuntimeError):
    """The site's next round would spend more than ``privacy.target_epsilon``: it declines to train."""


class LedgerMissing(RuntimeError):
    """The site's state says it trained under DP, but its ledger is gone, emptied or older than the state."""


def secret_seed() -> int:
    """63 bits from the OS CSPRNG: a seed nobody else can know or regenerate."""
    return secrets.randbits(63)


def register_grad_samplers() -> None:
    """Per-example gradients Opacus has no rule for: FLoRAL's router (``models.lora.router_per_example_grad``)."""
    from opacus.grad_sample import register_grad_sampler

    from models.lora import Router, router_per_example_grad

    register_grad_sampler(Router)(router_per_example_grad)


def data_hash(x: np.ndarray, y: np.ndarray) -> str:
    """A hash of the site's records: the name of the ledger before it belonged to the site (migrated)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()[:16]


def _legacy(sj) -> str:
    """The old data-hash name of the site's ledger: of its whole training split (before the safeguard's holdout)."""
    full = sj.val.full if getattr(sj, "val", None) is not None else sj.data
    return data_hash(full.x_train, full.y_train)


@dataclass
class Ledger:
    """The accountant history (noise multiplier, sample rate, steps) of one site's records, on disk."""

    path: Path
    noise_multiplier: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)
    #: steps of the site's last training round (the next round's projection)
    last_steps: int = 0

    @property
    def steps(self) -> int:
        """All DP-SGD steps the ledger records (what the site state compares against)."""
        return sum(int(h[2]) for h in self.history)

    @classmethod
    def open(cls, root: str | Path, name: str, legacy: str | None = None) -> Ledger:
        """The ledger ``privacy-<name>.json``; a ledger of the old data-hash name (``legacy``) is taken over."""
        path = Path(root) / f"privacy-{name}.json"
        old = Path(root) / f"privacy-{legacy}.json" if legacy else None
        if not path.exists() and old is not None and old.exists():
            os.replace(old, path)  # the site's ledger from the days it was named after its data
            log.warning("privacy ledger %s now belongs to the site: %s", old, path)
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
        """Atomic (temp file, fsync, rename): a crash leaves the old ledger or the new one, never none."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(self.path, {"noise_multiplier": self.noise_multiplier, "last_steps": self.last_steps,
                                "history": [list(h) for h in self.history]})

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
    #: the seed of ``reproducible`` draws (unused otherwise)
    seed: int = 0
    #: ids of the parameters trained privately (None: every trained parameter)
    private: set[int] | None = None
    steps: int = 0
    #: ``privacy.reproducible_noise``: draws seeded from ``seed`` (public values): NOT private, research only
    reproducible: bool = False

    def generator(self, tag: str, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for noise or Poisson draws: seeded from the OS CSPRNG (reseeded by ``refresh`` before each
        draw), or, ``reproducible``, from the seed and tag like every other seeded draw of the run."""
        g = torch.Generator(device=device)
        return g.manual_seed(seed_from(f"{self.seed}:{tag}") if self.reproducible else secret_seed())

    def refresh(self, g: torch.Generator) -> None:
        """A fresh secret seed before each draw: no long stream of one generator for anyone to model."""
        if not self.reproducible:
            g.manual_seed(secret_seed())

    def optimizer(self, model: torch.nn.Module, private: list[dict], make, tag: str):
        """(Opacus' DPOptimizer over ``private`` groups, the GradSampleModule wrapping ``model``): per-example
        clipping to C and Gaussian noise sigma * C (Opacus' secure_mode sampling) from ``generator``."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        register_grad_samplers()
        device = next((p.device for g in private for p in g["params"]), torch.device("cpu"))
        gsm = GradSampleModule(model, loss_reduction="mean")
        opt = DPOptimizer(make(private), noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                          expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                          generator=self.generator(tag, device), secure_mode=not self.reproducible)
        return opt, gsm


#: the site state's record of its DP training (``SiteState.extra``): the ledger must hold at least this much
RECORD = "privacy"


def open_ledger(sj, privacy_dir: str | Path) -> Ledger:
    """The site's ledger (named after the site), checked against what the site's state says it spent: a ledger
    that is missing, emptied or shorter than the state's record is refused (``LedgerMissing``), never restarted."""
    ledger = Ledger.open(privacy_dir, sj.data.name, legacy=_legacy(sj))
    record = (sj.state.extra or {}).get(RECORD) or {}
    need = int(record.get("ledger_steps", 0))
    if ledger.steps < need:
        what = "missing" if not ledger.path.exists() else ("empty" if not ledger.history else "older than the state")
        raise LedgerMissing(
            f"site {sj.data.name}: privacy ledger {ledger.path} is {what} ({ledger.steps} DP steps) although this "
            f"site's state records {need} steps (epsilon {float(record.get('epsilon', 0.0)):.3f} spent); restore "
            "the ledger from a backup (or point the node config privacy-dir at the folder that holds it). A site "
            "cannot restart its budget: without its ledger it must not train under DP again (docs/privacy.md)")
    return ledger


def planned_steps(sj, per_epoch: int) -> int:
    """DP-SGD steps of one round: tau (``method.local_steps``: WorldLM) or the method's passes of 1/q batches."""
    tau = getattr(sj.job.method, "local_steps", None)
    if tau:
        return int(tau)
    return sj.job.method.epochs_per_round(sj.trainer.cfg) * per_epoch  # DualFed, FedRep, Ditto pass more than once


def start(sj, privacy_dir: str | Path, seed: str) -> tuple[Ledger, DPContext]:
    """Open the site's ledger, fix its noise multiplier and refuse a round that could exceed the budget.

    The round's steps are projected as the last round's (the first: ``planned_steps``); the release check
    (``finish``) catches any round that runs longer. ``seed`` matters only under ``privacy.reproducible_noise``.
    """
    p, n = sj.job.privacy, sj.data.num_train
    q = min(1.0, sj.trainer.cfg.batch_size / n)
    per_epoch = max(1, round(1 / q))
    ledger = open_ledger(sj, privacy_dir)
    per_round = planned_steps(sj, per_epoch)
    if ledger.noise_multiplier is None:
        planned = max(sj.job.rounds, 1) * per_round
        ledger.noise_multiplier = p.noise_multiplier or solve_noise(p.target_epsilon, p.delta, q, planned, p.accountant)
        log.info("site %s: noise multiplier %.3f (q = %.4f, %d planned steps)", sj.data.name, ledger.noise_multiplier,
                 q, planned)
    sigma = p.noise_multiplier or ledger.noise_multiplier
    projected = ledger.last_steps or per_round
    spent = epsilon(p.accountant, ledger.history, p.delta)
    after = epsilon(p.accountant, [*ledger.history, (sigma, q, projected)], p.delta)
    if after > p.target_epsilon:
        raise BudgetExhausted(f"privacy budget: epsilon {spent:.3f} spent, one more round ({projected} steps at "
                              f"sigma {sigma:.3f}) would reach {after:.3f} > privacy.target_epsilon "
                              f"{p.target_epsilon:g}; this site declines to train and keeps evaluating")
    private = None
    if p.scope == "shared":  # the tensors that travel: everything the split does not keep home
        private = {id(t) for k, t in sj.model.named_parameters() if k not in sj.split.personal}
    if p.reproducible_noise:
        log.warning("site %s: privacy.reproducible_noise = true: the DP noise and batches are seeded from values the "
                    "server knows; this round is NOT private against the server", sj.data.name)
    return ledger, DPContext(sigma, p.max_grad_norm, q, sj.trainer.cfg.batch_size, seed=seed_from(seed),
                             private=private, reproducible=p.reproducible_noise)


def finish(ledger: Ledger, dp: DPContext, p, state=None) -> float:
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
    spent = epsilon(p.accountant, ledger.history, p.delta)
    if state is not None:  # the state remembers what the ledger holds now: a later, shorter ledger is refused
        state.extra[RECORD] = {"ledger_steps": ledger.steps, "epsilon": spent, "ledger": ledger.path.name}
    return spent


def spent(sj, privacy_dir: str | Path) -> float:
    """Epsilon spent so far on this site's records (evaluation reports it; it never trains here)."""
    p = sj.job.privacy
    ledger = Ledger.open(privacy_dir, sj.data.name, legacy=_legacy(sj))
    recorded = float(((sj.state.extra or {}).get(RECORD) or {}).get("epsilon", 0.0))
    return max(epsilon(p.accountant, ledger.history, p.delta), recorded)  # never less than the state knows
