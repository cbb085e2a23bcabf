"""Site folders whose images a factory's pipeline already normalized (issue 20): site.json's ``inputs`` declares
the range or the per-channel standardization, the loader checks it against the data, the values reach the model
as stored, and the report shows each factory's scale. Undeclared data outside [0, 1] is refused, naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kumiki.data.sites import SiteDataError, load_site, write_site
from kumiki.data.prepare import materialize
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config

MEAN, STD = [0.2, 0.5, 0.7], [0.25, 0.5, 0.3]


def _site(folder, x, inputs=None, n_test=10):
    y = np.arange(len(x)) % 3
    meta = {"name": folder.name, "role": "train", "num_classes": 3, "input_shape": list(x.shape[1:])}
    if inputs is not None:
        meta["inputs"] = inputs
    return write_site(folder, meta, x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def _pixels(channels=1, n=40, seed=0):
    return np.random.default_rng(seed).random((n, channels, 4, 4), dtype=np.float32)


def test_a_declared_range_is_checked_and_kept_as_stored(tmp_path):
    x = _pixels() * 2 - 1  # PFLlib's Normalize(0.5, 0.5): [-1, 1]
    with pytest.raises(SiteDataError, match=r'pixel values span .*site.json.*"inputs": \{"range"'):
        load_site(_site(tmp_path / "undeclared", x))
    site = load_site(_site(tmp_path / "declared", x, {"range": [-1, 1]}))
    assert np.array_equal(np.concatenate([site.x_test, site.x_train]), x), "the model sees the pipeline's values"
    assert site.inputs.startswith("range [-1, 1]; data [-0.9") and site.inputs.endswith("]")
    with pytest.raises(SiteDataError, match=r"channel 0 spans .* outside \[-0.5, 1\]"):
        load_site(_site(tmp_path / "too-narrow", x, {"range": [-0.5, 1]}))
    with pytest.raises(SiteDataError, match="site.json.*low < high"):
        load_site(_site(tmp_path / "backwards", x, {"range": [1, -1]}))
    folder = _site(tmp_path / "uint8", x, {"range": [0, 255]})
    with np.load(folder / "train.npz") as z:
        np.savez(folder / "train.npz", x=(_pixels(n=30) * 255).astype(np.uint8), y=z["y"])  # write_site stores float32
    with pytest.raises(SiteDataError, match="x is uint8 .* but site.json declares inputs"):
        load_site(folder)


def test_a_declared_standardization_is_checked_per_channel(tmp_path):
    p = _pixels(channels=3)
    mean, std = np.array(MEAN, np.float32)[:, None, None], np.array(STD, np.float32)[:, None, None]
    x = (p - mean) / std  # torchvision's Normalize(mean, std) of [0, 1] pixels
    declared = {"standardized": {"mean": MEAN, "std": STD}}
    site = load_site(_site(tmp_path / "std", x, declared))
    assert np.array_equal(np.concatenate([site.x_test, site.x_train]), x)
    assert site.inputs.startswith("standardized mean [0.2, 0.5, 0.7] std [0.25, 0.5, 0.3]; data [")
    # the same arrays standardized with another mean than declared: channel 2 leaves what [0, 1] pixels can give
    other = x.copy()
    other[:, 2] = (p[:, 2] - 0.1) / STD[2]
    with pytest.raises(SiteDataError, match=r"channel 2 spans"):
        load_site(_site(tmp_path / "wrong-mean", other, declared))
    with pytest.raises(SiteDataError, match="one per channel"):
        load_site(_site(tmp_path / "two-means", x, {"standardized": {"mean": [0.1, 0.2], "std": [1]}}))
    with pytest.raises(SiteDataError, match="NaN"):
        bad = x.copy()
        bad[0, 0, 0, 0] = np.nan
        load_site(_site(tmp_path / "nan", bad, declared))


def test_a_federation_records_each_factorys_declared_scale(tmp_path):
    src = make_config(tmp_path / "src", sites=2)
    folders = materialize(src, tmp_path / "sites")
    meta = json.loads((folders[1] / "site.json").read_text())
    meta["inputs"] = {"range": [-1, 1]}
    for split in ("train", "test"):
        with np.load(folders[1] / f"{split}.npz") as z:
            x, y = z["x"], z["y"]
        np.savez(folders[1] / f"{split}.npz", x=x * 2 - 1, y=y)
    (folders[1] / "site.json").write_text(json.dumps(meta))
    cfg = make_config(tmp_path, rounds=1, sites=2,
                      data={"dataset": "site-folders", "path": str(tmp_path / "sites"), "input_shape": [1, 8, 8],
                            "num_classes": 10, "partition": {"kind": "iid"}})
    summary = run_inprocess(cfg, quiet=True)
    profiles = summary["participation"]["profiles"]
    assert profiles["site-0"]["inputs"] == "[0, 1]"
    assert profiles["site-1"]["inputs"].startswith("range [-1, 1]; data [-1, 1]")
    html = (cfg.run_dir() / "report.html").read_text()
    assert "<th>inputs</th>" in html and "range [-1, 1]; data [-1, 1]" in html
