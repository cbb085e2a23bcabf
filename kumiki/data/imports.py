"""``kumiki site import``: a factory's labelled images -> a site folder (docs/deployment.md, "Site data folder").

The source is either a folder with one sub-folder per class (``SRC/<class>/*.png``) or a CSV of
``file,label`` rows (paths relative to the CSV's folder; a ``file,label`` header is optional). Images are
read with Pillow (a matplotlib dependency), optionally turned to grayscale and resized, scaled to float32 in
[0, 1] and split per class into train and test (seeded). The result is written to a temporary folder, checked
by the loader every site uses (``kumiki.data.sites.load_site``: value range, shapes, labels), and only then
renamed to the output folder, so a failed import leaves nothing half-written. Nothing is ever deleted: an
existing output folder is refused, or moved aside with ``overwrite``.

Every factory of a federation must map labels the same way: the class list is written to site.json
(``classes``); pass the same ``classes`` to every import (default: the sorted class names this source has).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kumiki.data.sites import SITE_NAME_PATTERN, SiteDataError, load_site, write_site

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def default_sites_root() -> Path:
    """Where imported site folders go by default: ``$KUMIKI_SITES``, else ``~/kumiki-sites``. Outside any
    app directory, so neither git nor ``flwr build`` (which ships the app directory) ever sees factory data."""
    return Path(os.environ.get("KUMIKI_SITES") or Path.home() / "kumiki-sites")


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"28x28"`` -> (28, 28) as (height, width)."""
    if not text:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise SiteDataError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 28x28") from None
    if not (1 <= h <= 4096 and 1 <= w <= 4096):
        raise SiteDataError(f"--size {text!r}: height and width must lie in 1..4096")
    return h, w


def parse_classes(text: str | None) -> list[str] | int | None:
    """``--classes``: comma-separated names, a number of classes (integer labels), or a file: another site's
    site.json (its ``classes``) or a text file with one name per line."""
    if not text:
        return None
    path = Path(text)
    if path.is_file():
        if path.suffix == ".json":
            classes = json.loads(path.read_text()).get("classes")
            if not classes:
                raise SiteDataError(f"--classes {path}: that site.json has no 'classes' list")
            return [str(c) for c in classes]
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if text.strip().isdigit():
        return int(text)
    names = [c.strip() for c in text.split(",") if c.strip()]
    if len(set(names)) != len(names):
        raise SiteDataError(f"--classes {text!r}: a class is named twice")
    return names


