"""WorldLM's two deployment shapes (issue 10): (a) one SuperLink, sub-federations as groups of sites from
node config; (b) a SuperLink per sub-federation, bridged to the root by a regional aggregator.

2 sub-federations x 2 sites of the synthetic Markov tree, the tiny LM, 2 rounds (1 root, 1 per region).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from client import bridge
from client.app import app as client_app
from launch.engines import node_configs, prepare_sites
from launch.engines.inprocess import InProcessGrid, run_inprocess
from launch.rundir import claim_run_dir
from server.federation import run_federation
from server.region import RegionService
from tests.conftest import make_lm_config

SITES = {"site-0": "region-0", "site-1": "region-0", "site-2": "region-1", "site-3": "region-1"}


def _bridged_inprocess(cfg, monkeypatch):
    """Shape (b) in one process: the root's grid reaches one aggregator per region, and each aggregator's
    region run (``client.bridge.run_region``, a ``flwr run`` in deployment) is served on an in-process grid."""
    with claim_run_dir(cfg):
        sim = prepare_sites(cfg)
        ncs = node_configs(cfg, sim)
        regions = {g: InProcessGrid(client_app, [nc for nc in ncs if nc["group"] == g], record=True)
                   for g in sorted(set(SITES.values()))}
        aggregators = [{"site": g, "region-federation": "region", "region-flwr-home": "unused",
                        "region-config": "unused", "region-dir": str(cfg.run_dir() / "regions" / g / "state")}
                       for g in regions]
        services = {g: RegionService(regions[g], cfg, cfg.run_dir() / "regions" / g / "state") for g in regions}
        monkeypatch.setattr(bridge, "run_region", lambda job_dir, nc: services[nc["site"]].serve_pending())
        root = InProcessGrid(client_app, aggregators, record=True)
        return run_federation(root, cfg, engine="inprocess", quiet=True), root, regions, services


def _region_rows(cfg, g):
    return [json.loads(x) for x in (cfg.run_dir() / "regions" / g / "state" / "metrics.jsonl").read_text().splitlines()]


def test_bridged_sub_federations_compute_what_one_superlink_computes(tmp_path, monkeypatch):
    fed, hot = {"root_rounds": 1}, {"temperature": 1.0}  # T = 1: the residuals weigh enough to show in the models
    a = make_lm_config(tmp_path, name="a", rounds=3, unseen=2, federation=fed, knobs=hot)
    b = make_lm_config(tmp_path, name="b", rounds=3, unseen=2, federation={**fed, "superlinks": "per_group"}, knobs=hot)
    sa = run_inprocess(a, quiet=True)
    sb, root, regions, services = _bridged_inprocess(b, monkeypatch)
    assert sa["status"] == "ok" and sb["status"] == "ok", sb.get("participation")
    assert set(sb["personalized"]["per_site"]) == {"region-0", "region-1"}
    # the root only ever talked to the two aggregators; the sites only to their own region
    assert {m.metadata.dst_node_id for m in root.sent} == {1, 2}
    for g, grid in regions.items():
        sites = {grid.contexts[m.metadata.dst_node_id].node_config["site"] for m in grid.sent}
        assert {SITES.get(s, g) for s in sites} == {g}
    # every site's last personalized perplexity is the same in both shapes
    last = {}
    for g in regions:
        evals = [r for r in _region_rows(b, g) if r["kind"] == "evaluate"]
        assert [r["round"] for r in evals] == [1, 2, 3]
        last.update({s: m["personalized-perplexity"] for s, m in evals[-1]["sites"].items()
                     if "personalized-perplexity" in m})
    assert last.keys() == sa["personalized"]["per_site"].keys()
    for s, v in sa["personalized"]["per_site"].items():
        assert last[s] == pytest.approx(v, rel=1e-4), s
    # every sub-federation's node (B_g, each site's K, its FedAvg step) is the same, to float tolerance
    with np.load(a.run_dir() / "checkpoints" / "global.npz") as z:
        one = {k: z[k] for k in z.files if k.startswith("region/")}
    for g in regions:
        with np.load(b.run_dir() / "regions" / g / "state" / "state-r000003.npz") as z:
            mine = {k[len("server/"):]: z[k] for k in z.files if k.startswith(f"server/region/{g}/")}
        assert mine and mine.keys() == {k for k in one if k.startswith(f"region/{g}/")}
        for k, v in mine.items():
            assert np.allclose(v, one[k], atol=1e-6, rtol=0), k
    for g in regions:  # the region's per-site mean is what the root recorded for it
        mine = [v for s, v in sa["personalized"]["per_site"].items() if SITES[s] == g]
        assert sb["personalized"]["per_site"][g] == pytest.approx(np.mean(mine), rel=1e-4)
    # a root resumed from an earlier checkpoint asks for round 3 again: the region trains it from the state it had
    # before round 3 (kept on its disk), so its answer is the same, to the bit
    jobs = b.run_dir() / "regions" / "region-0" / "state" / "jobs"
    first = next(d for d in sorted(jobs.iterdir()) if json.loads((d / "job.json").read_text())["kind"] == "train"
                 and json.loads((d / "job.json").read_text())["round"] == 3)
    again = jobs / "train-again"
    again.mkdir()
    for f in ("job.json", "job.npz"):
        (again / f).write_bytes((first / f).read_bytes())
    assert services["region-0"].serve_pending() == 1
    with np.load(first / "result.npz") as x, np.load(again / "result.npz") as y:
        assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


# ----------------------------------------------------------------------------- real processes on 127.0.0.1
@pytest.mark.deploy
def test_shape_a_one_superlink_groups_sites_from_node_config(tmp_path):
    from launch.engines import local
    from tests.test_engine_local import _Spy

    cfg = make_lm_config(tmp_path, name="shape-a", rounds=2, federation={"root_rounds": 1})
    spy = _Spy()
    summary = local.run_local(cfg, quiet=True, timeout_s=300, ready_timeout_s=120, on_start=spy)
    assert summary["status"] == "ok" and summary["metric"] == "perplexity" and summary["rounds"] == 2
    assert set(summary["personalized"]["per_site"]) == set(SITES)
    profiles = summary["participation"]["profiles"]
    assert {s: p["group"] for s, p in profiles.items()} == SITES  # from each SuperNode's node config
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [r["method"]["phase"] for r in rows if r["kind"] == "round"] == ["root", "sub-federations"]
    assert spy.survivors() == set()


@pytest.mark.deploy
def test_shape_b_a_superlink_per_sub_federation_bridged_by_aggregators(tmp_path):
    from launch.engines.regions import run_regions
    from tests.test_engine_local import _Spy

    # A region's profile answer waits for its server to start (flwr run, a ServerApp, its own discovery): on a
    # loaded machine that passed the tests' usual 20 s, the root re-asked at round 1, and the region served a
    # second profile job. The default discovery timeout (180 s) is what a deployment has; it costs nothing here
    # when the answer comes sooner.
    cfg = make_lm_config(tmp_path, name="shape-b", rounds=2, federation={"root_rounds": 1, "superlinks": "per_group"},
                         server={"discovery_timeout_s": 180.0})
    spy = _Spy()
    summary = run_regions(cfg, quiet=True, timeout_s=420, ready_timeout_s=120, on_start=spy)
    assert summary["status"] == "ok" and summary["rounds"] == 2, summary.get("participation")
    assert set(summary["personalized"]["per_site"]) == {"region-0", "region-1"}
    logs = {p.stem for p in (cfg.run_dir() / "logs").glob("*.log")}
    assert {"superlink-root", "superlink-region-0", "superlink-region-1", "aggregator-region-0",
            "supernode-site-0", "supernode-site-3"} <= logs
    # signed apps at both levels: the aggregators verified the root's app, the sites each region's (signed by its
    # bridge with the region's key); an unsigned or wrongly signed app would have been refused and the run failed
    for name in ("aggregator-region-0", "supernode-site-0", "supernode-site-3"):
        text = (cfg.run_dir() / "logs" / f"{name}.log").read_text(errors="replace")
        assert "app-verify: on" in text and "refused app" not in text, (name, text[-800:])
    for g in ("region-0", "region-1"):
        rows = _region_rows(cfg, g)
        assert [(r["kind"], r["round"]) for r in rows] == [("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2)]
        sites = {s for r in rows for s in r["sites"]}
        assert sites == {s for s, gg in SITES.items() if gg == g}  # each region's sites, and only those
        jobs = list((cfg.run_dir() / "regions" / g / "state" / "jobs").iterdir())
        assert len(jobs) == 5  # profile, then train + evaluate per round, served by one Flower run on its link
        assert (cfg.run_dir() / "regions" / g / "state" / "flwr-run.log").read_text().count("Successfully started") == 1
    # the root's SuperLink never saw a site: only the two aggregators registered there
    root_log = (cfg.run_dir() / "logs" / "superlink-root.log").read_text(errors="replace")
    assert "site-0" not in root_log
    assert spy.survivors() == set()


def test_each_shape_runs_on_its_engines_only(tmp_path):
    from launch.engines import run

    bridged = make_lm_config(tmp_path, name="b", federation={"superlinks": "per_group"})
    with pytest.raises(ValueError, match="--engine regions"):
        run(bridged, "inprocess")
    with pytest.raises(ValueError, match="per_group"):
        run(make_lm_config(tmp_path, name="a"), "regions")
    assert not (tmp_path / "runs").exists()
    from kumiki.config import ConfigError

    with pytest.raises(ConfigError, match="only worldlm runs bridged"):
        make_lm_config(tmp_path, method="hierfavg", federation={"superlinks": "per_group"})
