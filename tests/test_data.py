"""Partitioners, derived site shifts and the per-site folder format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kumiki.data import domains, partition, prepare, sites
from kumiki.data.sources import fashion_mnist_available, load_digits, load_fashion_mnist
from kumiki.config import FMNIST_DEFAULT_DIR
from tests.conftest import make_config


def _labels():
    return load_digits()[1]


def test_dirichlet_uses_every_example_once_and_skews_labels():
    y = _labels()
    parts = partition.dirichlet(y, 6, 0.3, np.random.default_rng(0))
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert min(len(p) for p in parts) >= 10
    # strong skew: some site has a class making up over a third of its data
    assert max(np.bincount(y[p], minlength=10).max() / len(p) for p in parts) > 0.33


def test_iid_and_shards():
    y = _labels()
    iid = partition.iid(y, 4, np.random.default_rng(0))
    assert sum(map(len, iid)) == len(y) and max(map(len, iid)) - min(map(len, iid)) <= 1
    sh = partition.shards(y, 5, 2, np.random.default_rng(0))
    assert sum(map(len, sh)) == len(y)
    assert all(len(np.unique(y[p])) <= 4 for p in sh)  # 2 shards per site -> at most a few labels


def test_domains_are_real_transforms():
    x = load_digits()[0][:5]
    rng = np.random.default_rng(0)
    assert np.allclose(domains.apply(x, "invert", rng), 1 - x)
    assert np.array_equal(domains.apply(x, "rot90", rng), np.rot90(x, 1, axes=(2, 3)))
    c = domains.apply(x, "contrast:0.5", rng)
    assert c.std() < x.std() and c.min() >= 0 and c.max() <= 1
    assert not np.allclose(domains.apply(x, "rotate:30", rng), x)


def test_materialize_writes_site_folders_with_roles(tmp_path):
    cfg = make_config(tmp_path, sites=3, unseen=1, data={"domains": ["identity", "invert"]})
    folders = prepare.materialize(cfg, tmp_path / "sites")
    assert [f.name for f in folders] == ["site-0", "site-1", "site-2", "site-3"]
    metas = [json.loads((f / "site.json").read_text()) for f in folders]
    assert [m["role"] for m in metas] == ["train", "train", "train", "unseen"]
    assert metas[1]["domain"] == "invert" and metas[1]["derived"] is True
    d = sites.load_site(folders[0])
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.y_test) >= 1
    total = sum(len(sites.load_site(f).y_train) + len(sites.load_site(f).y_test) for f in folders)
    assert total == 1797


@pytest.mark.parametrize("breakage, message", [
    ("missing_dir", "not found"),
    ("no_meta", "missing site.json"),
    ("no_test", "missing test.npz"),
    ("nan", "NaN"),
    ("labels", "labels outside"),
    ("shape", r"expected \(N, 1, 8, 8\)"),
])
def test_malformed_site_folder_is_a_clear_error(tmp_path, breakage, message):
    x, y = load_digits()
    meta = {"name": "f", "role": "train", "num_classes": 10, "input_shape": [1, 8, 8]}
    folder = sites.write_site(tmp_path / "f", meta, x[:20], y[:20], x[20:30], y[20:30])
    if breakage == "missing_dir":
        folder = tmp_path / "nope"
    elif breakage == "no_meta":
        (folder / "site.json").unlink()
    elif breakage == "no_test":
        (folder / "test.npz").unlink()
    elif breakage == "nan":
        bad = x[:20].copy()
        bad[0, 0, 0, 0] = np.nan
        sites.write_site(folder, meta, bad, y[:20], x[20:30], y[20:30])
    elif breakage == "labels":
        sites.write_site(folder, meta, x[:20], y[:20] + 10, x[20:30], y[20:30])
    elif breakage == "shape":
        sites.write_site(folder, meta, x[:20, :, :4, :], y[:20], x[20:30], y[20:30])
    with pytest.raises(sites.SiteDataError, match=message):
        sites.load_site(folder)


@pytest.mark.skipif(not fashion_mnist_available(FMNIST_DEFAULT_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_loader():
    x, y = load_fashion_mnist(FMNIST_DEFAULT_DIR, "t10k")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.bincount(y).tolist() == [1000] * 10


def test_missing_fashion_mnist_is_a_clear_error(tmp_path):
    from kumiki.data.sources import DataUnavailable

    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def _clustered_and_plain(tmp_path, clusters, transform, domains_=()):
    """Site folders of a clusters partition and of the plain iid one with the same seed: the same examples
    land on the same sites, so the cluster shift is the only difference."""
    data = {"domains": list(domains_)}
    plain = make_config(tmp_path, sites=4, unseen=2, alpha=None, data=data)
    clustered = make_config(tmp_path, sites=4, unseen=2, alpha=None, data={
        **data, "partition": {"kind": "clusters", "clusters": clusters, "cluster_transform": transform}})
    return ([sites.load_site(f) for f in prepare.materialize(clustered, tmp_path / "clustered")],
            [sites.load_site(f) for f in prepare.materialize(plain, tmp_path / "plain")])


def test_cluster_label_shift_permutes_each_clusters_labels(tmp_path):
    shifted, plain = _clustered_and_plain(tmp_path, 3, "label_shift", domains_=("identity", "invert"))
    # unseen sites 4 and 5 continue the numbering: clusters 1 and 2
    assert [d.meta["cluster"] for d in shifted] == [0, 1, 2, 0, 1, 2]
    assert all(d.meta["cluster_transform"] == "label_shift" for d in shifted)
    assert "cluster" not in plain[0].meta
    for i, (s, p) in enumerate(zip(shifted, plain)):
        c = i % 3
        assert np.array_equal(s.y_train, (p.y_train + c) % 10) and np.array_equal(s.y_test, (p.y_test + c) % 10)
        assert np.array_equal(s.x_train, p.x_train)  # images untouched; data.domains still applied (invert)
        assert s.meta["derived"] is (c != 0 or s.meta["domain"] != "identity")
    assert shifted[1].meta["domain"] == "invert"


def test_cluster_rotation_turns_each_clusters_images(tmp_path):
    rotated, plain = _clustered_and_plain(tmp_path, 2, "rotation")
    assert [d.meta["cluster"] for d in rotated] == [0, 1, 0, 1, 0, 1]
    for i, (r, p) in enumerate(zip(rotated, plain)):
        assert np.array_equal(r.y_train, p.y_train)
        expected = np.rot90(np.rot90(p.x_train, axes=(2, 3)), axes=(2, 3)) if i % 2 else p.x_train
        assert np.array_equal(r.x_train, expected), i


def test_cluster_rotation_angles():
    assert [partition.cluster_rotation(c, 4) for c in range(4)] == ["identity", "rot90", "rot180", "rot270"]
    assert [partition.cluster_rotation(c, 3) for c in range(3)] == ["identity", "rotate:120.0", "rotate:240.0"]
    assert partition.cluster_rotation(2, 8) == "rot90" and partition.cluster_rotation(1, 8) == "rotate:45.0"
