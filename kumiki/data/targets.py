"""Targets of each task, derived from a pooled image dataset's real images and labels.

Classification keeps the real labels. Other tasks' targets are computed from the clean images
(a foreground mask, an edge map, the clean image behind a noisy input) and every site folder that
holds them says ``"derived": true`` (``../shared/datasets.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: task -> f(x, y, rng) -> (inputs, targets); x float32 (N, C, H, W) in [0, 1], y int64 labels
DERIVE: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "classification": lambda x, y, rng: (x, y),
}


def derive(task: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A site's (inputs, targets) for ``task`` from real images ``x`` and labels ``y``."""
    if task not in DERIVE:
        raise ValueError(f"no derived targets for task {task!r} on an image dataset (known: {', '.join(DERIVE)})")
    return DERIVE[task](x, y, rng)


def is_derived(task: str) -> bool:
    return task != "classification"