def list_images(src: Path) -> list[tuple[Path, str]]:
    """(image path, label text) pairs from a class-folder tree or a ``file,label`` CSV."""
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise SiteDataError(f"{src}: expected a folder with one sub-folder per class, or a .csv of file,label")
        rows = []
        with open(src, newline="") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise SiteDataError(f"{src}, line {i + 1}: expected file,label, got {row!r}")
                if i == 0 and [c.strip().lower() for c in row[:2]] == ["file", "label"]:
                    continue
                rows.append(((src.parent / row[0].strip()), row[1].strip()))
        if not rows:
            raise SiteDataError(f"{src}: no file,label rows")
        return rows
    if not src.is_dir():
        raise SiteDataError(f"{src}: no such folder or CSV file")
    pairs = []
    classes = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SiteDataError(f"{src}: no class sub-folders (expected {src}/<class>/<image>, or a CSV of file,label)")
    for d in classes:
        pairs += [(p, d.name) for p in sorted(d.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not pairs:
        raise SiteDataError(f"{src}: the class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return pairs


def label_ids(labels: list[str], classes: list[str] | int | None) -> tuple[np.ndarray, list[str]]:
    """Label texts -> integer ids and the class list (names, or "0".."K-1" for integer labels)."""
    if isinstance(classes, list):
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise SiteDataError(f"labels {unknown[:5]} are not in --classes ({', '.join(classes[:10])})")
        return np.array([index[lab] for lab in labels], dtype=np.int64), classes
    if all(lab.lstrip("-").isdigit() for lab in labels):
        ids = np.array([int(lab) for lab in labels], dtype=np.int64)
        k = classes if isinstance(classes, int) else int(ids.max()) + 1
        if ids.min() < 0 or ids.max() >= k:
            raise SiteDataError(f"integer labels span [{ids.min()}, {ids.max()}], outside [0, {k}) (--classes {k})")
        return ids, [str(i) for i in range(k)]
    if isinstance(classes, int):
        raise SiteDataError("--classes N applies to integer labels; these labels are names: pass the names")
    names = sorted(set(labels))
    index = {c: i for i, c in enumerate(names)}
    return np.array([index[lab] for lab in labels], dtype=np.int64), names


def read_images(paths: list[Path], size: tuple[int, int] | None, grayscale: bool | None) -> np.ndarray:
    """float32 (N, C, H, W) in [0, 1]; ``grayscale=None``: one channel if every image is grayscale, else RGB."""
    from PIL import Image, UnidentifiedImageError

    images, bad = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except (OSError, UnidentifiedImageError, ValueError) as e:
            bad.append(f"{p} ({type(e).__name__})")
    if bad:
        raise SiteDataError(f"{len(bad)} image(s) cannot be read, e.g. {'; '.join(bad[:3])}; fix or remove them")
    gray = all(im.mode in GRAY_MODES for im in images) if grayscale is None else grayscale
    if size is None:
        sizes = Counter(im.size for im in images)
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = list(sizes)[:2]
            raise SiteDataError(f"images differ in size ({h0}x{w0} and {h1}x{w1}, as height x width); pass "
                                "--size HxW to resize them all")
    out = []
    for im in images:
        deep = im.mode.startswith("I") or im.mode == "F"  # 16/32-bit or float images: keep their precision
        if deep:
            arr_im = im.convert("F")
            scale = 65535.0 if im.mode.startswith("I;16") else (1.0 if im.mode == "F" else 255.0)
        else:
            arr_im = im.convert("L" if gray else "RGB")
            scale = 255.0
        if size is not None and arr_im.size != (size[1], size[0]):
            arr_im = arr_im.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(arr_im, dtype=np.float32) / scale
        if deep and not gray:
            a = np.repeat(a[..., None], 3, axis=-1)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, per class: round(n * fraction) test examples, at least one of each where a class
    has two or more (so every class the site has is tested), never all of them."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        test += list(idx[:k])
        train += list(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def import_site(src: str | Path, out: str | Path, name: str, role: str = "train", test_fraction: float = 0.2,
                size: tuple[int, int] | None = None, grayscale: bool | None = None, domain: str | None = None,
                classes: list[str] | int | None = None, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write ``out`` (site.json, train.npz, test.npz) from ``src``; returns what was written (site.json plus
    counts). Raises :class:`SiteDataError` naming the file and the fix."""
    import re

    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not re.match(SITE_NAME_PATTERN, name):
        raise SiteDataError(f"--name {name!r}: a site name is letters, digits, '_', '.', '-' (at most 64)")
    if role not in ("train", "unseen"):
        raise SiteDataError(f"--role {role!r}: use train or unseen")
    if not 0.0 < test_fraction < 1.0:
        raise SiteDataError(f"--test-fraction {test_fraction}: must lie strictly between 0 and 1")
    if out == src or src in out.parents or out in src.parents:
        raise SiteDataError(f"the output folder {out} must lie outside the source {src} (and not contain it)")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise SiteDataError(f"{out} already exists; choose another folder, or pass --overwrite to move it aside "
                            "(nothing is deleted)")
    pairs = list_images(src)
    y, class_names = label_ids([lab for _, lab in pairs], classes)
    x = read_images([p for p, _ in pairs], size, grayscale)
    tr, te = stratified_split(y, test_fraction, seed)
    if not len(tr) or not len(te):
        raise SiteDataError(f"{src}: {len(y)} image(s) are too few for a train and a test split")
    meta: dict[str, Any] = {
        "name": name, "role": role, "num_classes": len(class_names), "input_shape": list(x.shape[1:]),
        "classes": class_names, "derived": False, "source": "import",
        "imported": {"from": str(src), "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "test_fraction": test_fraction,
                     "seed": seed},
    }
    if domain:
        meta["domain"] = domain
    tmp = out.with_name(f".{out.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of a crashed import (a hidden temp name)
    try:
        write_site(tmp, meta, x[tr], y[tr], x[te], y[te])
        load_site(tmp)  # the loader's checks, exactly as the site will run them
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(out, aside)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {c: (int((y[tr] == i).sum()), int((y[te] == i).sum())) for i, c in enumerate(class_names)}
    return {**meta, "path": str(out), "num_train": int(len(tr)), "num_test": int(len(te)), "per_class": counts}
