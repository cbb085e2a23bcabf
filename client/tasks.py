"""Losses and metrics of each task (``kumiki/tasks.py`` names them; this module computes them).

A ``Task`` gives the one loop its loss (``loss(output, y)``) and scores a prediction function over
a whole test split. Metrics are computed from dataset-level sums, never as a mean of per-batch
values: accuracy = correct / N; perplexity = exp(total next-token CE / total scored tokens), so a
long sequence weighs more than a short one (``tokens`` targets equal to -100 are not scored).
A new task is one ``Task`` subclass here and one line in ``TASK_CLASSES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from kumiki.tasks import IGNORE, TaskInfo, task_info


class Task:
    """One task: its loss and its metric. Subclasses fill the accumulator hooks."""

    name = "classification"

    def __init__(self) -> None:
        self.info: TaskInfo = task_info(self.name)

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- dataset-level metric: start an accumulator, add batches, read the result -----------------
    def start(self) -> dict[str, float]:
        return {"loss": 0.0, "n": 0.0}

    def add(self, acc: dict[str, float], output: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self, acc: dict[str, float]) -> tuple[float, float]:
        """(metric value, mean loss)."""
        raise NotImplementedError


class Classification(Task):
    name = "classification"

    def loss(self, output, y):
        return F.cross_entropy(output, y)

    def start(self):
        return {"loss": 0.0, "n": 0.0, "correct": 0.0}

    def add(self, acc, output, y):
        acc["loss"] += float(F.cross_entropy(output, y, reduction="sum"))
        acc["correct"] += float((output.argmax(1) == y).sum())
        acc["n"] += len(y)

    def result(self, acc):
        n = max(acc["n"], 1.0)
        return acc["correct"] / n, acc["loss"] / n


class Language(Task):
    """Next-token prediction: ``output`` is (B, T, V) logits, ``y`` is (B, T) token ids (-100: not scored)."""

    name = "language"

    def loss(self, output, y):
        return F.cross_entropy(output.flatten(0, 1), y.flatten(), ignore_index=IGNORE)

    def add(self, acc, output, y):
        acc["loss"] += float(F.cross_entropy(output.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"))
        acc["n"] += float((y != IGNORE).sum())

    def result(self, acc):
        nll = acc["loss"] / max(acc["n"], 1.0)
        return math.exp(nll), nll


TASK_CLASSES: dict[str, type[Task]] = {"classification": Classification, "language": Language}


def task_for(name: str) -> Task:
    if name not in TASK_CLASSES:
        raise ValueError(f"task {name!r} has no implementation (known: {', '.join(sorted(TASK_CLASSES))})")
    return TASK_CLASSES[name]()


Predict = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@torch.no_grad()
def score(task: Task, model: nn.Module, x, y, predict: Predict, device: torch.device | None = None,
          batch_size: int = 512) -> dict[str, float]:
    """``predict``'s metric and mean loss over a whole split: ``{"score", "loss", "examples"}``."""
    device = device or next(model.parameters()).device
    model.to(device).eval()
    acc = task.start()
    for i in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[i : i + batch_size]).to(device)
        yb = torch.from_numpy(y[i : i + batch_size]).to(device)
        task.add(acc, predict(model, xb), yb)
    value, loss = task.result(acc)
    return {"score": value, "loss": loss, "examples": float(len(y))}
