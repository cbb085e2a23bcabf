"""WorldLM (issue 10): the attention and tree math by hand, isolation between sub-federations, messages,
phase starts, restart, and the behaviour on the synthetic byte-Markov tree (4 sites in 2 regions).

Every test here runs on the synthetic tree and a tiny LM (d 64, 2 blocks, context 32); real corpora are in
``tests/test_lm_data.py`` and real processes in ``tests/test_worldlm_deploy.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kumiki import contract as C
from kumiki.config import ConfigError, validate
from launch.engines.inprocess import run_inprocess
from server.federation import build_strategy
from strategies.base import SiteProfile, Update
from strategies.worldlm import key_names
from strategies.worldlm_tree import (AttentionOptions, Node, OuterOptimizer, attend, attention_weights,
                                     residual_embeddings, sketch)
from tests.conftest import make_lm_config
from tests.replies import names_of

lm_config = make_lm_config


# ------------------------------------------------------------------------------------- attention by hand
def test_attention_weights_are_a_softmax_over_every_candidate():
    q = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 2.0])}
    k = {**q, "u": np.array([1.0, 1.0])}
    w = attention_weights(q, k, temperature=0.5)
    for g in q:
        assert all(v >= 0 for v in w[g].values())
        assert sum(w[g].values()) == pytest.approx(1.0)
    # row a: cos = (1, 0, 1/sqrt 2) / 0.5
    s = np.array([1.0, 0.0, 1 / math.sqrt(2)]) / 0.5
    assert [w["a"][h] for h in ("a", "b", "u")] == pytest.approx(list(np.exp(s) / np.exp(s).sum()))


def test_key_layer_aggregate_equals_a_hand_computation():
    """Two groups sent different K (weights 1 and 3), one residual; one layer of two tensors."""
    sent = {"a": {"l.w": np.array([0.0, 0.0]), "l.b": np.array([0.0])},
            "b": {"l.w": np.array([2.0, 2.0]), "l.b": np.array([2.0])}}
    new_k = {"a": {"l.w": np.array([2.5, 1.5]), "l.b": np.array([1.5])},
             "b": {"l.w": np.array([1.5, 2.5]), "l.b": np.array([1.5])}}
    res = {"u": {"l.w": np.array([1.0, 1.0]), "l.b": np.array([0.0])}}
    out, alphas = attend(new_k, {"a": 1.0, "b": 3.0}, sent, res, ["l.w", "l.b"], AttentionOptions(temperature=1.0))
    ref = np.array([1.5, 1.5, 1.5])  # the n-weighted mean of what was sent: (0 * 1 + 2 * 3) / 4
    e = {"a": np.array([1.0, 0.0, 0.0]), "b": np.array([0.0, 1.0, 0.0]), "u": np.array([1.0, 1.0, 0.0])}
    val = {"a": np.array([2.5, 1.5, 1.5]), "b": np.array([1.5, 2.5, 1.5]), "u": ref + e["u"]}

    def cos(x, y):
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    for g in ("a", "b"):
        s = np.array([cos(e[g], e[h]) for h in ("a", "b", "u")])
        w = np.exp(s) / np.exp(s).sum()
        assert [alphas["l"][g][h] for h in ("a", "b", "residual:u")] == pytest.approx(list(w))
        want = sum(wi * val[h] for wi, h in zip(w, ("a", "b", "u")))
        assert np.allclose(np.concatenate([out[g]["l.w"], out[g]["l.b"]]), want)


def test_temperature_limits_give_fedper_and_the_uniform_mean():
    rng = np.random.default_rng(0)
    sent = {g: {"l.w": rng.normal(size=40)} for g in "abc"}
    new = {g: {"l.w": sent[g]["l.w"] + rng.normal(size=40)} for g in "abc"}
    n = {"a": 1.0, "b": 5.0, "c": 20.0}
    own, _ = attend(new, n, sent, {}, ["l.w"], AttentionOptions(temperature=1e-6))
    for g in "abc":
        assert np.allclose(own[g]["l.w"], new[g]["l.w"])
    flat, _ = attend(new, n, sent, {}, ["l.w"], AttentionOptions(temperature=1e9))
    uniform = np.mean([new[g]["l.w"] for g in "abc"], axis=0)  # uniform, not n-weighted
    for g in "abc":
        assert np.allclose(flat[g]["l.w"], uniform, atol=1e-6)


def test_similarity_is_on_deltas_and_the_sketch_is_shared_and_shrinks_large_layers():
    v = np.random.default_rng(1).normal(size=5000)
    a, b = sketch(v, 512, "blocks.1.mlp.fc", seed=0), sketch(v, 512, "blocks.1.mlp.fc", seed=0)
    assert a.shape == (512,) and np.array_equal(a, b)
    assert not np.array_equal(a, sketch(v, 512, "blocks.1.mlp.proj", seed=0))
    assert np.array_equal(sketch(v[:100], 512, "x", 0), v[:100])
    # raw parameters with a shared ancestor look alike (cosine ~ 1); their changes do not
    base = np.random.default_rng(2).normal(size=(1, 200)) * 10
    sent = {g: {"l.w": base[0].copy()} for g in "ab"}
    new = {"a": {"l.w": base[0] + np.eye(200)[0]}, "b": {"l.w": base[0] + np.eye(200)[1]}}
    _, on_delta = attend(new, {"a": 1, "b": 1}, sent, {}, ["l.w"], AttentionOptions(temperature=0.1))
    _, on_params = attend(new, {"a": 1, "b": 1}, sent, {}, ["l.w"], AttentionOptions(temperature=0.1, attn_on="params"))
    assert on_delta["l"]["a"]["a"] > 0.99 and on_params["l"]["a"]["a"] == pytest.approx(0.5, abs=0.01)


def test_residuals_are_deviations_from_the_siblings_mean_and_respect_refusal():
    s = {"x": {"k": np.array([1.0, 0.0])}, "y": {"k": np.array([3.0, 2.0])}, "z": {"k": np.array([2.0, 4.0])}}
    r = residual_embeddings(s, {"x": True, "y": False, "z": True})
    assert set(r["x"]) == {"z"} and set(r["y"]) == {"x", "z"} and set(r["z"]) == {"x"}
    assert np.allclose(r["x"]["z"]["k"], [0.0, 2.0]) and np.allclose(r["z"]["x"]["k"], [-1.0, -2.0])


def test_outer_fedadam_follows_reddi_and_fedavg_is_a_plain_step():
    p = {"w": np.array([1.0, -1.0], dtype=np.float32)}
    d = {"w": np.array([0.5, -0.2])}
    assert np.allclose(OuterOptimizer("fedavg", 1.0).step(p, d)["w"], [1.5, -1.2])
    opt = OuterOptimizer("fedadam", 0.01, (0.9, 0.99), 1e-3)
    x = opt.step(p, d)
    m, v = 0.1 * d["w"], 0.01 * d["w"] ** 2
    assert np.allclose(x["w"], p["w"] + 0.01 * m / (np.sqrt(v) + 1e-3), atol=1e-6)
    x2 = opt.step(x, d)
    m, v = 0.9 * m + 0.1 * d["w"], 0.99 * v + 0.01 * d["w"] ** 2
    assert np.allclose(x2["w"], x["w"] + 0.01 * m / (np.sqrt(v) + 1e-3), atol=1e-6)


def test_groups_absent_from_a_round_keep_their_key_layers():
    node = Node("r", {"b": np.zeros(2)}, {"s1": {"k": np.zeros(3)}, "s2": {"k": np.full(3, 5.0)}}, ("k",),
                OuterOptimizer())
    node.step({"b": np.ones(2)}, {"s1": ({"k": np.ones(3)}, 1.0)}, {}, AttentionOptions())
    assert np.array_equal(node.keys["s2"]["k"], np.full(3, 5.0)) and np.allclose(node.keys["s1"]["k"], 1.0)
    assert np.allclose(node.backbone["b"], 1.0)


def test_node_state_round_trips():
    node = Node("r", {"b": np.ones(3, np.float32)}, {"s1": {"k": np.zeros(2, np.float32)},
                                                      "s2": {"k": np.ones(2, np.float32)}}, ("k",),
                OuterOptimizer("fedadam", 0.01))
    node.step({"b": np.full(3, 2.0)}, {"s1": ({"k": np.array([1.0, 1.0], np.float32)}, 2.0)}, {},
              AttentionOptions())
    arrays, meta = node.state()
    other = Node("r", {"b": np.zeros(3, np.float32)}, {"s1": {}, "s2": {}}, ("k",), OuterOptimizer("fedadam", 0.01))
    other.load(arrays, meta)
    a2, m2 = other.state()
    assert m2 == meta and a2.keys() == arrays.keys() and all(np.array_equal(a2[k], arrays[k]) for k in arrays)


# ------------------------------------------------------------------------------------- the strategy
def _fake(strategy, sites_groups: dict[str, str]):
    strategy.profiles = {i + 1: SiteProfile(i + 1, s, "train", g, 50, 10, "language")
                         for i, (s, g) in enumerate(sites_groups.items())}


def _updates(strategy, rnd, shift: dict[str, float]):
    """Every site's reply: what it was sent plus ``shift[site]`` (a fixed pattern per site)."""
    out = []
    for nid, p in sorted(strategy.profiles.items()):
        rng = np.random.default_rng(abs(hash(p.site)) % 2**32)
        sent = strategy.payload(nid)
        arrays = {k: (v + shift.get(p.site, 0.1) * rng.normal(size=v.shape)).astype(v.dtype) for k, v in sent.items()}
        out.append(Update(p, arrays, 50, {"train-tokens": 4 * 16 * 32.0}))
    return out


