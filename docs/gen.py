"""Write the documentation pages that are copies or renderings of other files, so that none of them drifts.

    python docs/gen.py            # rewrite every generated page and block
    python docs/gen.py --check    # exit 1 and name the pages that differ (tests/test_docs.py runs this check)

Whole pages, copied with their links rewritten for the site's layout (edit the source, never the copy):

- ``docs/index.md``          from ``README.md`` (the landing page is also the site's home page);
- ``docs/runbook.md``        from ``deploy/README.md`` (the operator's runbook stays beside the files it uses).

``docs/bench-results.md`` includes ``bench/RESULTS.md`` whole when the site is built (a ``--8<--`` snippet line
of pymdownx.snippets), so the many benchmarks that write it never leave a stale copy; the link check below
reads the included file as part of the page, as MkDocs does.

Blocks inside hand-written pages, refilled between ``<!-- KIND:NAME:start -->`` and ``<!-- KIND:NAME:end -->``:

- ``results:NAME``  the text of section NAME of ``bench/RESULTS.md`` (``bench/results.py`` writes the sections);
- ``config:NAME``   the reference table of config section NAME (``run``, ``data``, ``data.partition``, ...),
  rendered from the pydantic schema in ``kumiki/config.py``: keys, types, defaults, bounds and descriptions;
- ``method:NAME``   the knob table of method NAME, rendered from its config class in the registry.

This module imports ``bench.results`` (to read sections) and the config schema; nothing imports it back:
``bench.results.publish`` runs it as a program after a benchmark writes its section.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Generated whole pages: docs page -> its source file (relative to the repository root).
COPIES = {"index.md": "README.md", "runbook.md": "deploy/README.md"}
#: Repository files that are pages of the site (a link to one becomes a link to its page).
PAGE_OF = {**{src: page for page, src in COPIES.items()}, "bench/RESULTS.md": "bench-results.md"}
SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$', re.M)
BLOCK = re.compile(r"<!-- (results|config|method):([A-Za-z0-9_.-]+):start -->\n.*?<!-- \1:\2:end -->", re.S)
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _banner(src: str) -> str:
    return (f"<!-- Generated from {src} by docs/gen.py: edit {src}, then run `python docs/gen.py`. -->\n")


# ------------------------------------------------------------------------------------------------ links
def _outside_code(text: str, fn) -> str:
    """Apply ``fn`` to the text outside fenced code blocks (links in code are not links)."""
    out, chunk, fence = [], [], False
    for line in text.splitlines(keepends=True):
        if FENCE.match(line):
            if not fence:
                out.append(fn("".join(chunk)))
                chunk = []
            fence = not fence
            out.append(line)
            continue
        (out if fence else chunk).append(line)
    out.append(fn("".join(chunk)))
    return "".join(out)


def relink(text: str, src: str, page: str) -> str:
    """Rewrite the relative links of ``text`` (a file at ``src``, relative to the root) for docs page ``page``.

    A link to a file under docs/ or to a file that is a page (README.md, deploy/README.md, bench/RESULTS.md)
    points at that page; a link to any other file of the repository becomes its text and the path in code
    (the site holds pages, not the source tree); URLs and links within the page stay as they are.
    """
    here = Path(src).parent
    page_dir = Path(page).parent

    def one(m: re.Match) -> str:
        bang, label, target = m.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return m.group(0)
        path, _, anchor = target.partition("#")
        repo = _normalize(here / path)
        if repo in PAGE_OF:
            repo = f"docs/{PAGE_OF[repo]}"
        if repo.startswith("docs/"):
            rel = _relative(repo.removeprefix("docs/"), page_dir)
            return f"{bang}[{label}]({rel}{'#' + anchor if anchor else ''})"
        if label == repo:
            return f"`{repo}`"
        return label if f"`{repo}`" in label else f"{label} (`{repo}`)"

    return _outside_code(text, lambda chunk: LINK.sub(one, chunk))


def _normalize(p: Path) -> str:
    parts: list[str] = []
    for x in p.as_posix().split("/"):
        if x in ("", "."):
            continue
        if x == "..":
            if parts:
                parts.pop()
            continue
        parts.append(x)
    return "/".join(parts)


def _relative(target: str, from_dir: Path) -> str:
    up = len([x for x in from_dir.as_posix().split("/") if x not in ("", ".")])
    return "../" * up + target


# ------------------------------------------------------------------------------------------------ config
def _type(ann: Any) -> str:
    """A pydantic field annotation in an operator's words: ``int``, ``"a" or "b"``, ``list of str``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is Literal:
        return " or ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        body = " or ".join(_type(a) for a in inner)
        return body + (" or none" if len(inner) < len(args) else "")
    if origin is list:
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "table"
    if isinstance(ann, type):
        from pydantic import BaseModel

        if issubclass(ann, BaseModel):
            return "table"
        return {"str": "string", "bool": "boolean", "int": "integer", "float": "number"}.get(ann.__name__,
                                                                                          ann.__name__)
    return str(ann)


