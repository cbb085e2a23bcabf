"""`flwr build` / `flwr run` ship the app directory to every node: no factory data or run output may be in it."""

from __future__ import annotations

import zipfile
from io import BytesIO

from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import collect_files

from kumiki.data.imports import default_sites_root
from launch.fab import APP_DIR, fab_paths, shipped_under

#: what a pilot, a deployment's factory folders and an import leave inside a checkout
PLANTED = {
    "runs/pilot/summary.json": b"{}", "runs/pilot/metrics.jsonl": b"{}\n", "runs/pilot/config.json": b"{}",
    "runs/pilot/sites/factory-a/site.json": b"{}", "runs/pilot/sites/factory-a/train.npz": b"x",
    "runs/pilot/checkpoints/resume.npz": b"x", "runs/.kumiki-privacy/factory-a/privacy-1.json": b"{}",
    "runs/pilot/report.html": b"<html>", "deploy/sites/factory-a/data/site.json": b"{}",
    "deploy/sites/factory-a/data/test.npz": b"x", "kumiki-sites/factory-x/site.json": b"{}",
    "experiments/factory-y/site.json": b"{}", "experiments/factory-y/train.npz": b"x",
}


def test_the_fab_holds_the_app_and_no_data_or_run_files():
    files = {**collect_files(APP_DIR), **PLANTED}
    fab, _ = build_fab_from_files(files)  # Flower's own build, on this checkout plus the planted files
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert {"server/app.py", "client/app.py", "pyproject.toml"} <= set(names), "the app itself is in the FAB"
    leaked = [n for n in names if n in PLANTED or n.startswith(("runs/", "kumiki-sites/", "deploy/sites/factory-"))
              or n.endswith((".npz", "site.json", "metrics.jsonl", "summary.json", "report.html"))]
    assert leaked == [], f"flwr build would ship {leaked}"


def test_the_default_data_location_and_runs_are_never_shipped_and_other_folders_are_flagged():
    assert shipped_under(default_sites_root()) == []
    assert shipped_under(APP_DIR / "runs") == [] and shipped_under(APP_DIR / "deploy" / "sites" / "factory-b") == []
    assert shipped_under(APP_DIR / "experiments") == ["experiments/config.json", "experiments/x/config.json"]
    assert fab_paths({"server/app.py": b"", "runs/x/summary.json": b""}) == ["server/app.py"]