SITES = {"site-0": "region-0", "site-1": "region-0", "site-2": "region-1", "site-3": "region-1"}


def _two_phases(tmp_path, shift, **knobs):
    cfg = lm_config(tmp_path, rounds=2, knobs=knobs, federation={"root_rounds": 1})
    s = build_strategy(cfg)
    _fake(s, SITES)
    for rnd in (1, 2):
        s._round = rnd
        s._ensure_phase(rnd)
        s.aggregate(_updates(s, rnd, shift))
    return s


def test_a_sub_federations_sites_never_move_another_sub_federations_backbone_or_keys(tmp_path):
    """Phase 1 (after a common root round, 2 rounds): region-0's site-0 sends something else; region-1 is
    untouched except through region-0's residual embedding (refreshed after each round), and not at all when
    region-0 refuses to share."""
    runs = {}
    for label, shift, share in (("base", {}, True), ("moved", {"site-0": 3.0}, True),
                                ("refused-base", {}, False), ("refused", {"site-0": 3.0}, False)):
        fed = {"root_rounds": 1, "groups": [{"name": "region-0", "sites": ["site-0", "site-1"],
                                             "share_residuals": share},
                                            {"name": "region-1", "sites": ["site-2", "site-3"]}]}
        s = build_strategy(lm_config(tmp_path, rounds=3, federation=fed))
        _fake(s, SITES)
        for rnd, sh in ((1, {}), (2, shift), (3, shift)):
            s._round = rnd
            s._ensure_phase(rnd)
            s.aggregate(_updates(s, rnd, sh))
        runs[label] = s
    r0 = {k: runs[k].regions["region-0"] for k in runs}
    r1 = {k: runs[k].regions["region-1"] for k in runs}
    assert any(not np.array_equal(r0["base"].backbone[k], r0["moved"].backbone[k]) for k in r0["base"].backbone)
    for k in r1["base"].backbone:  # region-1's backbone is bit-identical whatever region-0's sites send
        assert np.array_equal(r1["base"].backbone[k], r1["moved"].backbone[k])
    # its key layers move only through region-0's residual embedding ...
    assert any(not np.array_equal(r1["base"].keys["site-2"][k], r1["moved"].keys["site-2"][k])
               for k in r1["base"].keys["site-2"])
    # ... and not at all when region-0 refuses to share it
    assert runs["refused"].residuals["region-1"] == {} and set(runs["refused"].residuals["region-0"]) == {"region-1"}
    for k in r1["refused-base"].keys["site-2"]:
        assert np.array_equal(r1["refused-base"].keys["site-2"][k], r1["refused"].keys["site-2"][k])


