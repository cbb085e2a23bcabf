"""The per-site folder: the only data a site (SuperNode) ever reads.

Layout of one site folder (the format a real factory exports its data to)::

    <data-dir>/
      site.json   {"name": "site-0", "role": "train" | "unseen", "domain": "rot90",
                   "derived": true, "num_classes": 10, "input_shape": [1, 28, 28],
                   "task": "classification"}
                  (partition kind "clusters" adds "cluster" and "cluster_transform",
                   for diagnostics only: the site never reports them)
      train.npz   x: float32 (N, C, H, W) in [0, 1] (or the scale site.json "inputs" declares);
                  y: int64 (N,) in [0, num_classes)
      test.npz    same keys; the site's own held-out split

``task`` (default ``classification``, see ``kumiki/tasks.py``) decides what ``x`` and ``y`` hold:
image inputs are float32 (N, C, H, W) in [0, 1] (uint8 is scaled by 1/255) unless site.json's ``inputs``
declares another range or a per-channel standardization (``kumiki/data/inputs.py``); token inputs are
int64 (N, T) in [0, num_classes) (num_classes is the vocabulary); ``y`` is a label per example, a
0/1 mask (N, 1, H, W), a [0, 1] image (N, C, H, W) or int64 tokens (N, T) with -100 for
positions that are not scored.

This module is the format only (read, check, write); it imports no data source. Pilots and simulations build
these folders from one pooled dataset (``kumiki.data.prepare.materialize``, which hands images to
``kumiki.data.images`` and text to ``kumiki.data.text``); a deployment points each SuperNode at its own folder
with ``--node-config "data-dir='...'"``; nothing is partitioned centrally there.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kumiki.data import inputs
from kumiki.tasks import IGNORE, TaskInfo, task_info
from kumiki.atomic import atomic_npz


log = logging.getLogger("kumiki.data")


class SiteDataError(ValueError):
    """A site folder that is missing or malformed; the message says what and where."""


@dataclass
class SiteData:
    name: str
    role: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    meta: dict
    #: the inputs' scale as checked at load: "[0, 1]", or site.json's ``inputs`` and the data's range
    #: (``kumiki.data.inputs``); the site's profile and the report show it
    inputs: str = inputs.UNIT.text

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def task(self) -> str:
        """What this site learns (``site.json`` ``"task"``; ``kumiki/tasks.py``)."""
        return str(self.meta.get("task", "classification"))


#: What a site name may be (the server refuses any other in a profile): it names folders, logs and report rows.
SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def site_name(i: int) -> str:
    return f"site-{i}"


def site_folders(root: str | Path, sites: int, unseen: int) -> list[str]:
    """The site folders under a ``site-folders`` root, training sites first (the order the engines start them).

    The legacy layout ``site-0 .. site-<n-1>`` is used as is; otherwise every sub-folder holding a site.json
    is a site (``kumiki site import`` writes them), in name order within each role, and the roles must add up
    to ``data.sites`` training and ``data.unseen_sites`` unseen sites.
    """
    root = Path(root)
    n = sites + unseen
    legacy = [site_name(i) for i in range(n)]
    if all((root / d / "site.json").is_file() for d in legacy):
        return legacy
    found = sorted(d.name for d in root.iterdir() if (d / "site.json").is_file()) if root.is_dir() else []
    if not found:
        raise SiteDataError(f"data.path {root}: no site folder (a sub-folder with site.json); see docs/deployment.md, "
                            "'Site data folder', or make one with `kumiki site import`")
    roles: dict[str, list[str]] = {"train": [], "unseen": []}
    for d in found:
        try:
            role = json.loads((root / d / "site.json").read_text()).get("role", "train")
        except (OSError, ValueError) as e:
            raise SiteDataError(f"{root / d / 'site.json'}: not valid JSON ({e})") from None
        if role not in roles:
            raise SiteDataError(f"{root / d / 'site.json'}: role {role!r} is not 'train' or 'unseen'")
        roles[role].append(d)
    if (len(roles["train"]), len(roles["unseen"])) != (sites, unseen):
        raise SiteDataError(f"data.path {root}: {len(roles['train'])} training and {len(roles['unseen'])} unseen site "
                            f"folders ({', '.join(found[:8])}), but the config has data.sites = {sites} and "
                            f"data.unseen_sites = {unseen}")
    return roles["train"] + roles["unseen"]


def write_site(folder: Path, meta: dict, x_train, y_train, x_test, y_test) -> Path:
    """One site folder in the documented format; dtypes follow the site's task (``meta["task"]``)."""
    task = task_info(str(meta.get("task", "classification")))
    xt = np.int64 if task.inputs == "tokens" else np.float32
    yt = np.int64 if task.targets in ("label", "tokens") else np.float32
    folder.mkdir(parents=True, exist_ok=True)
    atomic_npz(folder / "train.npz", x=x_train.astype(xt), y=y_train.astype(yt))
    atomic_npz(folder / "test.npz", x=x_test.astype(xt), y=y_test.astype(yt))
    (folder / "site.json").write_text(json.dumps(meta, indent=2))
    return folder


