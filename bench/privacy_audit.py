"""Empirical privacy audit (issue 21): canaries, DP-SGD through the project's own loop, and a lower bound on
epsilon from the best membership test, in two threat models.

    .venv/bin/python bench/privacy_audit.py [--quick | --full] [--write]

One trial is one site's training round: ``N`` ordinary records, plus (with probability 1/2, the secret bit) one
**canary**, a record whose gradient lives in a weight no other record touches (a "Dirac" canary: Nasr et al.
2023 use the same trick to make the audit tight). The site trains as ``client/app.py`` does: a ``Trainer`` with
the round's seed (``model.seed:site:round``), a ``DPContext`` from ``client.privacy`` (Opacus' per-example clip
and noise), and releases the model. The adversary sees the release, knows the other records and the start model
(the standard worst case), and guesses whether the canary was in:

* **observer**: someone who sees the updates but not the site's secrets. Its score is the release's component
  along the canary's clipped gradient (a Gaussian of mean 1 or 0, std sigma, in units of C / B).
* **server**: knows every public value it sent (run seed, site names, rounds). It re-runs the round without
  the canary under the same seeds and scores the difference. When the noise is seeded from those values (the
  old code; ``privacy.reproducible_noise = true`` now) its replay has the very same noise, the difference is
  exactly the canary's contribution, and the test is perfect. With secret noise the replay's noise is
  independent and only adds variance.

Empirical epsilon (Jagielski et al. 2020): the threshold is chosen on half of the trials, then on the other half
``eps_lb = max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi))`` with Clopper-Pearson
upper bounds (95 % each), so the bound holds with high probability for the mechanism that ran. A correct
implementation keeps it below the claimed epsilon (the accountant's, for the same sigma, q and steps).
``--write`` puts the table between the ``privacy-audit`` markers of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Setting:
    """One audited mechanism: DP-SGD with q = 1 (every record in the one batch), ``steps`` steps."""

    sigma: float = 3.0
    clip: float = 1.0
    records: int = 63  # ordinary records; the canary makes N + 1
    dims: int = 8  # features; the last one is the canary's alone
    classes: int = 4
    steps: int = 1
    delta: float = 1e-5


def _data(s: Setting, member: bool) -> tuple[np.ndarray, np.ndarray]:
    """The site's records (the same ordinary ones in every trial: the adversary knows them), canary last."""
    rng = np.random.default_rng(12345)
    x = rng.normal(size=(s.records, 1, 1, s.dims)).astype(np.float32)
    x[..., -1] = 0.0  # nobody else touches the canary's weight column
    y = rng.integers(0, s.classes, s.records).astype(np.int64)
    if member:
        canary = np.zeros((1, 1, 1, s.dims), np.float32)
        canary[..., -1] = 100.0  # its gradient is far above C: clipped to exactly C
        x, y = np.concatenate([x, canary]), np.concatenate([y, np.zeros(1, np.int64)])
    return x, y


def _model(s: Setting):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(s.dims, s.classes, bias=False))
    with torch.no_grad():
        model[1].weight.zero_()  # the start model the server sent (public)
    return model


def _train(s: Setting, member: bool, round_: int, reproducible: bool):
    """One site round as ``client/app.py`` runs it (seeds included); the released weights."""
    import torch

    from client.loop import Trainer
    from client.privacy import DPContext
    from client.loop import seed_from
    from kumiki.config import TrainSection

    x, y = _data(s, member)
    seed = f"0:site-0:{round_}"  # model.seed:site:round, what client.app._seed makes of the server's values
    trainer = Trainer(x, y, TrainSection(batch_size=s.records + 1, lr=1.0, device="cpu", local_epochs=s.steps),
                      seed=seed)
    trainer.dp = DPContext(s.sigma, s.clip, sample_rate=1.0, expected_batch_size=s.records + 1,
                           seed=seed_from(f"{trainer.seed}:dp"), reproducible=reproducible)
    model = _model(s)
    trainer.fit(model, model.parameters(), tag=f"r{round_}")
    return model[1].weight.detach().to(torch.float64).numpy().copy()


def _canary_direction(s: Setting) -> np.ndarray:
    """The canary's clipped gradient direction at the start model (public: the adversary computes it)."""
    p = np.full(s.classes, 1.0 / s.classes)
    g = p.copy()
    g[0] -= 1.0  # d CE / d logits for label 0 at uniform softmax; times x = 100 on the canary's column
    return g / np.linalg.norm(g)


def trial_scores(s: Setting, member: bool, round_: int, reproducible: bool) -> tuple[float, float]:
    """(observer score, server score) of one trial: the canary's coordinate of the release, in units of C / B."""
    u = _canary_direction(s)
    scale = (s.records + 1) / s.clip  # lr 1: a step is -(sum of clipped gradients + noise) / B
    released = _train(s, member, round_, reproducible)
    observer = float(-released[:, -1] @ u * scale)
    replay = _train(s, False, round_, reproducible)  # the server's re-run without the canary, same public seeds
    server = float(-(released[:, -1] - replay[:, -1]) @ u * scale)
    return observer, server