def test_a_site_receives_its_nodes_backbone_and_only_its_own_key_layers(tmp_path):
    s = _two_phases(tmp_path, {})
    names = set(s.template)
    keys = set(s.regions["region-0"].key_names)
    assert keys == {k for k in names if k.startswith(("blocks.1.", "norm.", "head."))}
    for nid, p in s.profiles.items():
        node = s.regions[SITES[p.site]]
        sent = s.payload(nid)
        assert set(sent) == names
        for k in keys:
            assert np.array_equal(sent[k], node.keys[p.site][k])
            others = [q for q in s.profiles.values() if q.site != p.site]
            assert all(not np.array_equal(sent[k], s.regions[SITES[q.site]].keys[q.site][k]) for q in others
                       if k.endswith("weight"))
        for k in names - keys:
            assert np.array_equal(sent[k], node.backbone[k])


def test_phase_start_copies_the_roots_backbone_and_each_groups_key_layers(tmp_path):
    cfg = lm_config(tmp_path, rounds=3, federation={"root_rounds": 1})
    s = build_strategy(cfg)
    _fake(s, SITES)
    s._round = 1
    s.aggregate(_updates(s, 1, {}))
    s._ensure_phase(2)
    for g in ("region-0", "region-1"):
        want = s.root.model_for(g)
        node = s.regions[g]
        assert all(np.array_equal(node.backbone[k], want[k]) for k in node.backbone)
        for site in ("site-0", "site-1") if g == "region-0" else ("site-2", "site-3"):
            assert all(np.array_equal(node.keys[site][k], want[k]) for k in node.key_names)
    assert not all(np.array_equal(s.root.keys["region-0"][k], s.root.keys["region-1"][k]) for k in s.root.key_names)


