"""What a site learns and how it is scored: the task registry both sides share (no torch here).

A site's task comes from its data (``site.json`` ``"task"``, default ``classification``): a factory
that labels defects classifies, one that draws masks segments. The server learns each site's task
from its profile and reads the matching metric from its replies; the site computes the loss and the
metric (``client/tasks.py``). Metric keys in messages are ``<path>-<metric>`` with path one of
``personalized``, ``global``, ``adapted`` (for example ``personalized-perplexity``), plus
``<path>-loss``.

Derived targets (a mask, an edge map, a noisy input) are computed from real images and reported as
derived (``../shared/datasets.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The evaluation paths a site reports (ARCHITECTURE section 7).
PATHS = ("personalized", "global", "adapted",
         # the safeguard's (client/safeguard.py): the served and own models on test, both on validation, and
         # (``safeguard.measure_refit``) the chosen side refit on the whole training split, on test
         "served", "own", "val_joined", "val_own", "refit")


@dataclass(frozen=True)
class TaskInfo:
    name: str
    #: the task's metric (``summary.json`` ``"metric"``)
    metric: str
    higher_is_better: bool
    #: range a valid metric value lies in (a reply outside it is rejected)
    low: float
    high: float
    #: what ``x`` holds: ``image`` (float32 N,C,H,W in [0, 1]) or ``tokens`` (int64 N,T)
    inputs: str
    #: what ``y`` holds: ``label`` (int64 N), ``mask`` (N,1,H,W in {0, 1}), ``image`` (N,C,H,W in [0, 1]),
    #: ``tokens`` (int64 N,T; -100 marks a position that is not scored)
    targets: str

    def better(self, a: float, b: float) -> bool:
        """True when metric value ``a`` is better than ``b``."""
        return a > b if self.higher_is_better else a < b


TASKS: dict[str, TaskInfo] = {
    "classification": TaskInfo("classification", "accuracy", True, 0.0, 1.0, "image", "label"),
    "segmentation": TaskInfo("segmentation", "miou", True, 0.0, 1.0, "image", "mask"),
    "edges": TaskInfo("edges", "fscore", True, 0.0, 1.0, "image", "mask"),
    "denoising": TaskInfo("denoising", "psnr", True, 0.0, 1000.0, "image", "image"),
    "language": TaskInfo("language", "perplexity", False, 1.0, math.inf, "tokens", "tokens"),
}

#: metric name -> its task (each metric belongs to exactly one task)
BY_METRIC: dict[str, TaskInfo] = {t.metric: t for t in TASKS.values()}
#: the position of ``y`` that is never scored in ``tokens`` targets (torch's ignore_index)
IGNORE = -100


def task_info(name: str) -> TaskInfo:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def metric_key(path: str, task: str) -> str:
    """``metric_key("personalized", "language") == "personalized-perplexity"``."""
    return f"{path}-{TASKS[task].metric}"


def metric_of_key(key: str) -> TaskInfo | None:
    """The task whose metric a message key reports (``global-miou`` -> segmentation), else None."""
    path, _, metric = key.partition("-")
    return BY_METRIC.get(metric) if path in PATHS else None