def _toml(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    if hasattr(v, "model_dump"):
        return _toml(v.model_dump())
    return repr(v)


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        return f"`{_toml(field.default_factory())}`"
    return f"`{_toml(field.default)}`"


def _bounds(field) -> str:
    """The numeric bounds, lengths and patterns pydantic enforces, e.g. ``> 0, ≤ 1``."""
    out = []
    names = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    for meta in field.metadata:
        for attr, sym in names.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sym} {value:,}" if isinstance(value, int) else f"{sym} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    inner = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) is list and inner and typing.get_origin(inner[0]) is typing.Annotated:
        for meta in typing.get_args(inner[0])[1:]:
            for attr, sym in names.items():
                value = getattr(getattr(meta, "metadata", [None])[0] if getattr(meta, "metadata", None) else meta,
                                attr, None)
                if value is not None:
                    out.append(f"each {sym} {value}")
            pattern = getattr(meta, "pattern", None)
            if pattern:
                out.append(f"each matches `{pattern}`")
    return ", ".join(out)


def _prose(doc: str) -> str:
    """A docstring paragraph as one Markdown line (reST's double backticks become Markdown's)."""
    return " ".join(doc.split()).replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(model, prefix: str, skip: tuple[str, ...] = (), note: str = "") -> str:
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        meaning = field.description or ""
        rows.append(f"| `{prefix}{name}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | "
                    f"{_cell(_bounds(field))} | {_cell(meaning + note)} |")
    return "\n".join(rows)


def _model_of(field) -> Any:
    """The pydantic model a field holds (a section, or the items of a list of tables)."""
    ann = field.annotation
    if typing.get_origin(ann) is list:
        ann = typing.get_args(ann)[0]
    return ann


def _sections() -> dict[str, tuple[Any, str, tuple[str, ...]]]:
    """Config section name -> (its pydantic model, its key prefix, fields rendered elsewhere), read from the
    top-level schema itself, so a section added, moved to another module or renamed is found."""
    from kumiki.config import KumikiConfig

    out: dict[str, tuple[Any, str, tuple[str, ...]]] = {}
    for name, field in KumikiConfig.model_fields.items():
        if name == "method":  # a union over the methods: one table per method, on its page
            continue
        model = _model_of(field)
        tables = tuple(k for k, f in model.model_fields.items()
                       if typing.get_origin(f.annotation) is list and hasattr(_model_of(f), "model_fields"))
        out[name] = (model, f"{name}.", ("partition",) if name == "data" else tables)
        for k in tables:
            out[f"{name}.{k}"] = (_model_of(model.model_fields[k]), f"{name}.{k}[].", ())
    return out


def _partitions() -> tuple[Any, ...]:
    from kumiki.config import KumikiConfig

    ann = _model_of(KumikiConfig.model_fields["data"]).model_fields["partition"].annotation
    union = typing.get_args(ann)[0] if typing.get_origin(ann) is typing.Annotated else ann
    return typing.get_args(union)