def test_central_dp_in_one_sub_federation_clips_and_noises_only_its_sites(tmp_path):
    fed = {"root_rounds": 1, "groups": [{"name": "region-0", "sites": ["site-0", "site-1"], "dp": "central",
                                         "dp_clip": 0.5, "dp_noise_multiplier": 1.0},
                                        {"name": "region-1", "sites": ["site-2", "site-3"]}]}
    s = build_strategy(lm_config(tmp_path, rounds=2, federation=fed))
    _fake(s, SITES)
    s._round = 1
    ups = _updates(s, 1, {})
    ref = {k: v.copy() for k, v in s.root.backbone.items()}
    b0, _, _ = s._reduce_group("region-0", ups[:2], ref, s.root.keys["region-0"], salt=0)
    b1, _, n1 = s._reduce_group("region-1", ups[2:], ref, s.root.keys["region-1"], salt=1)
    plain = {k: np.mean([u.arrays[k] for u in ups[2:]], axis=0) for k in ref}
    assert all(np.allclose(b1[k], plain[k], atol=1e-6) for k in ref) and n1 == 2 * 4 * 16 * 32
    # region-0: mean change of norm <= clip, plus noise of std z * clip / 2 per coordinate
    delta = np.concatenate([(b0[k].astype(np.float64) - ref[k]).ravel() for k in ref])
    assert delta.std() == pytest.approx(1.0 * 0.5 / 2, rel=0.05)
    assert s.group_releases == {"region-0": 2, "region-1": 0}, "backbone and key layers: two releases (dp_cover_k)"
    assert s.group_epsilon("region-0") > 0 and s.privacy_record()["region-0"]["mode"] == "central"