def _pixels(path: Path, x: np.ndarray, scale: inputs.InputScale = inputs.UNIT) -> np.ndarray:
    """x as float32 on ``scale`` (default [0, 1]). uint8 images (0-255) are scaled by 1/255, and the site says
    so; any other dtype must already lie on the scale (site.json ``inputs`` declares one other than [0, 1]):
    values outside are refused, not clipped, and not rescaled (``kumiki.data.inputs`` says why)."""
    if x.dtype == np.uint8:
        if scale.declared:
            raise SiteDataError(f"{path}: x is uint8 (0-255 pixels) but site.json declares {inputs.KEY} "
                                f"({scale.text}); store the normalized float32 values, or drop the declaration")
        log.warning("%s: uint8 pixels scaled to [0, 1] (x / 255)", path)
        return x.astype(np.float32) / 255.0
    if x.dtype.kind not in "fiu":
        raise SiteDataError(f"{path}: x has dtype {x.dtype}; expected float32 in [0, 1] (or uint8 0-255)")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise SiteDataError(f"{path}: x contains NaN or infinite values")
    return x


def _scaled(path: Path, x: np.ndarray, scale: inputs.InputScale) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Images (N, C, H, W) checked against their scale; also their observed (min, max)."""
    try:
        return x, inputs.check(x, scale, str(path))
    except inputs.InputScaleError as e:
        raise SiteDataError(str(e)) from None


def _integers(path: Path, a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise SiteDataError(f"{path}: {what} has dtype {a.dtype}; expected integers (int64)")
    return a.astype(np.int64)


def _inputs(path: Path, x: np.ndarray, task: TaskInfo, meta: dict) -> tuple[np.ndarray, tuple | None]:
    """x checked for the task: images (N, C, H, W) on their declared scale (default [0, 1]), or tokens (N, T)
    in [0, vocabulary); also the images' observed (min, max) (None for tokens)."""
    observed = None
    if task.inputs == "tokens":
        x = _integers(path, x, "x (tokens)")
        k = int(meta.get("num_classes", 0)) or None
        if x.ndim != 2:
            raise SiteDataError(f"{path}: x has shape {x.shape}; token inputs are (N, T)")
        if x.size and (x.min() < 0 or (k is not None and x.max() >= k)):
            raise SiteDataError(f"{path}: token ids outside [0, {k})")
    else:
        scale = _scale(path.parent, meta, x)
        x = _pixels(path, x, scale)
        if x.ndim != 4:
            raise SiteDataError(f"{path}: x has shape {x.shape}; images are (N, C, H, W)")
        x, observed = _scaled(path, x, scale)
    shape = tuple(meta.get("input_shape", x.shape[1:]))
    if tuple(x.shape[1:]) != shape:
        raise SiteDataError(f"{path}: x has shape {x.shape}, expected (N, {', '.join(map(str, shape))})")
    return x, observed


def _scale(folder: Path, meta: dict, x: np.ndarray) -> inputs.InputScale:
    """site.json's declared input scale (``inputs``) for images with x's channels."""
    try:
        return inputs.parse(meta, int(x.shape[1]) if x.ndim == 4 else 1)
    except inputs.InputScaleError as e:
        raise SiteDataError(f"{folder / 'site.json'}: {e}") from None


