"""Losses and metrics of each task (``kumiki/tasks.py`` names them; this module computes them).

A ``Task`` gives the one loop its loss (``loss(output, y)``) and scores a prediction function over
a whole test split. Metrics are computed from dataset-level sums, never as a mean of per-batch
values: accuracy = correct / N; perplexity = exp(total next-token CE / total scored tokens), so a
long sequence weighs more than a short one (``tokens`` targets equal to -100 are not scored).
Dense tasks (M-Fed, ``../shared/methods/mfed.md`` section 3) sum pixel counts over the split:
mIoU from the split's true/false positives and negatives, the edge F-score from the split's matched
and total edge pixels at each threshold, PSNR from the split's total squared error.
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


class Segmentation(Task):
    """Foreground masks: ``output`` (B, 1, H, W) logits, ``y`` 0/1 masks; BCE with logits; mIoU over {bg, fg}.

    IoU_c = TP_c / (TP_c + FP_c + FN_c) from the split's pixel counts (a class absent from both the
    target and the prediction scores 1); a pixel is foreground where its logit is > 0."""

    name = "segmentation"

    def loss(self, output, y):
        return F.binary_cross_entropy_with_logits(output, y)

    def start(self):
        return {"loss": 0.0, "n": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0, "tn": 0.0}

    def add(self, acc, output, y):
        acc["loss"] += float(F.binary_cross_entropy_with_logits(output, y, reduction="sum"))
        pred, truth = output > 0, y > 0.5
        acc["tp"] += float((pred & truth).sum())
        acc["fp"] += float((pred & ~truth).sum())
        acc["fn"] += float((~pred & truth).sum())
        acc["tn"] += float((~pred & ~truth).sum())
        acc["n"] += float(y.numel())

    @staticmethod
    def _iou(hit: float, wrong: float, missed: float) -> float:
        union = hit + wrong + missed
        return hit / union if union else 1.0

    def result(self, acc):
        fg = self._iou(acc["tp"], acc["fp"], acc["fn"])
        bg = self._iou(acc["tn"], acc["fn"], acc["fp"])
        return (fg + bg) / 2, acc["loss"] / max(acc["n"], 1.0)


def balanced_bce(output: torch.Tensor, y: torch.Tensor, reduction: str = "mean", per: str = "batch") -> torch.Tensor:
    """BCE with logits whose edge pixels weigh #non-edge / #edge (HED's class balancing), counted over the
    batch (``per = "batch"``) or over each example (``"example"``: no example's loss depends on another's,
    as DP-SGD needs). A batch or example without edge pixels weighs 1."""
    dims = tuple(range(1, y.dim())) if per == "example" else tuple(range(y.dim()))
    pos = y.sum(dim=dims, keepdim=True)
    neg = y[0].numel() * (len(y) if per == "batch" else 1) - pos
    weight = torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))
    pixel = torch.where(y > 0.5, weight, torch.ones_like(y))
    loss = F.binary_cross_entropy_with_logits(output, y, weight=pixel, reduction="none")
    return loss.sum() if reduction == "sum" else loss.mean()


class Edges(Task):
    """Edge maps: ``output`` (B, 1, H, W) logits, ``y`` 0/1 maps; class-balanced BCE; the ODS F-score.

    ODS F: the best, over fixed thresholds 0.01 .. 0.99 of sigmoid(output), of the split-level F1,
    with P = (predicted edge pixels within ``tolerance`` of a true one) / (predicted edge pixels)
    and R = (true edge pixels within ``tolerance`` of a predicted one) / (true edge pixels); "within"
    is the (2 t + 1)^2 square around a pixel. The benchmark odsF matches pixels one to one
    (bipartite) with a distance tolerance: this is an approximation of it, and scores higher."""

    name = "edges"
    thresholds = torch.arange(1, 100) / 100

    def __init__(self, tolerance: int = 1, balance: str = "batch") -> None:
        super().__init__()
        self.tolerance, self.balance = tolerance, balance

    def loss(self, output, y):
        return balanced_bce(output, y, per=self.balance)

    def start(self):
        t = len(self.thresholds)
        return {"loss": 0.0, "n": 0.0, "true": 0.0, "pred": [0.0] * t, "pred_hit": [0.0] * t, "true_hit": [0.0] * t}

    def _near(self, m: torch.Tensor) -> torch.Tensor:
        r = self.tolerance
        return F.max_pool2d(m.float(), 2 * r + 1, stride=1, padding=r) > 0 if r else m

    def add(self, acc, output, y):
        acc["loss"] += float(balanced_bce(output, y, reduction="sum", per=self.balance))
        acc["n"] += float(y.numel())
        truth = y > 0.5
        near_truth = self._near(truth)
        acc["true"] += float(truth.sum())
        prob = torch.sigmoid(output)
        for i, t in enumerate(self.thresholds.tolist()):
            pred = prob > t
            acc["pred"][i] += float(pred.sum())
            acc["pred_hit"][i] += float((pred & near_truth).sum())
            acc["true_hit"][i] += float((truth & self._near(pred)).sum())

    def result(self, acc):
        best = 0.0
        for pred, pred_hit, true_hit in zip(acc["pred"], acc["pred_hit"], acc["true_hit"]):
            p = pred_hit / pred if pred else 0.0
            r = true_hit / acc["true"] if acc["true"] else 0.0
            best = max(best, 2 * p * r / (p + r) if p + r else 0.0)
        return best, acc["loss"] / max(acc["n"], 1.0)


class Denoising(Task):
    """Clean images from noisy ones: ``output`` and ``y`` (B, C, H, W) in [0, 1]; MSE; PSNR (peak 1).

    PSNR = 10 log10(1 / MSE) with MSE the split's total squared error over its pixel count (not a mean of
    per-image PSNRs), at most 100 dB (an exact reconstruction)."""

    name = "denoising"

    def loss(self, output, y):
        return F.mse_loss(output, y)

    def add(self, acc, output, y):
        acc["loss"] += float(F.mse_loss(output, y, reduction="sum"))
        acc["n"] += float(y.numel())

    def result(self, acc):
        mse = acc["loss"] / max(acc["n"], 1.0)
        return min(100.0, 10 * math.log10(1.0 / mse)) if mse > 0 else 100.0, mse


TASK_CLASSES: dict[str, type[Task]] = {"classification": Classification, "language": Language,
                                       "segmentation": Segmentation, "edges": Edges, "denoising": Denoising}


def task_for(name: str, **options) -> Task:
    """The task's implementation; ``options`` go to its constructor (Edges' ``tolerance``)."""
    if name not in TASK_CLASSES:
        raise ValueError(f"task {name!r} has no implementation (known: {', '.join(sorted(TASK_CLASSES))})")
    return TASK_CLASSES[name](**options)


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
