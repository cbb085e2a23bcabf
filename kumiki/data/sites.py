"""The per-site folder: the only data a site (SuperNode) ever reads.

Layout of one site folder (the format a real factory exports its data to)::

    <data-dir>/
      site.json   {"name": "site-0", "role": "train" | "unseen", "domain": "rot90",
                   "derived": true, "num_classes": 10, "input_shape": [1, 28, 28],
                   "task": "classification"}
                  (partition kind "clusters" adds "cluster" and "cluster_transform",
                   for diagnostics only: the site never reports them)
      train.npz   x: float32 (N, C, H, W) in [0, 1]; y: int64 (N,) in [0, num_classes)
      test.npz    same keys; the site's own held-out split

``task`` (default ``classification``, see ``kumiki/tasks.py``) decides what ``x`` and ``y`` hold:
image inputs are float32 (N, C, H, W) in [0, 1] (uint8 is scaled by 1/255); token inputs are
int64 (N, T) in [0, num_classes) (num_classes is the vocabulary); ``y`` is a label per example, a
0/1 mask (N, 1, H, W), a [0, 1] image (N, C, H, W) or int64 tokens (N, T) with -100 for
positions that are not scored.

Pilots and simulations build these folders from one pooled dataset
(``materialize``); a deployment points each SuperNode at its own folder with
``--node-config "data-dir='...'"``; nothing is partitioned centrally there.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kumiki.data import domains, partition, sources, targets
from kumiki.tasks import IGNORE, TaskInfo, task_info


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


def partitioned_names(data_cfg) -> list[str]:
    """The names of a partitioned run's sites, training sites first: ``data.site_names``, else site-<i>
    (language data: its languages or roles, ``kumiki.data.text``)."""
    from kumiki.data import text

    if data_cfg.dataset in text.TEXT_DATASETS:
        return text.text_site_names(data_cfg)
    return list(data_cfg.site_names) or [site_name(i) for i in range(data_cfg.sites + data_cfg.unseen_sites)]


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
        raise SiteDataError(f"data.path {root}: no site folder (a sub-folder with site.json); see README, "
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


def pool(data_cfg) -> tuple[np.ndarray, np.ndarray]:
    if data_cfg.dataset == "digits":
        return sources.load_digits()
    if data_cfg.dataset == "fashion-mnist":
        return sources.load_fashion_mnist(data_cfg.dataset_dir(), "train")
    raise SiteDataError("site-folders data is already split per site; nothing to materialize")


def materialize(cfg, root: str | Path) -> list[Path]:
    """Partition the pooled dataset into ``sites + unseen_sites`` folders under ``root``."""
    data = cfg.data
    root = Path(root)
    from kumiki.data import text

    if data.dataset in text.TEXT_DATASETS:
        return text.materialize_text(cfg, root)
    x, y = pool(data)
    seed = cfg.run.seed if data.partition_seed is None else data.partition_seed
    rng = np.random.default_rng(seed)
    n_total = data.sites + data.unseen_sites
    names = partitioned_names(data)
    parts = partition.partition(y, n_total, data.partition, rng)
    shape, num_classes = list(x.shape[1:]), int(y.max()) + 1
    tasks = cfg.site_tasks() or ["classification"] * n_total
    groups = cfg.method.site_groups(n_total)
    out = []
    for i, idx in enumerate(parts):
        idx = rng.permutation(idx)
        if data.samples_per_site is not None:
            idx = idx[: data.samples_per_site]
        domain = data.domains[i % len(data.domains)] if data.domains else "identity"
        xs = domains.apply(x[idx], domain, rng)
        ys = y[idx]
        xs, ys, cluster_meta = _cluster_shift(data.partition, i, xs, ys, num_classes, rng)
        # a generator of the site's own (the denoising noise): every site's examples stay those of any method's run
        xs, ys = targets.derive(tasks[i], xs, ys, np.random.default_rng([seed, 9, i]))
        n_test = max(1, int(round(len(idx) * data.test_fraction)))
        role = "train" if i < data.sites else "unseen"
        meta = {
            "name": names[i], "role": role, "domain": domain, "task": tasks[i],
            "derived": domain != "identity" or cluster_meta.get("cluster", 0) != 0 or targets.is_derived(tasks[i]),
            "num_classes": num_classes, "input_shape": shape, "source": data.dataset, **cluster_meta,
        }
        if groups:
            meta["group"] = groups[i]
        out.append(write_site(root / names[i], meta, xs[n_test:], ys[n_test:], xs[:n_test], ys[:n_test]))
    return out


def _cluster_shift(spec, i: int, xs: np.ndarray, ys: np.ndarray, num_classes: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Site i's cluster transform (``partition.kind = "clusters"``); other kinds pass the data through.

    The cluster goes only into the site's own site.json (for diagnostics): clustered methods must find
    the clusters themselves, so nothing sent to the server may carry it."""
    if spec.kind != "clusters":
        return xs, ys, {}
    c = partition.cluster_of(i, spec.clusters)
    if spec.cluster_transform == "label_shift":
        ys = partition.shift_labels(ys, c, num_classes)
    else:
        xs = domains.apply(xs, partition.cluster_rotation(c, spec.clusters), rng)
    return xs, ys, {"cluster": c, "cluster_transform": spec.cluster_transform}


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_site(folder: Path, meta: dict, x_train, y_train, x_test, y_test) -> Path:
    """One site folder in the documented format; dtypes follow the site's task (``meta["task"]``)."""
    task = task_info(str(meta.get("task", "classification")))
    xt = np.int64 if task.inputs == "tokens" else np.float32
    yt = np.int64 if task.targets in ("label", "tokens") else np.float32
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_npz(folder / "train.npz", x=x_train.astype(xt), y=y_train.astype(yt))
    _atomic_npz(folder / "test.npz", x=x_test.astype(xt), y=y_test.astype(yt))
    (folder / "site.json").write_text(json.dumps(meta, indent=2))
    return folder


