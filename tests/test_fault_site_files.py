"""Fault family: a site's own files (state and data) are damaged, missing, shared or malformed.

Each case used to pass silently or fail with a bare library error (issue 7). Now the site refuses
with a message that names the file and the fix; the server logs it as that site's rejection and
the others go on; nothing is overwritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from client.state import FILE, OWNER
from kumiki import contract as C
from kumiki.data.sites import SiteDataError, check_against_model, load_site, write_site
from kumiki.data.prepare import materialize
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config


def _rows(cfg):
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if r["kind"] == "round"}


def _before_round(rnd: int, action):
    """Run ``action(grid)`` once, just before the training messages of round ``rnd`` go out."""
    def hook(grid):
        send, done = grid.send_and_receive, []

        def wrapped(messages, *, timeout=None):
            messages = list(messages)
            if not done and any(m.metadata.message_type == "train" and int(m.content[C.CONFIG][C.ROUND]) == rnd
                                for m in messages):
                done.append(action(grid))
            return send(messages, timeout=timeout)

        grid.send_and_receive = wrapped
    return hook


def _state(grid, node=2) -> Path:
    return Path(grid.contexts[node].node_config["state-dir"]) / FILE


@pytest.mark.parametrize("damage", [b"", b"\x80\x02garbage", "truncate"], ids=["empty", "garbage", "truncated"])
def test_unreadable_state_is_refused_with_its_path_and_left_alone(tmp_path, damage):
    def corrupt(grid):
        path = _state(grid)
        data = path.read_bytes()[:200] if damage == "truncate" else damage
        path.write_bytes(data)
        return data

    cfg = make_config(tmp_path, rounds=3, sites=3, method="fedper")
    written = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=_before_round(2, lambda g: written.append(corrupt(g))))
    for rnd in (2, 3):
        [rej] = _rows(cfg)[rnd]["sites"]["rejected"][:1]
        assert rej["site"] == "site-1" and "unreadable" in rej["reason"] and FILE in rej["reason"]
    assert (cfg.run_dir() / "state" / "site-1" / FILE).read_bytes() == written[0], "the damaged file is kept"
    assert summary["status"] == "incomplete" and _rows(cfg)[3]["sites"]["aggregated"]


@pytest.mark.parametrize("policy", ["error", "reset"])
def test_a_deleted_state_file_is_an_error_unless_the_site_says_reset(tmp_path, policy):
    cfg = make_config(tmp_path, rounds=2, sites=3, method="fedper", site={"on_missing_state": policy})
    summary = run_inprocess(cfg, quiet=True, grid_hook=_before_round(2, lambda g: _state(g).unlink()))
    rejected = _rows(cfg)[2]["sites"]["rejected"]
    if policy == "error":
        assert rejected and "missing although this site completed round 1" in rejected[0]["reason"]
        assert summary["status"] == "incomplete"
    else:
        assert rejected == [] and summary["status"] == "ok"


def test_state_without_its_personal_tensors_is_refused(tmp_path):
    def strip(grid):
        path = _state(grid)
        raw = torch.load(path, weights_only=True)
        raw["personal"].pop("head.bias")
        torch.save(raw, path)

    cfg = make_config(tmp_path, rounds=2, sites=3, method="fedper")
    run_inprocess(cfg, quiet=True, grid_hook=_before_round(2, strip))
    rej = _rows(cfg)[2]["sites"]["rejected"][0]  # the training reply (the evaluation one follows)
    assert rej["site"] == "site-1" and "lacks personal tensors ['head.bias']" in rej["reason"]


def test_two_sites_given_one_state_dir_do_not_overwrite_each_other(tmp_path):
    cfg = make_config(tmp_path, rounds=2, sites=3, method="fedper")

    def share(grid):  # site-2 (node 3) is pointed at site-1's state dir from the start
        grid.contexts[3].node_config["state-dir"] = grid.contexts[2].node_config["state-dir"]

    summary = run_inprocess(cfg, quiet=True, grid_hook=share)
    rejected = [r for rnd in _rows(cfg).values() for r in rnd["sites"]["rejected"]]
    assert rejected and all("belongs to site 'site-1'" in r["reason"] for r in rejected if r["site"] == "site-2")
    assert (cfg.run_dir() / "state" / "site-1" / OWNER).read_text().strip() == "site-1"
    assert summary["status"] == "incomplete"


# ----------------------------------------------------------------------------- site data
@pytest.fixture()
def site_dir(tmp_path):
    cfg = make_config(tmp_path, sites=1)
    [folder] = materialize(cfg, tmp_path / "sites")
    return folder


def _rewrite(folder: Path, split: str, **arrays):
    with np.load(folder / f"{split}.npz") as z:
        data = {"x": z["x"], "y": z["y"], **arrays}
    np.savez(folder / f"{split}.npz", **data)


def test_empty_test_split_is_refused(site_dir):
    _rewrite(site_dir, "test", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(SiteDataError, match="test.npz: holds no examples"):
        load_site(site_dir)


def test_truncated_npz_names_the_file(site_dir):
    path = site_dir / "train.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SiteDataError, match=r"train.npz: unreadable"):
        load_site(site_dir)


def test_pixels_outside_the_format_are_refused_and_uint8_is_scaled(site_dir):
    with np.load(site_dir / "train.npz") as z:
        x = z["x"]
    _rewrite(site_dir, "train", x=x * 255.0)
    with pytest.raises(SiteDataError, match="pixel values span"):
        load_site(site_dir)
    _rewrite(site_dir, "train", x=np.round(x * 255).astype(np.uint8))
    data = load_site(site_dir)
    assert data.x_train.dtype == np.float32 and data.x_train.max() <= 1.0 and np.allclose(data.x_train, x, atol=1 / 255)


def test_data_must_fit_the_federations_model(site_dir):
    meta = json.loads((site_dir / "site.json").read_text())
    data = load_site(site_dir)
    with pytest.raises(SiteDataError, match="model takes"):
        check_against_model(data, (1, 28, 28), 10, str(site_dir))
    with pytest.raises(SiteDataError, match="classes"):
        check_against_model(data, tuple(meta["input_shape"]), int(data.y_train.max()), str(site_dir))
    check_against_model(data, tuple(meta["input_shape"]), 10, str(site_dir))


def test_a_site_whose_data_does_not_fit_is_dropped_and_the_run_says_so(tmp_path):
    """Labels beyond the model's classes (site.json claims 20): the site is dropped at discovery, not mid-run."""
    src = make_config(tmp_path / "src", sites=3)
    folders = materialize(src, tmp_path / "sites")
    meta = json.loads((folders[1] / "site.json").read_text())
    meta["num_classes"] = 20
    with np.load(folders[1] / "train.npz") as z:
        y = z["y"].copy()
        x = z["x"].copy()
    y[0] = 15
    with np.load(folders[1] / "test.npz") as z:
        write_site(folders[1], meta, x, y, z["x"], z["y"])
    cfg = make_config(tmp_path, rounds=1, sites=3,
                      data={"dataset": "site-folders", "path": str(tmp_path / "sites"), "input_shape": [1, 8, 8],
                            "num_classes": 10, "partition": {"kind": "iid"}})
    summary = run_inprocess(cfg, quiet=True)
    assert summary["status"] == "incomplete"
    assert set(summary["personalized"]["per_site"]) == {"site-0", "site-2"}
    assert any("label 15" in d["reason"] for d in summary["participation"]["dropped"])
    shutil.rmtree(tmp_path / "sites")
