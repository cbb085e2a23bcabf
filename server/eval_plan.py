"""How often a run evaluates (``eval.every``, issue 26 item 4): ``"auto"`` made concrete from what evaluation costs.

Its own module so that the federation loop and the recorder (which writes the figure into summary.json's
``eval_share``) read the same rule without importing each other.
"""

from __future__ import annotations

import math

from kumiki.config import KumikiConfig

#: evaluation's share of a run that ``eval.every = "auto"`` aims at (issue 26: at most ~20 %)
EVAL_SHARE_GOAL = 0.2
#: an evaluation pass (personalized and global, on the test sample ``eval.sample = "auto"`` draws), in epochs of
#: training: ``client/eval_sample.py`` sizes the sample so that it costs about this much
EVAL_PASSES_EPOCHS = 0.25


def eval_every(cfg: KumikiConfig) -> int:
    """``eval.every``, with ``"auto"`` made concrete: evaluate every k-th round, k the smallest that keeps
    evaluation near ``EVAL_SHARE_GOAL`` of the run, counted in epochs of training per round.

    A round trains ``local_epochs`` on each training site. An evaluated round costs each training site its
    method's evaluation training (``eval_train_epochs``: FedAvg-FT's fine-tuning, FedHB's personalization; 0 for
    the rest) plus its passes, and each unseen site ``eval.unseen_adapt_epochs`` plus its passes. With evaluation
    E epochs every k rounds and training T per round, evaluation's share is E / (k T + E), at most the goal when
    k >= E (1 - goal) / (goal T). Methods that train a fixed number of steps (``local_steps``, language data) and
    every method whose evaluation does not train keep k = 1: their sampled evaluation is already small."""
    every = cfg.eval.every
    if every != "auto":
        return int(every)
    if getattr(cfg.method, "local_steps", None):
        return 1
    train_sites, unseen = cfg.data.sites, cfg.data.unseen_sites
    own = getattr(cfg.method, "eval_train_epochs", 0)
    if not own and not (unseen and cfg.eval.unseen_adapt_epochs):
        return 1
    per_eval = train_sites * (own + EVAL_PASSES_EPOCHS) + unseen * (cfg.eval.unseen_adapt_epochs + EVAL_PASSES_EPOCHS)
    per_round = train_sites * cfg.train.local_epochs
    return max(1, math.ceil(per_eval * (1 - EVAL_SHARE_GOAL) / (EVAL_SHARE_GOAL * per_round) - 1e-9))
