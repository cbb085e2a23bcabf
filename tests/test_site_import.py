"""Onboarding factory data (issue 12, part 7) and factory identity (part 5): `kumiki site import` turns image
folders or a CSV into site folders, and a federation over them names every factory as its site.json does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kumiki.data.imports import import_site
from kumiki.data.sites import SiteDataError, load_site
from launch.cli import cli
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config

CLASSES = ["bolt", "nut", "screw"]


def _digits(n_per_class: int, offset: int = 0):
    """Real 8x8 images (scikit-learn digits 0-2) as uint8 grayscale, with their class names."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for c in range(3):
        idx = np.flatnonzero(d.target == c)[offset:offset + n_per_class]
        out += [((d.images[i] * 255 / 16).round().astype(np.uint8), CLASSES[c]) for i in idx]
    return out


def _class_tree(root, images):
    for i, (img, label) in enumerate(images):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(root / label / f"{i:04d}.png")
    return root


def _csv(root, images):
    root.mkdir(parents=True)
    rows = ["file,label"]
    for i, (img, label) in enumerate(images):
        Image.fromarray(img, mode="L").save(root / f"img{i}.png")
        rows.append(f"img{i}.png,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_imported_factories_run_under_their_own_names_with_sizes_and_cameras(tmp_path):
    sites = tmp_path / "kumiki-sites"
    a = _class_tree(tmp_path / "export-a", _digits(30))
    b = _csv(tmp_path / "export-b", [im for im in _digits(30, offset=30)[:75] if im[1] != "nut"])  # no nuts, 15 screws
    c = _class_tree(tmp_path / "export-c", _digits(20, offset=60))
    meta_a = import_site(a, sites / "factory-a", "factory-a", domain="line 1, camera A", classes=CLASSES)
    import_site(b, sites / "factory-b", "factory-b", classes=CLASSES, test_fraction=0.3)
    import_site(c, sites / "factory-c", "factory-c", role="unseen", domain="line 3", classes=CLASSES)

    # the loader's view of factory-a: shapes, value range, labels, a stratified split
    site = load_site(sites / "factory-a")
    assert site.name == "factory-a" and site.meta["classes"] == CLASSES and site.meta["input_shape"] == [1, 8, 8]
    assert site.x_train.dtype == np.float32 and site.x_train.shape[1:] == (1, 8, 8)
    assert (len(site.y_train), len(site.y_test)) == (72, 18) == (meta_a["num_train"], meta_a["num_test"])
    assert np.bincount(site.y_test).tolist() == [6, 6, 6], "every class is in the test split"
    first = _digits(30)[0][0].astype(np.float32) / 255  # PNG is lossless: the pixels come back exactly
    assert any(np.array_equal(x[0], first) for x in np.concatenate([site.x_train, site.x_test]))
    with_b = load_site(sites / "factory-b")
    assert np.bincount(with_b.y_train, minlength=3).tolist() == [21, 0, 11], "labels follow --classes, not the CSV"

    cfg = make_config(tmp_path, rounds=1, sites=2, unseen=1, method="fedper",
                      data={"dataset": "site-folders", "path": str(sites), "input_shape": [1, 8, 8], "num_classes": 3,
                            "partition": {"kind": "iid"}})
    summary = run_inprocess(cfg, quiet=True)
    assert set(summary["personalized"]["per_site"]) == {"factory-a", "factory-b"}
    assert set(summary["unseen_adapted"]["per_site"]) == {"factory-c"}
    profiles = summary["participation"]["profiles"]
    assert profiles["factory-a"] == {"role": "train", "group": "", "domain": "line 1, camera A", "inputs": "[0, 1]",
                                     "num_train": 72, "num_test": 18}
    assert profiles["factory-b"]["domain"] is None and profiles["factory-c"]["role"] == "unseen"
    assert sorted(p.name for p in (cfg.run_dir() / "state").iterdir()) == ["factory-a", "factory-b", "factory-c"]
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["kind"] == "site"} == {"factory-a", "factory-b", "factory-c"}
    html = (cfg.run_dir() / "report.html").read_text()  # written by the round driver itself
    assert "line 1, camera A" in html and "factory-c" in html and "site-0" not in html
    assert ">72<" in html and ">18<" in html


def test_import_refuses_what_the_site_could_not_load_and_never_overwrites(tmp_path):
    src = _class_tree(tmp_path / "src", _digits(6))
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(src / "nut" / "big.png")
    with pytest.raises(SiteDataError, match=r"differ in size .*--size"):
        import_site(src, tmp_path / "out", "factory-x")
    meta = import_site(src, tmp_path / "out", "factory-x", size=(8, 8), grayscale=False)
    assert meta["input_shape"] == [3, 8, 8] and load_site(tmp_path / "out").x_train.max() <= 1.0
    with pytest.raises(SiteDataError, match="already exists"):
        import_site(src, tmp_path / "out", "factory-x", size=(8, 8))
    with pytest.raises(SiteDataError, match="not in --classes"):
        import_site(src, tmp_path / "out2", "factory-x", size=(8, 8), classes=["bolt", "nut"])
    (src / "bolt" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SiteDataError, match=r"cannot be read, e\.g\. .*broken\.png"):
        import_site(src, tmp_path / "out3", "factory-x", size=(8, 8))
    with pytest.raises(SiteDataError, match="outside the source"):
        import_site(src, src / "site", "factory-x", size=(8, 8))
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists(), "a failed import writes nothing"

    (src / "bolt" / "broken.png").unlink()
    r = CliRunner().invoke(cli, ["site", "import", str(src), str(tmp_path / "out"), "--name", "factory-x",
                                 "--size", "8x8", "--grayscale", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "site.json").read_text())["input_shape"] == [1, 8, 8]
    assert [p.name for p in tmp_path.glob("out.replaced-*")], "the old folder was moved aside, not deleted"
    r = CliRunner().invoke(cli, ["site", "import", str(src), str(tmp_path / "o4"), "--name", "bad name"])
    assert r.exit_code == 2 and "a site name is" in r.output
