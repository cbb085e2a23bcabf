"""Draw the pilot's answer (what joining gains each factory) as the README's picture, from the pilot's numbers.

    python docs/pilot_figure.py                                        # redraw docs/img/pilot.svg from pilot.json
    python docs/pilot_figure.py --comparison runs/pilot/comparison.json   # after a new `make pilot`: take its numbers

``docs/img/pilot.json`` holds the numbers the picture shows, in the shape of the ``comparison.json`` that
``kumiki pilot`` writes (``server/compare.py``): per training factory its accuracy alone and joined (mean and
standard deviation over the seeds) and, with the safeguard, the model it serves; per new factory zero-shot,
adapted and alone. ``--comparison`` copies a
real pilot's numbers into it, so the picture is always drawn from a pilot's own output, never typed in.
The SVG is text (fonts as text, no date, a fixed id salt), so the same numbers give the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUMBERS = HERE / "img" / "pilot.json"
FIGURE = HERE / "img" / "pilot.svg"


def trim(comparison: dict) -> dict:
    """The part of a comparison.json the picture needs (means, stds, sites and their cameras)."""
    def s(x):
        return None if not x else {"mean": x.get("mean"), "std": x.get("std"), "n": x.get("n")}

    return {
        "metric": comparison.get("metric", "accuracy"), "fraction": comparison.get("fraction", True),
        "a": {"label": comparison["a"]["label"]}, "b": {"label": comparison["b"]["label"]},
        "seeds": comparison.get("seeds"),
        "train": [{"site": r["site"], "domain": r.get("domain"), "num_train": r.get("num_train"),
                   "num_test": r.get("num_test"), "a": s(r.get("a")), "b": s(r.get("b")),
                   **({"served": s(r["served"]), "serves": r.get("serves")} if r.get("served") else {})}
                  for r in comparison.get("train", [])],
        "unseen": [{"site": r["site"], "domain": r.get("domain"), "num_train": r.get("num_train"),
                    "num_test": r.get("num_test"), "zero_shot": s(r.get("zero_shot")),
                    "adapted": s(r.get("adapted")), "alone": s(r.get("alone"))}
                   for r in comparison.get("unseen", [])],
    }


def camera(domain: str | None) -> str:
    """A pilot's camera code (``rotate:25``) in the picture's words; anything else as given."""
    kind, _, arg = str(domain or "").partition(":")
    words = {"identity": "reference", "rotate": f"tilted {arg}°".replace("-", "\u2212"), "contrast": "low contrast",
             "noise": "sensor noise"}
    return words.get(kind, str(domain or "")) if (arg or kind == "identity") else str(domain or "")


def draw(numbers: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "kumiki", "font.size": 10})
    scale = 100.0 if numbers.get("fraction", True) else 1.0
    unit = " (%)" if scale == 100.0 else ""
    rows = []  # (label, [(series, mean, std)])
    for r in numbers["train"]:
        bars = [("alone", r["b"]), ("joined", r["a"])]
        if r.get("served"):  # the safeguard: what the factory deploys (its choice on validation)
            bars.append(("served (safeguard)", r["served"]))
        rows.append((f"{r['site']}\n{camera(r.get('domain'))}", bars))
    for r in numbers["unseen"]:
        rows.append((f"{r['site']} (new)\n{camera(r.get('domain'))}",
                     [("alone", r["alone"]), ("joined, day one", r["zero_shot"]), ("joined, adapted", r["adapted"])]))
    colours = {"alone": "#9e9e9e", "joined": "#1f77b4", "served (safeguard)": "#2ca02c", "joined, day one": "#aec7e8",
               "joined, adapted": "#1f77b4"}
    fig, ax = plt.subplots(figsize=(8, 4.6))
    width, seen = 0.26, set()
    for i, (_, bars) in enumerate(rows):
        offsets = [(k - (len(bars) - 1) / 2) * width for k in range(len(bars))]
        for off, (series, st) in zip(offsets, bars):
            if not st or st.get("mean") is None:
                continue
            mean, std = st["mean"] * scale, (st.get("std") or 0.0) * scale
            hatch = "//" if series == "joined, adapted" else None
            ax.bar(i + off, mean, width, yerr=std, capsize=3, color=colours[series], hatch=hatch,
                   edgecolor="white" if hatch else None, label=None if series in seen else series)
            ax.text(i + off, 2, f"{mean:.0f}", ha="center", va="bottom", fontsize=8,
                    color="white" if series != "joined, day one" else "black")
            seen.add(series)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylabel(f"{numbers.get('metric', 'accuracy')}{unit}")
    ax.set_ylim(0, 110 if scale == 100.0 else None)
    seeds = numbers.get("seeds") or []
    ax.set_title("What joining gains each factory" + (f", {len(seeds)} seeds (mean ± std)" if seeds else "")
                 + f"\n{numbers['a']['label']} vs {numbers['b']['label']}", fontsize=10)  # two lines: fits
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="svg", metadata={"Date": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comparison", type=Path, help="a pilot's comparison.json (runs/pilot/comparison.json)")
    ap.add_argument("--out", type=Path, default=FIGURE)
    a = ap.parse_args(argv)
    if a.comparison:
        NUMBERS.write_text(json.dumps(trim(json.loads(a.comparison.read_text())), indent=1) + "\n")
        print(f"wrote {NUMBERS}")
    draw(json.loads(NUMBERS.read_text()), a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
