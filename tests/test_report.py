"""server.report: the self-contained HTML report of one run (synthetic run dirs, no training)."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from server.report import render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _describe(per_site: dict[str, float] | None) -> dict | None:
    if not per_site:
        return None
    vals = sorted(per_site.values())
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return {"mean": mean, "std": std, "bottom10": vals[0], "per_site": dict(per_site)}


def make_run(
    root: Path,
    *,
    method: str = "fedavg",
    rounds: int = 4,
    with_global: bool = True,
    with_unseen: bool = True,
    rejected: dict[int, list[dict]] | None = None,
    train_sites: int = 3,
) -> Path:
    """Write summary.json / metrics.jsonl / config.json following the run dir contract."""
    run = root / "run"
    run.mkdir(parents=True)
    rejected = rejected or {}
    train = [f"site-{i}" for i in range(train_sites)]
    unseen = [f"site-{train_sites}"] if with_unseen else []
    lines, history = [], []
    for r in range(1, rounds + 1):
        pers = {s: min(1.0, 0.3 + 0.1 * r + 0.05 * i) for i, s in enumerate(train)}
        glob = {s: v - 0.07 for s, v in pers.items()} if with_global else None
        uns = {s: 0.2 + 0.05 * r for s in unseen} if with_unseen else None
        up, down = (0, 0) if method == "local" else (600_000 + r, 1_500_000)
        row = {
            "kind": "round", "round": r,
            "personalized": _describe(pers), "global": _describe(glob), "unseen": _describe(uns),
            "bytes": {"up": up, "down": down},
            "time": {"round_s": 1.0 + 0.1 * r, "wall_s": 1.1 * r},
            "sites": {"sampled": train_sites, "accepted": train_sites - len(rejected.get(r, [])),
                      "aggregated": True, "rejected": rejected.get(r, [])},
            "train_loss": 1.0 / r,
        }
        lines.append(row)
        history.append(row)
        for s in train + unseen:
            role = "train" if s in train else "unseen"
            lines.append({"kind": "site", "round": r, "site": s, "role": role,
                          "personalized": pers.get(s), "global": (glob or uns or {}).get(s),
                          "train_loss": 0.5 if role == "train" else None,
                          "num_examples": 100 if role == "train" else None})
        lines.append({"kind": "heartbeat", "round": r})  # unknown kinds are ignored
    last = history[-1]

    def m(key):
        return last[key]["mean"] if last[key] else None

    def l5(key):
        vals = [h[key]["mean"] for h in history[-5:] if h[key]]
        return sum(vals) / len(vals) if vals else None

    lines.append({"kind": "final", "last_round": {k: m(k) for k in ("personalized", "global", "unseen")},
                  "last5_mean": {k: l5(k) for k in ("personalized", "global", "unseen")},
                  "rejections": sum(len(v) for v in rejected.values())})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = {
        "method": method, "dataset": "digits", "metric": "accuracy", "rounds": rounds, "sites": train_sites,
        "personalized": last["personalized"],
        "global": {"mean": m("global"), "per_site": last["global"]["per_site"]} if with_global else None,
        "unseen": {"mean": m("unseen"), "per_site": last["unseen"]["per_site"]} if with_unseen else None,
        "bytes": {"up_per_round": last["bytes"]["up"], "down_per_round": last["bytes"]["down"],
                  "up_total": last["bytes"]["up"] * rounds, "down_total": last["bytes"]["down"] * rounds},
        "time": {"wall_s": 1.1 * rounds, "per_round_s": 1.2},
        "privacy": None,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    config = {"run": {"name": "synthetic", "rounds": rounds, "seed": 0, "output_dir": str(root)},
              "method": {"name": method},
              "data": {"dataset": "digits", "sites": train_sites, "unseen_sites": len(unseen)},
              "engine": "inprocess"}
    (run / "config.json").write_text(json.dumps(config))
    return run


def pngs(text: str) -> list[bytes]:
    return [base64.b64decode(b, validate=True) for b in IMG_RE.findall(text)]


def assert_self_contained(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()
    assert not re.search(r'(src|href)="(?!data:)', text), "external asset reference"


@pytest.fixture(autouse=True)
def no_open_figures():
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "report left matplotlib figures open"


def test_full_run_renders_plots(tmp_path):
    run = make_run(tmp_path, method="fedavg", rounds=7)
    out = render_report(run)
    assert out == run / "report.html" and out.is_file()
    text = out.read_text()
    assert_self_contained(text)
    assert "fedavg" in text and "digits" in text and "inprocess" in text
    images = pngs(text)
    assert len(images) >= 3
    assert len(images) == 4  # accuracy, per-site, scatter, bytes/time
    assert all(img.startswith(PNG_MAGIC) for img in images)
    assert "mean of last 5" in text
    assert "no updates were rejected" in text
    # re-rendering overwrites in place and leaves no temp file
    render_report(str(run))
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "report.html", "summary.json"]


@pytest.mark.parametrize("global_form", ["null", "empty"])
def test_local_only_run_without_global_or_unseen(tmp_path, global_form):
    run = make_run(tmp_path, method="local", rounds=3, with_global=False, with_unseen=False)
    if global_form == "empty":  # what the recorder writes when no global values exist
        s = json.loads((run / "summary.json").read_text())
        s["global"] = {"mean": None, "per_site": {}}
        (run / "summary.json").write_text(json.dumps(s))
    text = render_report(run).read_text()
    assert_self_contained(text)
    assert "local" in text
    images = pngs(text)
    assert len(images) >= 3  # accuracy, per-site (personalized only), bytes/time; no scatter
    assert all(img.startswith(PNG_MAGIC) for img in images)
    assert "no global-model evaluation" in text
    assert "mean of last 3" in text


def test_single_round(tmp_path):
    run = make_run(tmp_path, rounds=1)
    images = pngs(render_report(run).read_text())
    assert len(images) >= 3 and all(img.startswith(PNG_MAGIC) for img in images)


def test_rejections_are_listed_and_escaped(tmp_path):
    evil = "<script>alert('x')</script>"
    run = make_run(tmp_path, method="fedavg<b>", rounds=3, rejected={
        2: [{"site": "site-1", "reason": evil}],
        3: [{"site": "<img src=x>", "reason": "no reply"}, {"site": "site-2", "reason": "NaN in update & shape"}],
    })
    text = render_report(run).read_text()
    assert_self_contained(text)
    assert evil not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "<img src=x>" not in text and "&lt;img src=x&gt;" in text
    assert "fedavg<b>" not in text and "fedavg&lt;b&gt;" in text
    assert "NaN in update &amp; shape" in text
    assert re.search(r"rejected updates</td><td[^>]*>3<", text)
    assert text.count("<td>site-2</td>") == 1


def test_missing_and_broken_inputs(tmp_path):
    # an empty run dir still gives a (plot-less) report
    empty = tmp_path / "empty"
    empty.mkdir()
    text = render_report(empty).read_text()
    assert_self_contained(text)
    assert pngs(text) == []
    # no summary.json, a garbled line, NaN values and null sections: the metrics alone suffice
    run = make_run(tmp_path, rounds=2)
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["personalized"]["std"] = float("nan")
    first["unseen"] = None
    lines[0] = json.dumps(first)
    lines.insert(1, "{not json")
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = render_report(run).read_text()
    assert "fedavg" in text  # from config.json
    assert len(pngs(text)) == 4
    with pytest.raises(FileNotFoundError):
        render_report(tmp_path / "nope")


def test_summary_table_puts_last_round_and_last_five_in_their_columns(tmp_path):
    """Values, not just headers: the 'last round' cell is the last round's mean, the next one the last-5 mean."""
    from server.report import fmt_acc

    run = make_run(tmp_path, method="fedavg", rounds=7)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["kind"] == "round"]
    text = render_report(run).read_text()
    for label, key in (("personalized mean", "personalized"), ("global mean", "global"),
                       ("unseen mean (zero-shot)", "unseen")):
        last = rounds[-1][key]["mean"]
        last5 = sum(r[key]["mean"] for r in rounds[-5:]) / 5
        assert fmt_acc(last) != fmt_acc(last5), "the fixture must tell the two columns apart"
        m = re.search(rf"<tr><td>{re.escape(label)}</td><td class=\"n\">([^<]*)</td><td class=\"n\">([^<]*)</td>", text)
        assert m, label
        assert m.groups() == (fmt_acc(last), fmt_acc(last5)), label