def test_central_dp_counts_one_release_a_round_without_key_layers(tmp_path):
    """FedAvg as flat WorldLM (one group, no key layers): one Gaussian release a round, not two, in both phases;
    the budget stops the group where one release a round takes it (z = 2: epsilon 4.01 after 3 releases, 4.73
    after 4)."""
    fed = {"root_rounds": 2, "groups": [{"name": "all", "sites": list(SITES), "dp": "central", "dp_clip": 0.5,
                                         "dp_noise_multiplier": 2.0, "dp_target_epsilon": 4.5}]}
    s = build_strategy(lm_config(tmp_path, rounds=4, knobs={"key_layers": []}, federation=fed))
    _fake(s, dict.fromkeys(SITES, "all"))
    assert s.root_keys == () and s.releases_per_round("all", 0) == s.releases_per_round("all", 1) == 1
    for rnd in (1, 2, 3, 4):
        s._round = rnd
        s._ensure_phase(rnd)
        s._spend_budgets(rnd)
        if not s.active("all", rnd):
            break
        s.aggregate(_updates(s, rnd, {}))
    assert s.group_releases == {"all": 3} and s.group_budget_spent == {"all": 4}
    rec = s.privacy_record()["all"]
    assert rec["epsilon"] == pytest.approx(4.011, abs=0.01) and "one release a round" in rec["covers"]


def test_flat_root_with_no_key_layers_is_fedavg(tmp_path):
    fedavg = lm_config(tmp_path, method="fedavg", rounds=2, name="avg")
    flat = lm_config(tmp_path, rounds=2, name="flat", knobs={"key_layers": [], "local_steps": None},
                     federation={"root_rounds": 2}, train=dict(fedavg.train.model_dump(include={
                         "optimizer", "lr", "betas", "grad_clip", "batch_size"})))
    got = {}
    for cfg in (fedavg, flat):
        run_inprocess(cfg, quiet=True)
        with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
            got[cfg.run.name] = {k: z[k] for k in z.files if "/" not in k and k != "__round__"}
    assert got["avg"].keys() == got["flat"].keys()
    for k in got["avg"]:
        assert np.allclose(got["avg"][k], got["flat"][k], atol=1e-5, rtol=0), k  # Adam amplifies float32 ulps


# ------------------------------------------------------------------------------------- end to end
def test_messages_carry_the_split_and_the_server_state_survives_a_restart(tmp_path):
    cfg = lm_config(tmp_path, rounds=2, unseen=1, federation={"root_rounds": 1}, eval={"unseen_adapt_epochs": 1})
    grids = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    assert summary["status"] == "ok" and summary["metric"] == "perplexity"
    assert summary["unseen"]["mean"] > 1 and summary["unseen_adapted"]["mean"] > 1
    grid = grids[0]
    assert all(not r.has_error() for r in grid.replies)
    names = set(build_strategy(cfg).template)
    for msg, reply in zip(grid.sent, grid.replies):
        kind = msg.metadata.message_type
        if kind == "train":
            assert names_of(msg.content) == names and C.EXTRA not in msg.content
            assert names_of(reply.content) == names  # no optimizer or accountant state goes up
            assert reply.content[C.METRICS]["train-tokens"] == 51 * 32  # 4 steps: the 51 training sequences
        elif kind == "evaluate":
            role = "unseen" if grid.contexts[msg.metadata.dst_node_id].node_config["site"] == "site-4" else "train"
            extra = set(msg.content[C.EXTRA].keys()) if C.EXTRA in msg.content else set()
            assert extra == (set() if role == "unseen" else {f"kbar/{k}" for k in key_names(names, cfg.method.keys())})
    rows = [r for r in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines() if '"kind": "round"' in r]
    assert '"phase": "root"' in rows[0] and '"phase": "sub-federations"' in rows[1]
    # a server restarted from its checkpoint holds the same tree state, to the bit
    from server.resume import read_resume_state

    rnd, arrays, meta = read_resume_state(cfg.run_dir())
    again = build_strategy(cfg)
    again.load_state_dict(arrays, meta)
    a2, m2 = again.state_dict()
    assert rnd == 2 and m2["worldlm"] == meta["worldlm"] and a2.keys() == arrays.keys()
    assert all(np.array_equal(a2[k], arrays[k]) for k in arrays)
    assert set(again.regions) == {"region-0", "region-1"} and again.residuals.keys() == {"region-0", "region-1"}


