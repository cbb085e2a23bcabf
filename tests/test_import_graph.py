"""No import circles between the project's modules (issue 20).

The graph is read from the source with ``ast``, not from ``sys.modules``: every ``import`` and ``from ... import``
anywhere in a file counts, including those inside functions and ``if TYPE_CHECKING:`` blocks, which is how
circles hide (a function-level import runs late enough not to crash, yet still ties two modules in a knot that
a reader follows back and forth). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module of
ours, else to ``pkg``. A circle is a strongly connected component of more than one module (or a module
importing itself).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kumiki", "client", "server", "strategies", "models", "launch", "bench")

# Circles owned by other work of issue 20 that is merged separately (the privacy helper untangles the loop and
# privacy; the docs helper replaces readme_sync). The lead empties this list at merge: nothing else may be added.
ALLOWED: list[frozenset[str]] = [
]


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its ``__init__``)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that ``module`` imports, wherever in the file the import statement is."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in known else src for a in node.names]
        else:
            continue
        for t in targets:
            r = _resolve(t, known)
            if r is not None and r != module:
                out.add(r)
    return out


def graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {m: imports(m, p, known) for m, p in known.items()}


def circles(g: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


def _path(g: dict[str, set[str]], comp: frozenset[str]) -> str:
    """One circle through the component, for the message: a -> b -> a."""
    start = min(comp)
    prev, seen, frontier = {start: None}, {start}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v] & comp):
                if w == start:
                    chain = [v]
                    while prev[chain[-1]] is not None:
                        chain.append(prev[chain[-1]])
                    return " -> ".join([*reversed(chain), start])
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return ", ".join(sorted(comp))


def test_the_project_has_no_import_circles():
    g = graph()
    assert len(g) > 100, "the scan found the project's modules"
    found = circles(g)
    bad = [c for c in found if c not in ALLOWED]
    assert not bad, "import circles:\n" + "\n".join(_path(g, c) for c in bad)


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "kumiki"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "sites.py").write_text("from kumiki.data import text\n")
    (pkg / "data" / "text.py").write_text("def f():\n    from kumiki import hierarchy\n")
    (pkg / "hierarchy.py").write_text("from .data.sites import load_site\n")
    (pkg / "leaf.py").write_text("import kumiki.data.text\n")
    g = graph(tmp_path, ("kumiki",))
    assert g["kumiki.hierarchy"] == {"kumiki.data.sites"} and g["kumiki.leaf"] == {"kumiki.data.text"}
    assert circles(g) == [frozenset({"kumiki.data.sites", "kumiki.data.text", "kumiki.hierarchy"})]
    assert _path(g, circles(g)[0]) == "kumiki.data.sites -> kumiki.data.text -> kumiki.hierarchy -> kumiki.data.sites"