def _pixels(path: Path, x: np.ndarray) -> np.ndarray:
    """x as float32 in [0, 1]. uint8 images (0-255) are scaled by 1/255, and the site says so; any other
    dtype must already lie in [0, 1] (the documented format): values outside are refused, not clipped."""
    if x.dtype == np.uint8:
        log.warning("%s: uint8 pixels scaled to [0, 1] (x / 255)", path)
        return x.astype(np.float32) / 255.0
    if x.dtype.kind not in "fiu":
        raise SiteDataError(f"{path}: x has dtype {x.dtype}; expected float32 in [0, 1] (or uint8 0-255)")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise SiteDataError(f"{path}: x contains NaN or infinite values")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise SiteDataError(f"{path}: pixel values span [{x.min():g}, {x.max():g}]; the format is float32 in [0, 1] "
                            "(divide 0-255 images by 255, or store them as uint8)")
    return x


def _integers(path: Path, a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise SiteDataError(f"{path}: {what} has dtype {a.dtype}; expected integers (int64)")
    return a.astype(np.int64)


def _inputs(path: Path, x: np.ndarray, task: TaskInfo, meta: dict) -> np.ndarray:
    """x checked for the task: images (N, C, H, W) in [0, 1], or tokens (N, T) in [0, vocabulary)."""
    if task.inputs == "tokens":
        x = _integers(path, x, "x (tokens)")
        k = int(meta.get("num_classes", 0)) or None
        if x.ndim != 2:
            raise SiteDataError(f"{path}: x has shape {x.shape}; token inputs are (N, T)")
        if x.size and (x.min() < 0 or (k is not None and x.max() >= k)):
            raise SiteDataError(f"{path}: token ids outside [0, {k})")
    else:
        x = _pixels(path, x)
        if x.ndim != 4:
            raise SiteDataError(f"{path}: x has shape {x.shape}; images are (N, C, H, W)")
    shape = tuple(meta.get("input_shape", x.shape[1:]))
    if tuple(x.shape[1:]) != shape:
        raise SiteDataError(f"{path}: x has shape {x.shape}, expected (N, {', '.join(map(str, shape))})")
    return x


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
    if task.targets == "mask" and (y.shape[1] != 1 or not np.isin(y, (0.0, 1.0)).all()):
        raise SiteDataError(f"{path}: {task.name} masks are (N, 1, H, W) with values 0 or 1")
    return y


def _read_split(folder: Path, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise SiteDataError(f"site folder {folder}: missing {split}.npz (see README, 'Site data folder')")
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
    x = _inputs(path, x, task, meta)
    if len(x) != len(y):
        raise SiteDataError(f"{path}: {len(x)} inputs but {len(y)} targets")
    if len(y) == 0:
        raise SiteDataError(f"{path}: holds no examples; a site needs a non-empty {split} split")
    return x, _targets(path, y, x, task, meta)


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
    xtr, ytr = _read_split(folder, "train", meta)
    xte, yte = _read_split(folder, "test", meta)
    return SiteData(meta.get("name", folder.name), meta.get("role", "train"), xtr, ytr, xte, yte, meta)