def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path):
    fed = {"root_rounds": 1}
    part = lm_config(tmp_path, rounds=2, name="part", federation=fed, knobs={"outer_optimizer": "fedadam"})
    part_whole = lm_config(tmp_path, rounds=3, name="part-whole", federation=fed,
                           knobs={"outer_optimizer": "fedadam"})
    run_inprocess(part, quiet=True)
    run_inprocess(lm_config(tmp_path, rounds=3, name="part", federation=fed, knobs={"outer_optimizer": "fedadam"}),
                  quiet=True, resume=True)
    run_inprocess(part_whole, quiet=True)
    got = {}
    for name in ("part", "part-whole"):
        with np.load(tmp_path / "runs" / name / "checkpoints" / "global.npz") as z:
            got[name] = {k: z[k] for k in z.files}
    assert any(k.startswith("region/region-1/O/") for k in got["part"])  # every node, FedAdam state included
    assert got["part"].keys() == got["part-whole"].keys()
    for k in got["part"]:
        assert np.array_equal(got["part"][k], got["part-whole"][k]), k


def test_worldlm_beats_fedavg_on_the_four_site_markov_tree(tmp_path):
    """Seeded: 2 regions x 2 sites, 8 rounds, tau 4 steps = FedAvg's one epoch. WorldLM wins on its schedule
    (4 root rounds, then 4 per region) and with the root phase alone (attention-personalized K per region)."""
    ppl = {}
    for name, method, fed in (("fedavg", "fedavg", None), ("worldlm", "worldlm", None),
                              ("root-only", "worldlm", {"root_rounds": 8})):
        cfg = lm_config(tmp_path, method=method, name=name, rounds=8, samples=80, federation=fed)
        ppl[name] = run_inprocess(cfg, quiet=True)["personalized"]["mean"]
    assert ppl["worldlm"] < 0.9 * ppl["fedavg"] and ppl["root-only"] < 0.9 * ppl["fedavg"], ppl


# ------------------------------------------------------------------------------------- config
def test_worldlm_on_image_data_is_refused_with_the_fix(tmp_path):
    raw = {"run": {"name": "x", "rounds": 2}, "method": {"name": "worldlm"}, "data": {"dataset": "digits", "sites": 3}}
    with pytest.raises(ConfigError, match="trains language only.*data.dataset = 'markov'"):
        validate(raw)
    with pytest.raises(ConfigError, match="trains language only"):
        validate({**raw, "data": {"dataset": "fashion-mnist", "sites": 4}})


@pytest.mark.parametrize("federation, match", [
    ({"groups": [{"name": "a", "sites": ["site-0", "site-1"]}, {"name": "b", "sites": ["site-2"]}]},
     r"missing \['site-3'\]"),
    ({"groups": [{"name": "a", "sites": ["site-0", "site-1", "site-2"]}, {"name": "b", "sites": ["site-3", "x"]}]},
     "unknown sites"),
    ({"groups": [{"name": "a", "sites": ["site-0", "site-1"]}, {"name": "a", "sites": ["site-2", "site-3"]}]},
     "names repeat"),
    ({"root_rounds": 5}, r"federation.root_rounds: .* need 5 rounds, but run.rounds = 4"),
    ({"groups": [{"name": "a", "sites": ["site-0", "site-1"], "rounds": 4},
                 {"name": "b", "sites": ["site-2", "site-3"]}]}, r"groups\[a\].rounds"),
    ({"groups": [{"name": "root", "sites": ["site-0", "site-1", "site-2", "site-3"]}]}, "reserved"),
])
def test_a_tree_that_cannot_run_is_refused_naming_the_key(tmp_path, federation, match):
    with pytest.raises(ConfigError, match=match):
        lm_config(tmp_path, federation=federation)