def config_block(name: str) -> str:
    """The reference table of one config section (``data.partition``: one table per partition kind)."""
    if name == "data.partition":
        out = []
        for model in _partitions():
            kind = model.model_fields["kind"].default
            doc = _prose((model.__doc__ or "").strip().split("\n\n")[0])
            out.append(f"`data.partition = {{kind = \"{kind}\", ...}}`" + (f": {doc}" if doc else ""))
            extra = [n for n in model.model_fields if n != "kind"]
            out.append("\n" + _table(model, "data.partition.", skip=("kind",)) + "\n" if extra else "")
        return "\n".join(out).strip()
    sections = _sections()
    if name not in sections:
        raise KeyError(f"no config section {name!r}; known: {', '.join(sections)}, data.partition")
    model, prefix, skip = sections[name]
    return _table(model, prefix, skip)


def method_block(name: str) -> str:
    """A method's knobs (``[method]`` keys) and the paper optimizer it brings, from the registry."""
    from kumiki.registry import METHODS

    if name not in METHODS:
        raise KeyError(f"no method {name!r}; known: {', '.join(METHODS)}")
    cfg = METHODS[name].config
    summary = _prose((cfg.__doc__ or "").strip().split("\n\n")[0])
    out = [f"`method.name = \"{name}\"`: {summary}", ""]
    if [k for k in cfg.model_fields if k != "name"]:
        out.append(_table(cfg, "method.", skip=("name",)))
    else:
        out.append("No knobs.")
    if cfg.train_defaults:
        td = ", ".join(f"`train.{k} = {_toml(v)}`" for k, v in cfg.train_defaults.items())
        out += ["", f"Paper optimizer (fills each `[train]` key the config leaves unset): {td}."]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ blocks
def _results_block(name: str) -> str | None:
    from bench.results import RESULTS, read_section

    return read_section(name, RESULTS)


def fill_blocks(text: str) -> tuple[str, list[str]]:
    """``text`` with every block refilled, and the blocks whose source is missing (left as they were)."""
    missing: list[str] = []

    def fill(m: re.Match) -> str:
        kind, name = m.groups()
        try:
            body = {"results": _results_block, "config": config_block, "method": method_block}[kind](name)
        except KeyError as e:
            body, why = None, str(e)
        else:
            why = f"bench/RESULTS.md has no section {name!r}"
        if body is None:
            missing.append(f"{kind}:{name} ({why})")
            return m.group(0)
        return f"<!-- {kind}:{name}:start -->\n{body.rstrip()}\n<!-- {kind}:{name}:end -->"

    return BLOCK.sub(fill, text), missing


