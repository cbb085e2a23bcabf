"""The documentation stays true: the generated pages equal what docs/gen.py makes of their sources (README.md,
deploy/README.md, the config schema, each method's config class, bench/RESULTS.md), and every internal link and
#anchor of README.md and docs/ resolves. Markdown is parsed here, so these checks need no MkDocs; the MkDocs
``--strict`` build runs as well where MkDocs is installed (``make setup`` installs it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@cache
def gen():
    spec = importlib.util.spec_from_file_location("kumiki_docs_gen", DOCS / "gen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_pages_equal_their_sources():
    stale, problems = gen().stale()
    assert not problems, problems
    assert not stale, f"{[str(p.relative_to(ROOT)) for p in stale]} out of date: run python docs/gen.py"


def test_every_internal_link_and_anchor_resolves():
    assert gen().broken_links() == []


def test_the_benchmark_figures_the_readme_held_are_in_the_docs():
    names = {m.group(2) for p in DOCS.rglob("*.md") for m in gen().BLOCK.finditer(p.read_text())
             if m.group(1) == "results"}
    assert {"aggregation", "wire", "scale", "ray", "eval-share", "overhead", "site-compute"} <= names


def test_a_drifted_block_or_copy_is_rewritten():
    g = gen()
    text = (DOCS / "performance.md").read_text()
    edited = text.replace("<!-- results:wire:end -->", "an edit by hand\n<!-- results:wire:end -->", 1)
    assert edited != text and g.fill_blocks(edited)[0] == text
    config = (DOCS / "config.md").read_text()
    edited = config.replace("| `run.seed` |", "| `run.sed` |", 1)
    assert edited != config and g.fill_blocks(edited)[0] == config
    readme = (ROOT / "README.md").read_text()
    assert g.expected()[0][DOCS / "index.md"].endswith(g.relink(readme, "README.md", "index.md"))


def test_the_config_reference_lists_every_key_of_the_schema():
    """Every field of every config section and every method's knob is on a page, with its default."""
    from kumiki.registry import METHODS

    g = gen()
    page = (DOCS / "config.md").read_text()
    for name, (model, prefix, skip) in g._sections().items():
        for key, field in model.model_fields.items():
            if key not in skip:
                row = next((r for r in page.splitlines() if r.startswith(f"| `{prefix}{key}` |")), None)
                assert row and g._default(field) in row, f"{prefix}{key}"
    methods = "".join(p.read_text() for p in (DOCS / "methods").glob("*.md"))
    for name, entry in METHODS.items():
        assert f"<!-- method:{name}:start -->" in methods, name
        for key in entry.config.model_fields:
            assert key == "name" or f"| `method.{key}` |" in methods, f"{name}: method.{key}"


def test_a_required_knob_reads_required():
    g = gen()
    run = g.config_block("run")
    assert "| `run.name` | string | **required** |" in run and "PydanticUndefined" not in run
    assert "| `run.seed` | integer | `0` | ≥ 0 |" in run


def test_the_link_check_finds_a_missing_page_an_anchor_and_a_link_out_of_the_site(tmp_path):
    g = gen()
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "README.md").write_text("# Top\n\n[ok](docs/a.md#a-heading) [bad](docs/a.md#nope) [file](x.txt)\n")
    (tmp_path / "x.txt").write_text("")
    (tmp_path / "docs" / "a.md").write_text(
        "# A heading\n\n```\n[in code](missing.md)\n```\n\n[up](../x.txt) [self](#a-heading) [sub](sub/b.md#b)"
        " `[code](missing.md)`\n")
    (tmp_path / "docs" / "sub" / "b.md").write_text("# B\n\n[back](../a.md) [gone](../c.md) [b](#nope)\n")
    bad = g.broken_links(root=tmp_path)
    assert bad == ["README.md: docs/a.md#nope (no heading or anchor #nope)",
                   "docs/a.md: ../x.txt (outside docs/: the site cannot serve it)",
                   "docs/sub/b.md: ../c.md (no such file)",
                   "docs/sub/b.md: #nope (no heading or anchor #nope)"]


def test_anchors_are_slugged_as_mkdocs_does():
    import re

    markdown = pytest.importorskip("markdown")
    g = gen()
    for h in ["Using `kumiki`", "Issue 3: DualFed, FedHB and peers under domain shift plus label skew",
              "1,000 sites", "Kumiki (組木)", "M-Fed: multi-task sites", "The pilot: what joining gains each factory"]:
        html = markdown.markdown(f"## {h}", extensions=["toc"])
        assert re.search(r'id="([^"]+)"', html).group(1) == g.slug_mkdocs(h), h
    assert g.anchors("## Outputs\n\n## Outputs\n", github=False) == {"outputs", "outputs_1"}
    assert g.anchors("## Outputs\n\n## Outputs\n", github=True) == {"outputs", "outputs-1"}


