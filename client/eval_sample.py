"""Evaluation that costs less than training (issue 26 item 4): a fixed test sample in every round but the last.

Why a sample and not a rarer evaluation: a curve needs a point every round, and its points must be comparable,
so every round before the last evaluates the *same* examples (drawn once per site from ``run.seed`` and the
site's name: nothing secret, only which test examples are scored). The last round, the one the report's numbers
come from, evaluates the whole test split, or on language data a larger sample (``eval.final_sample``, below);
the server marks it with ``kumiki.eval-full``, and a site also takes it when the round is the last the run plans,
so a forwarding tier that drops the mark cannot make the final numbers noisier.

``eval.sample = "auto"`` sizes the sample from the training the site does per round: a share of the examples
it trains on (``local_steps x batch_size`` for methods that train a fixed number of steps, else
``local_epochs x`` its training split), at least 64: a quarter on image data, a tenth on language data
(``PER_TRAINED``: what an evaluation pass costs per example against a training step, measured), so that a site's
two evaluation passes (personalized and global) stay near 20 % of its round. On image data with one local epoch
the quarter is the whole test split (``data.test_fraction = 0.2``): nothing changes there. WorldLM on fortunes
trains 50 x 16 sequences a round against test splits of thousands of windows: it scores 80 of them.

The last round's evaluation is sized by ``eval.final_sample``: ``auto`` scores the whole test split on image data,
where it is small next to a round's training, and twice the rounds' sample on language data (``FINAL_PER_ROUND``),
where the whole split would dominate the run: WorldLM on fortunes holds 1,395-4,560 test windows per language
against 800 sequences trained per round, and scoring them all made evaluation about 45 % of a 6-round run
(bench/RESULTS.md, issue 26 goals). Each window scores 128 next-byte predictions, so its 160 windows are about
20,000 predictions: a standard error near a third of a point.

Methods whose evaluation *trains* (FedAvg-FT's fine-tuning, FedHB's personalization) spend that on training data,
which no test sample shortens; ``eval.every`` is their lever (docs/performance.md).
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from kumiki.contract import EVAL_FULL

#: the smallest sample ``auto`` draws: below it a round's score is too noisy to read as a curve
MIN_AUTO = 64


#: ``auto``: one test example per this many examples trained per round. An image model's forward pass costs about a
#: third of a training step per example, so a quarter keeps two evaluation passes near 20 % of a round. The
#: language model's evaluation (batches of 512 windows of 128 bytes) measured about as much per window as a
#: training step per sequence (WorldLM on fortunes, 2 cores: 0.24 s against 0.22 s, bench/eval_share.py
#: --datasets), so there a tenth.
PER_TRAINED = {"language": 10}
PER_TRAINED_DEFAULT = 4

#: ``eval.final_sample = "auto"``: the last round scores this many times the rounds' sample on these tasks (the
#: whole split elsewhere, and wherever the multiple would cover it)
FINAL_PER_ROUND = {"language": 2}


def sample_size(job, num_train: int, num_test: int, task: str = "classification") -> int | None:
    """How many test examples a site scores in a round before the last, or None for the whole split."""
    want = job.eval.sample
    if want == "auto":
        steps = getattr(job.method, "local_steps", None)
        trained = steps * job.train.batch_size if steps else job.train.local_epochs * num_train
        want = max(MIN_AUTO, math.ceil(trained / PER_TRAINED.get(task, PER_TRAINED_DEFAULT)))
    return _or_whole(want, num_test)


def final_size(job, num_train: int, num_test: int, task: str = "classification") -> int | None:
    """How many test examples a site scores in the run's last round, or None for the whole split."""
    want = getattr(job.eval, "final_sample", "auto")
    if want == "auto":
        k = FINAL_PER_ROUND.get(task)
        n = sample_size(job, num_train, num_test, task) if k else None
        if n is None:
            return None
        want = k * n
    return _or_whole(want, num_test)


def _or_whole(want, num_test: int) -> int | None:
    """A sample size, or None (the whole split) for 0 and for a size that would cover the split."""
    want = int(want)
    return None if want <= 0 or want >= num_test else want


def indices(num_test: int, n: int, seed: int, site: str) -> np.ndarray:
    """The site's fixed sample: ``n`` distinct test indices, sorted, the same in every round of the run."""
    rng = np.random.default_rng(zlib.crc32(f"kumiki-eval-sample:{seed}:{site}".encode()))
    return np.sort(rng.choice(num_test, size=n, replace=False))


def test_split(job, data, site: str, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """The test examples this evaluation scores: when ``full`` (the last round) the whole split or the final
    sample (``eval.final_sample``), else the fixed sample (or the whole split when a sample would cover it)."""
    size = final_size if full else sample_size
    n = size(job, data.num_train, len(data.y_test), getattr(data, "task", "classification"))
    if n is None:
        return data.x_test, data.y_test
    idx = indices(len(data.y_test), n, job.model.seed, site)
    return data.x_test[idx], data.y_test[idx]


def is_full(job, config) -> bool:
    """Whether this evaluation must use the whole test split: the server says so (``kumiki.eval-full``), or the
    evaluated round is the last one the run plans."""
    return bool(config.get(EVAL_FULL, False)) or (job.rounds > 0 and job.round >= job.rounds)
