"""What scale a site's image inputs are on: [0, 1] unless its site.json declares another (``inputs``).

A factory's pipeline may already normalize its images: PFLlib and many torchvision pipelines store
``(p - 0.5) / 0.5`` in [-1, 1], others standardize each channel with the dataset's mean and std. Such a site
declares it instead of rescaling by hand::

    "inputs": {"range": [-1, 1]}
    "inputs": {"standardized": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}}

(``mean``/``std`` are those of [0, 1] pixels, torchvision's ``Normalize`` convention; one value, or one per
channel). The declaration is checked against the data: every channel must lie in the declared range, or in
the range standardization can produce from [0, 1] pixels, ``[-mean/std, (1 - mean)/std]``. Data outside
an undeclared [0, 1] is refused with a message naming the key to add.

The model is fed the values as stored, not rescaled to [0, 1]: the model a factory takes home then works on
exactly what its own pipeline produces (at inference too), and nothing silently changes the inputs it was
trained on. The declaration and the observed range travel in the site's profile, so the run's report shows
every factory's input scale next to its data sizes (sites that share a model on different scales show up there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: the site.json key of the declaration
KEY = "inputs"
#: slack for float32 rounding of a pipeline's own normalization, relative to the declared span
REL_TOL = 1e-4
HINT = (f'declare the scale in site.json, e.g. "{KEY}": {{"range": [-1, 1]}} or "{KEY}": {{"standardized": '
        '{"mean": [...], "std": [...]}} (mean and std of [0, 1] pixels)')


class InputScaleError(ValueError):
    """A malformed ``inputs`` declaration, or data outside the declared (or default) scale."""


@dataclass(frozen=True)
class InputScale:
    """Per-channel bounds the inputs must lie in, and how the declaration reads in a report."""

    kind: str  # "unit" (the default [0, 1]) | "range" | "standardized"
    low: np.ndarray  # (C,) or (1,)
    high: np.ndarray
    text: str

    @property
    def declared(self) -> bool:
        return self.kind != "unit"


UNIT = InputScale("unit", np.zeros(1), np.ones(1), "[0, 1]")


def _numbers(value: Any, what: str) -> np.ndarray:
    vals = value if isinstance(value, list) else [value]
    if not vals or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        raise InputScaleError(f"{what} must be a number or a list of numbers, got {value!r}")
    a = np.asarray(vals, dtype=np.float64)
    if not np.isfinite(a).all():
        raise InputScaleError(f"{what} must be finite, got {value!r}")
    return a


def _g(a: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in a) + "]"


def parse(meta: dict, channels: int) -> InputScale:
    """The site's declared scale (``UNIT`` when site.json has no ``inputs``), for images of ``channels``."""
    spec = meta.get(KEY)
    if spec is None:
        return UNIT
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("range", "standardized"):
        raise InputScaleError(f'"{KEY}" must be {{"range": [low, high]}} or {{"standardized": {{"mean": ..., '
                              f'"std": ...}}}}, got {spec!r}')
    kind, body = next(iter(spec.items()))
    if kind == "range":
        r = _numbers(body, f"{KEY}.range")
        if r.shape != (2,) or not r[0] < r[1]:
            raise InputScaleError(f"{KEY}.range must be [low, high] with low < high, got {body!r}")
        return InputScale("range", r[:1], r[1:], f"range {_g(r)}")
    if not isinstance(body, dict) or set(body) != {"mean", "std"}:
        raise InputScaleError(f'{KEY}.standardized must be {{"mean": ..., "std": ...}}, got {body!r}')
    mean, std = _numbers(body["mean"], f"{KEY}.standardized.mean"), _numbers(body["std"], f"{KEY}.standardized.std")
    for name, a in (("mean", mean), ("std", std)):
        if len(a) not in (1, channels):
            raise InputScaleError(f"{KEY}.standardized.{name} has {len(a)} values; give one, or one per channel "
                                  f"({channels})")
    if (std <= 0).any():
        raise InputScaleError(f"{KEY}.standardized.std must be positive, got {body['std']!r}")
    return InputScale("standardized", -mean / std, (1.0 - mean) / std, f"standardized mean {_g(mean)} std {_g(std)}")


def check(x: np.ndarray, scale: InputScale, where: str) -> tuple[float, float]:
    """Refuse images (N, C, H, W) outside ``scale``; returns the observed (min, max)."""
    if not x.size:
        return 0.0, 0.0
    lo_c, hi_c = x.min(axis=(0, 2, 3)).astype(np.float64), x.max(axis=(0, 2, 3)).astype(np.float64)
    low, high = np.broadcast_to(scale.low, lo_c.shape), np.broadcast_to(scale.high, hi_c.shape)
    tol = REL_TOL * (high - low) if scale.declared else 0.0  # the default stays exact, as it always was
    bad = (lo_c < low - tol) | (hi_c > high + tol)
    if bad.any():
        c = int(np.flatnonzero(bad)[0])
        span = f"[{lo_c.min():g}, {hi_c.max():g}]"
        if not scale.declared:
            raise InputScaleError(f"{where}: pixel values span {span}, outside the default [0, 1] and site.json "
                                  f"declares no other scale; {HINT}. (0-255 images: divide by 255 or store uint8)")
        raise InputScaleError(f"{where}: channel {c} spans [{lo_c[c]:g}, {hi_c[c]:g}], outside "
                              f"[{low[c]:g}, {high[c]:g}] that site.json's {KEY} ({scale.text}) allows; fix the "
                              "declaration or the data")
    return float(lo_c.min()), float(hi_c.max())


def describe(scale: InputScale, observed: tuple[float, float] | None) -> str:
    """One line for the site's profile and the report: the declaration, and the data's range when declared."""
    if not scale.declared or observed is None:
        return scale.text
    return f"{scale.text}; data [{observed[0]:.4g}, {observed[1]:.4g}]"