def test_the_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make pilot" in text and "make test" in text
    assert "](docs/img/pilot.svg)" in text and (DOCS / "img" / "pilot.svg").read_text().lstrip().startswith("<?xml")


def test_mkdocs_builds_the_site_strictly(tmp_path):
    """MkDocs' own check of the same pages (links, anchors, nav); skipped where MkDocs is not installed."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "config.html").is_file() and (tmp_path / "site" / "bench-results.html").is_file()


def _pilot_figure():
    spec = importlib.util.spec_from_file_location("kumiki_pilot_figure", DOCS / "pilot_figure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_pilot_picture_shows_the_numbers_of_the_results_table():
    """docs/img/pilot.json (what the README's picture draws) and the pilot table of docs/results.md agree."""
    import json
    import re

    numbers = json.loads((DOCS / "img" / "pilot.json").read_text())
    page = (DOCS / "results.md").read_text()
    for row in numbers["train"]:
        cells = next(r for r in page.splitlines() if r.startswith(f"| {row['site']} |")).split(" | ")
        alone, joined = (re.match(r"([\d.]+) ± ([\d.]+)", c).groups() for c in cells[3:5])
        assert (f"{100 * row['b']['mean']:.1f}", f"{100 * row['b']['std']:.1f}") == alone, row["site"]
        assert (f"{100 * row['a']['mean']:.1f}", f"{100 * row['a']['std']:.1f}") == joined, row["site"]
        if row.get("served"):  # the safeguard's served model, the column after the joined gain
            assert cells[6].startswith(f"{100 * row['served']['mean']:.1f} ± {100 * row['served']['std']:.1f}"), row["site"]
    for row in numbers["unseen"]:
        line = next(r for r in page.splitlines() if r.startswith(f"| {row['site']} (new) |"))
        assert f"zero-shot {100 * row['zero_shot']['mean']:.1f} ± {100 * row['zero_shot']['std']:.1f}" in line
        assert f"adapted {100 * row['adapted']['mean']:.1f} ± {100 * row['adapted']['std']:.1f}" in line
        assert f"{100 * row['alone']['mean']:.1f} ± {100 * row['alone']['std']:.1f}" in line


def test_the_pilot_picture_is_drawn_from_a_pilots_comparison(tmp_path):
    """A comparison.json as `kumiki pilot` writes it (server/compare.py's keys) becomes the picture's numbers."""
    fig = _pilot_figure()
    st = {"mean": 0.5, "std": 0.1, "min": 0.4, "max": 0.6, "n": 2, "values": [0.4, 0.6]}
    joined = {**st, "mean": 0.7}
    comparison = {"metric": "accuracy", "fraction": True, "a": {"label": "fedavg (joined)", "runs": []},
                  "b": {"label": "local (each factory alone)", "runs": []}, "seeds": [0, 1],
                  "train": [{"site": "plant-x", "domain": "rot90", "num_train": 8, "num_test": 2, "a": joined, "b": st,
                             "gain": st, "served": {**st, "mean": 0.63}, "serves": {"own": 2}}],
                  "unseen": [{"site": "plant-y", "domain": None, "num_train": 8, "num_test": 2, "zero_shot": st,
                              "adapted": st, "alone": st, "gain_zero_shot": st, "gain_adapted": st}]}
    numbers = fig.trim(comparison)
    assert numbers["train"][0]["a"] == {"mean": 0.7, "std": 0.1, "n": 2}
    assert numbers["train"][0]["b"] == numbers["unseen"][0]["adapted"] == {"mean": 0.5, "std": 0.1, "n": 2}
    assert numbers["train"][0]["served"] == {"mean": 0.63, "std": 0.1, "n": 2}  # the safeguard's served model
    fig.draw(numbers, tmp_path / "a.svg")
    fig.draw(numbers, tmp_path / "b.svg")
    svg = (tmp_path / "a.svg").read_text()
    assert "plant-x" in svg and "plant-y (new)" in svg and svg == (tmp_path / "b.svg").read_text()
    assert "served (safeguard)" in svg and ">63<" in svg  # its bar and its value