# ------------------------------------------------------------------------------------------------ link check
def slug_mkdocs(text: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc extension) gives a heading."""
    import unicodedata

    value = unicodedata.normalize("NFKD", _heading_text(text)).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def slug_github(text: str) -> str:
    """The anchor GitHub gives a heading (how README.md and deploy/README.md are read there)."""
    value = _heading_text(text).strip().lower()
    return re.sub(r"[^\w\- ]", "", value).replace(" ", "-")


def _heading_text(text: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"<[^>]+>", "", text).replace("`", "").replace("**", "")


def expand_snippets(text: str) -> str:
    """The page as MkDocs renders it: each ``--8<-- "path"`` line replaced by that file (path from the root)."""
    return SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text() if (ROOT / m.group(1)).is_file()
                       else m.group(0), text)


def anchors(text: str, github: bool) -> set[str]:
    """Every anchor of a Markdown page: its headings' slugs (repeats numbered as the renderer does) and
    explicit ``<a id="...">`` / ``{#...}`` anchors."""
    text = expand_snippets(text)
    out: set[str] = set()
    fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            fence = not fence
            continue
        if fence:
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = (slug_github if github else slug_mkdocs)(m.group(1))
            slug, n = base, 0
            while slug in out:
                n += 1
                slug = f"{base}-{n}" if github else f"{base}_{n}"
            out.add(slug)
        out.update(re.findall(r"""<a\s+(?:id|name)=["']([^"']+)["']""", line))
        out.update(re.findall(r"\{#([A-Za-z0-9_.:-]+)\}", line))
    return out


def links(text: str) -> list[str]:
    """The link and image targets of a Markdown page, outside code blocks and code spans."""
    found: list[str] = []

    def grab(chunk: str) -> str:
        chunk = re.sub(r"(`+)(?:(?!\1).)+?\1", "", chunk, flags=re.S)
        found.extend(m.group(3) for m in LINK.finditer(chunk))
        return chunk

    _outside_code(expand_snippets(text), grab)
    return found


def broken_links(files: list[Path] | None = None, root: Path = ROOT) -> list[str]:
    """Every relative link or #anchor in README.md and docs/ that does not resolve, as ``file: target (why)``.

    A docs page may link only to pages and files under docs/ (the site holds nothing else); README.md may
    also link to files of the repository. Anchors are checked against the target's headings as MkDocs
    slugs them (docs/) or as GitHub does (files outside docs/)."""
    docs = (root / "docs").resolve()
    if files is None:
        files = [root / "README.md", *sorted(docs.rglob("*.md"))]
    cache: dict[Path, set[str]] = {}
    bad = []
    for f in files:
        f = f.resolve()
        text = f.read_text()
        name = f.relative_to(root.resolve()).as_posix()
        for path in SNIPPET.findall(text):
            if not (ROOT / path).is_file():
                bad.append(f"{name}: --8<-- {path} (no such file)")
        for target in links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            where = f"{name}: {target}"
            in_docs = docs in dest.parents
            if docs in f.parents and not in_docs:
                bad.append(f"{where} (outside docs/: the site cannot serve it)")
                continue
            if not dest.exists():
                bad.append(f"{where} (no such file)")
                continue
            if anchor:
                if dest.suffix != ".md":
                    bad.append(f"{where} (an anchor into a file that is not Markdown)")
                    continue
                if dest not in cache:
                    cache[dest] = anchors(dest.read_text(), github=not in_docs)
                if anchor not in cache[dest]:
                    bad.append(f"{where} (no heading or anchor #{anchor})")
    return bad


# ------------------------------------------------------------------------------------------------ pages
def expected() -> tuple[dict[Path, str], list[str]]:
    """Every generated page and every page with blocks, as it should read; and the problems found."""
    pages: dict[Path, str] = {}
    problems: list[str] = []
    for page, src in COPIES.items():
        text = relink((ROOT / src).read_text(), src, page)
        pages[DOCS / page] = _banner(src) + text
    for path in sorted(DOCS.rglob("*.md")):
        if path.relative_to(DOCS).as_posix() in COPIES:
            continue
        text = path.read_text()
        if BLOCK.search(text):
            new, missing = fill_blocks(text)
            problems += [f"{path.relative_to(ROOT)}: {x}" for x in missing]
            pages[path] = new
    return pages, problems


def stale() -> tuple[list[Path], list[str]]:
    """The pages that differ from what this module generates, and the blocks without a source."""
    pages, problems = expected()
    return [p for p, text in pages.items() if not p.exists() or p.read_text() != text], problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if a page is out of date")
    a = ap.parse_args(argv)
    pages, problems = expected()
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    changed = [p for p, text in pages.items() if not p.exists() or p.read_text() != text]
    if a.check:
        for b in broken_links():
            print(f"broken link: {b}", file=sys.stderr)
            problems.append(b)
        for p in changed:
            print(f"{p.relative_to(ROOT)} is out of date: run python docs/gen.py", file=sys.stderr)
        return 1 if changed or problems else 0
    for p in changed:
        p.write_text(pages[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