def _cp_upper(k: int, n: int, alpha: float = 0.05) -> float:
    """Clopper-Pearson one-sided upper bound of a rate with k successes in n."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def _rates(scores_in: np.ndarray, scores_out: np.ndarray, t: float) -> tuple[int, int]:
    """(false negatives, false positives) of the test 'member iff score >= t'."""
    return int((scores_in < t).sum()), int((scores_out >= t).sum())


def _eps_from(fn: float, fp: float, delta: float) -> float:
    vals = []
    for a, b in ((fn, fp), (fp, fn)):
        if 1 - delta - a > 0 and b > 0:
            vals.append(math.log((1 - delta - a) / b))
    return max(vals + [0.0])


def epsilon_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, delta: float) -> float:
    """Jagielski et al. 2020: best threshold on the first half, Clopper-Pearson bounds on the second half."""
    h_in, h_out = len(scores_in) // 2, len(scores_out) // 2
    fit_in, fit_out, ev_in, ev_out = scores_in[:h_in], scores_out[:h_out], scores_in[h_in:], scores_out[h_out:]
    candidates = np.unique(np.concatenate([fit_in, fit_out]))
    best_t, best = None, -1.0
    for t in candidates:
        fn, fp = _rates(fit_in, fit_out, t)
        est = _eps_from((fn + 0.5) / (len(fit_in) + 1), (fp + 0.5) / (len(fit_out) + 1), delta)
        if est > best:
            best_t, best = t, est
    fn, fp = _rates(ev_in, ev_out, best_t)
    return _eps_from(_cp_upper(fn, len(ev_in)), _cp_upper(fp, len(ev_out)), delta)


def audit(trials: int, setting: Setting = Setting(), reproducible: bool = False, seed: int = 0) -> dict:
    """Run ``trials`` trials (the canary in each with probability 1/2); the claim and both empirical bounds."""
    from kumiki.accounting import epsilon

    rng = np.random.default_rng(seed)
    members = rng.random(trials) < 0.5
    obs_in, obs_out, srv_in, srv_out = [], [], [], []
    for i, member in enumerate(members):
        o, sv = trial_scores(setting, bool(member), round_=i + 1, reproducible=reproducible)
        (obs_in if member else obs_out).append(o)
        (srv_in if member else srv_out).append(sv)
    claimed = epsilon("rdp", [(setting.sigma, 1.0, setting.steps)], setting.delta)
    n_in, n_out = len(obs_in) - len(obs_in) // 2, len(obs_out) - len(obs_out) // 2  # the evaluation halves
    ceiling = _eps_from(_cp_upper(0, n_in), _cp_upper(0, n_out), setting.delta)  # a perfect test, these trials
    return {"sigma": setting.sigma, "steps": setting.steps, "trials": trials, "reproducible": reproducible,
            "claimed": claimed, "ceiling": ceiling,
            "observer": epsilon_lower_bound(np.array(obs_in), np.array(obs_out), setting.delta),
            "server": epsilon_lower_bound(np.array(srv_in), np.array(srv_out), setting.delta)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="200 trials, sigma 3 (seconds)")
    mode.add_argument("--full", action="store_true", help="2000 trials, sigma 1, 2, 3 (about 10 minutes)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    trials, sigmas = (2000, [1.0, 2.0, 3.0]) if args.full else (200, [3.0])
    t0 = time.time()
    rows = []
    for sigma in sigmas:
        for reproducible in (False, True):
            r = audit(trials, Setting(sigma=sigma), reproducible)
            rows.append(r)
            print(f"sigma {sigma:g} {'seeded (reproducible_noise)' if reproducible else 'secret'}: claimed "
                  f"{r['claimed']:.2f}, observer >= {r['observer']:.2f}, server >= {r['server']:.2f}", flush=True)
    from bench.results import load, machine, stamp

    text = (f"{stamp('bench/privacy_audit.py ' + ('--full' if args.full else '--quick'))} {machine()}; load "
            f"{load()}; {time.time() - t0:.0f} s. One DP-SGD round of a site through the project's loop "
            f"(`Trainer` + `DPContext`, Opacus clip C = 1, q = 1, one step, {Setting().records} records + a "
            "Dirac canary with probability 1/2), the released weights scored by each adversary; empirical "
            "epsilon = Jagielski et al. 2020 with the threshold fitted on half the trials and 95 % "
            "Clopper-Pearson bounds on the other half (delta 1e-5). *Secret*: today's noise (OS CSPRNG). "
            "*Seeded*: `privacy.reproducible_noise = true`, the noise of the code before issue 21: the server "
            "re-runs the round under the seeds it sent and subtracts the noise. *Ceiling*: the largest bound "
            "these trials can show (a perfect membership test).\n\n"
            "| sigma | noise | trials | claimed ε | empirical ε ≥, observer of updates | empirical ε ≥, the server "
            "| ceiling | holds? |\n|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        holds = r["observer"] <= r["claimed"] and r["server"] <= r["claimed"]
        text += (f"| {r['sigma']:g} | {'seeded' if r['reproducible'] else 'secret'} | {r['trials']} | "
                 f"{r['claimed']:.2f} | {r['observer']:.2f} | {r['server']:.2f} | {r['ceiling']:.2f} | "
                 f"{'yes' if holds else '**no**: the server breaks it'} |\n")
    print(text)
    if args.write:
        from bench.results import write_section

        write_section("privacy-audit", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
