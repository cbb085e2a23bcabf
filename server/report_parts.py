"""The report's small parts, below every page that uses them: escaping, number formats, natural site order,
the run dir's JSON readers and the PNG embedding of a matplotlib figure.

``server.report`` (the page), ``server.report_factories`` (its factory sections) and ``server.compare`` (the
comparison it shows) all use these; none of them imports another upward.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure



def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def num(x: Any) -> float | None:
    """A finite float or None (null, NaN, inf, strings and bools are 'missing')."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def fmt_acc(x: Any) -> str:
    v = num(x)
    return "&ndash;" if v is None else f"{v:.4f}"


def fmt_bytes(x: Any) -> str:
    v = num(x)
    if v is None:
        return "&ndash;"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"  # unreachable


def fmt_seconds(x: Any) -> str:
    v = num(x)
    if v is None:
        return "&ndash;"
    if v < 120:
        return f"{v:.1f} s"
    m, s = divmod(v, 60)
    if m < 60:
        return f"{int(m)} min {s:.0f} s"
    h, m = divmod(m, 60)
    return f"{int(h)} h {int(m)} min"


def site_key(s: str) -> list[Any]:
    """Natural order: site-2 before site-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def mean_of(block: Any) -> float | None:
    return num(block.get("mean")) if isinstance(block, dict) else None


def per_site(block: Any) -> dict[str, float]:
    if not isinstance(block, dict) or not isinstance(block.get("per_site"), dict):
        return {}
    return {str(s): v for s, v in block["per_site"].items() if num(v) is not None}


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def read_metrics(path: Path) -> tuple[list[dict], list[dict], dict]:
    """(round rows sorted by round, site rows, final row); bad lines and unknown kinds are skipped."""
    rounds: dict[int, dict] = {}
    sites: list[dict] = []
    final: dict = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return [], [], {}
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        kind = obj.get("kind")
        if kind == "round" and num(obj.get("round")) is not None:
            rounds[int(obj["round"])] = obj  # a resumed run may repeat a round: keep the last
        elif kind == "site":
            sites.append(obj)
        elif kind == "final":
            final = obj
    return [rounds[r] for r in sorted(rounds)], sites, final


def png(fig: Figure) -> str:
    """Figure -> base64 PNG (Agg canvas; the figure is released afterwards)."""
    try:
        canvas = FigureCanvasAgg(fig)
        buf = io.BytesIO()
        canvas.print_png(buf)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    finally:
        fig.clear()


def img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{esc(alt)}">'