def test_sub_federation_policy_is_refused_for_flat_methods(tmp_path):
    fed = {"groups": [{"name": "a", "sites": ["site-0", "site-1"], "dp": "central"},
                      {"name": "b", "sites": ["site-2", "site-3"]}]}
    with pytest.raises(ConfigError, match=r"federation.groups\[a\].dp: fedavg is a flat method"):
        lm_config(tmp_path, method="fedavg", federation=fed)
    plain = {"groups": [{"name": "a", "sites": ["site-0", "site-1"]}, {"name": "b", "sites": ["site-2", "site-3"]}]}
    assert lm_config(tmp_path, method="fedavg", federation=plain).federation.groups[0].name == "a"


def test_a_sub_federation_personalizes_its_own_key_layers_in_its_phase(tmp_path):
    fed = {"root_rounds": 1, "groups": [{"name": "north", "sites": ["site-0", "site-1"]},
                                        {"name": "south", "sites": ["site-2", "site-3"], "key_layers": ["head.*"]}]}
    cfg = lm_config(tmp_path, rounds=2, federation=fed)
    grids = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    assert summary["status"] == "ok"
    south = [m for m in grids[0].sent if m.metadata.message_type == "evaluate" and C.EXTRA in m.content
             and grids[0].contexts[m.metadata.dst_node_id].node_config["site"] in ("site-2", "site-3")]
    assert {k for k in south[-1].content[C.EXTRA].keys()} == {"kbar/head.weight"}
    north = [m for m in grids[0].sent if m.metadata.message_type == "evaluate" and C.EXTRA in m.content
             and grids[0].contexts[m.metadata.dst_node_id].node_config["site"] == "site-0"]
    assert len(north[-1].content[C.EXTRA].keys()) > 1
    with pytest.raises(ValueError, match="match no tensor"):
        build_strategy(lm_config(tmp_path, federation={"groups": [{"name": "a", "sites": ["site-0", "site-1"],
                                                                    "key_layers": ["nope.*"]},
                                                                   {"name": "b", "sites": ["site-2", "site-3"]}]}))


def test_a_site_claiming_another_sub_federation_is_refused(tmp_path):
    """Shape (a): a site's node config names its sub-federation; one that contradicts the tree never joins."""
    cfg = lm_config(tmp_path, rounds=1)

    def lie(grid):
        ctx = next(c for c in grid.contexts.values() if c.node_config["site"] == "site-0")
        assert ctx.node_config["group"] == "region-0"  # the engines pass the tree's group
        ctx.node_config["group"] = "region-1"

    summary = run_inprocess(cfg, quiet=True, grid_hook=lie)
    dropped = summary["participation"]["dropped"]
    assert [d["site"] for d in dropped] == ["site-0"] and "region-1" in dropped[0]["reason"]
    assert summary["status"] == "incomplete" and "site-0" not in summary["personalized"]["per_site"]


def test_local_dp_in_one_sub_federation_trains_only_its_sites_with_dp_sgd(tmp_path):
    fed = {"root_rounds": 1, "groups": [{"name": "region-0", "sites": ["site-0", "site-1"], "dp": "local",
                                         "dp_noise_multiplier": 1.0, "dp_target_epsilon": 50.0},
                                        {"name": "region-1", "sites": ["site-2", "site-3"]}]}
    summary = run_inprocess(lm_config(tmp_path, rounds=1, federation=fed), quiet=True)
    assert summary["status"] == "ok"
    priv = summary["privacy"]
    assert set(priv["epsilon_per_site"]) == {"site-0", "site-1"} and all(0 < e <= 50 for e in
                                                                          priv["epsilon_per_site"].values())
    assert priv["groups"]["region-0"]["mode"] == "local" and "region-1" not in priv["groups"]