def _targets(path: Path, y: np.ndarray, x: np.ndarray, task: TaskInfo, meta: dict) -> np.ndarray:
    """y checked for the task: labels, 0/1 masks, [0, 1] images or token ids (-100 = not scored)."""
    k = int(meta.get("num_classes", 0)) or None
    if task.targets == "label":
        y = _integers(path, y, "y (labels)")
        if y.ndim != 1:
            raise SiteDataError(f"{path}: y has shape {y.shape}; labels are (N,)")
        if len(y) and (y.min() < 0 or (k is not None and y.max() >= k)):
            raise SiteDataError(f"{path}: labels outside [0, {k})")
        return y
    if task.targets == "tokens":
        y = _integers(path, y, "y (tokens)")
        if y.shape != x.shape:
            raise SiteDataError(f"{path}: y has shape {y.shape}, x {x.shape}; token targets match the inputs")
        scored = y[y != IGNORE]
        if scored.size and (scored.min() < 0 or (k is not None and scored.max() >= k)):
            raise SiteDataError(f"{path}: target token ids outside [0, {k}) (and not {IGNORE})")
        return y
    # a mask may be stored as 0/1 integers or bools (not 0-255 pixels); images go through the pixel check
    y = y.astype(np.float32) if task.targets == "mask" and y.dtype.kind in "biu" else _pixels(path, y)
    if y.ndim != 4 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        raise SiteDataError(f"{path}: y has shape {y.shape}; {task.name} targets are (N, C, H, W) with the "
                            f"images' height and width {x.shape[2:]}")
    if y.size and (y.min() < 0.0 or y.max() > 1.0):  # target images stay in [0, 1] (PSNR's peak is 1)
        raise SiteDataError(f"{path}: {task.name} target values span [{y.min():g}, {y.max():g}]; target images are "
                            "float32 in [0, 1] (divide 0-255 images by 255, or store them as uint8)")
    if task.targets == "mask" and (y.shape[1] != 1 or not np.isin(y, (0.0, 1.0)).all()):
        raise SiteDataError(f"{path}: {task.name} masks are (N, 1, H, W) with values 0 or 1")
    return y


def _read_split(folder: Path, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise SiteDataError(f"site folder {folder}: missing {split}.npz (see docs/deployment.md, 'Site data folder')")
    try:
        task = task_info(str(meta.get("task", "classification")))
    except ValueError as e:
        raise SiteDataError(f"{folder / 'site.json'}: {e}") from None
    try:
        with np.load(path) as z:
            x, y = z["x"], z["y"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise SiteDataError(f"{path}: unreadable (truncated or not an .npz with arrays 'x' and 'y': {e}); "
                            "re-export the site's data") from None
    x, observed = _inputs(path, x, task, meta)
    if len(x) != len(y):
        raise SiteDataError(f"{path}: {len(x)} inputs but {len(y)} targets")
    if len(y) == 0:
        raise SiteDataError(f"{path}: holds no examples; a site needs a non-empty {split} split")
    return x, _targets(path, y, x, task, meta), observed


def check_against_model(data: SiteData, input_shape: tuple[int, ...], num_classes: int, where: str) -> None:
    """The site's data must fit the federation's model: the same input shape, and labels (or token ids)
    below num_classes (the vocabulary for language)."""
    task = task_info(data.task)
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise SiteDataError(f"{where}/{split}.npz: inputs of shape {tuple(x.shape[1:])}, but the federation's "
                                f"model takes {tuple(input_shape)} (data.input_shape)")
        ids = x if task.inputs == "tokens" else (y if task.targets == "label" else None)
        if ids is not None and ids.size and ids.max() >= num_classes:
            raise SiteDataError(f"{where}/{split}.npz: {'token id' if task.inputs == 'tokens' else 'label'} "
                                f"{int(ids.max())} but the federation's model has {num_classes} classes "
                                "(data.num_classes)")


def load_site(folder: str | Path) -> SiteData:
    folder = Path(folder)
    if not folder.is_dir():
        raise SiteDataError(f"site data folder not found: {folder}")
    meta_path = folder / "site.json"
    if not meta_path.is_file():
        raise SiteDataError(f"site folder {folder}: missing site.json")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise SiteDataError(f"{meta_path}: not valid JSON ({e})") from None
    xtr, ytr, otr = _read_split(folder, "train", meta)
    xte, yte, ote = _read_split(folder, "test", meta)
    scale = inputs.UNIT if otr is None else _scale(folder, meta, xtr)
    observed = None if otr is None else (min(otr[0], ote[0]), max(otr[1], ote[1]))
    return SiteData(meta.get("name", folder.name), meta.get("role", "train"), xtr, ytr, xte, yte, meta,
                    inputs.describe(scale, observed))
