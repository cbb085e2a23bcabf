"""Scale (issue 13 part 7): a long in-process run does not grow with its rounds (the grid keeps no message unless
asked, the strategy keeps two rounds of stats, the recorder keeps no round rows; counted in objects, never timed),
and the simulation engine can run on an existing Ray cluster."""

from __future__ import annotations

import gc
import os

from flwr.app import Message

from launch.engines.inprocess import InProcessGrid, run_inprocess
from server import recorder as recorder_module
from tests.conftest import make_config


def _live() -> tuple[int, int]:
    """Live Flower messages and live round rows (the recorder's per-round dicts), in one pass over the heap."""
    gc.collect()
    messages = rows = 0
    for o in gc.get_objects():
        t = type(o)
        if t is Message:
            messages += 1
        elif t is dict and o.get("kind") == "round":
            rows += 1
    return messages, rows


def test_messages_round_stats_and_round_rows_do_not_accumulate(tmp_path, monkeypatch):
    seen = []
    record_round = recorder_module.Recorder.round

    def counting(self, rnd, strategy, round_s):
        row = record_round(self, rnd, strategy, round_s)
        messages, rows = _live()
        seen.append({"messages": messages, "round rows": rows, "round stats": len(strategy.rounds)})
        return row

    monkeypatch.setattr(recorder_module.Recorder, "round", counting)
    grids = []
    summary = run_inprocess(make_config(tmp_path, rounds=4, sites=2), quiet=True, grid_hook=grids.append, record=False)
    assert summary["rounds"] == 4 and summary["status"] == "ok"
    assert grids[0].sent == [] and grids[0].replies == []
    assert seen[-1]["messages"] <= seen[1]["messages"], [s["messages"] for s in seen]
    assert all(s["round rows"] <= 1 for s in seen), [s["round rows"] for s in seen]
    assert all(s["round stats"] <= 2 for s in seen), [s["round stats"] for s in seen]


def test_the_grid_records_only_when_asked():
    assert InProcessGrid(lambda m, c: m, [{}]).record is False
    assert InProcessGrid(lambda m, c: m, [{}], record=True).record is True


def test_the_simulation_engine_joins_an_existing_ray_cluster_when_named(monkeypatch):
    from launch.engines.simulation import RAY_ADDRESS_ENV, ray_init_args

    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    local = ray_init_args()
    assert local["num_cpus"] >= 1 and "address" not in local
    monkeypatch.setenv(RAY_ADDRESS_ENV, "auto")
    cluster = ray_init_args()
    # Ray refuses num_cpus (and a node address) when it joins a cluster: the cluster's nodes bring their CPUs
    assert cluster["address"] == "auto" and "num_cpus" not in cluster and "_node_ip_address" not in cluster


def test_the_site_data_cache_is_bounded_and_follows_a_rewritten_folder(tmp_path, monkeypatch):
    from client import site
    from kumiki.data.prepare import materialize

    folders = materialize(make_config(tmp_path, sites=3), tmp_path / "sites")
    monkeypatch.setattr(site, "_CACHE", type(site._CACHE)())
    one = site._nbytes(site.load_cached(folders[0]))
    monkeypatch.setattr(site, "CACHE_BYTES", int(1.5 * one))  # room for one site's data
    for f in folders:
        site.load_cached(f)
    assert list(site._CACHE) == [str(folders[-1].resolve())], "the least recently used sites were dropped"
    before = site.load_cached(folders[-1])
    os.utime(folders[-1] / "train.npz", (1, 1))  # the folder's data changed: read again, no second entry
    assert site.load_cached(folders[-1]) is not before and len(site._CACHE) == 1
