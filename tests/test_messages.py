"""For every registered method: only shared (+ own group) tensors ever appear in a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kumiki import contract as C
from launch.engines.inprocess import run_inprocess
from kumiki.registry import METHODS
from kumiki.split import ParamSplit
from models import build_model
from server.federation import model_spec
from server.recorder import read_final
from tests.conftest import language_method, make_config, make_lm_config
from tests.replies import names_of


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_personal_tensor_in_any_message(tmp_path, method):
    make = make_lm_config if language_method(method) else make_config
    # the safeguard on (client/safeguard.py): its own model must never travel either, with any method
    cfg = make(tmp_path, method=method, rounds=2, sites=2, unseen=1, safeguard={"enabled": True})
    grids = []
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    grid = grids[0]
    split = ParamSplit.build(build_model(model_spec(cfg), cfg.method), cfg.method.split_rules())
    model_names = set(split.names)

    def travelling(node: int) -> set[str]:
        """The shared tensors and the node's own group's (its site.json or node config names the group)."""
        nc = grid.contexts[node].node_config
        meta = json.loads((Path(nc["data-dir"]) / "site.json").read_text())
        group = cfg.method.site_group(meta.get("task", "classification"), nc.get("group", meta.get("group", "")))
        return set(split.travelling(group or None))
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 2 * 2, "two sites x two rounds of training"
    replies = [r for r in grid.replies if not r.has_error()]
    assert len(replies) == len(grid.sent), [r.error.reason for r in grid.replies if r.has_error()]
    for msg, node in [(m, m.metadata.dst_node_id) for m in grid.sent] + [(r, r.metadata.src_node_id) for r in replies]:
        content = msg.content
        names = names_of(content)
        allowed = travelling(node)
        assert names <= allowed, f"{method}: {sorted(names - allowed)} left a site or the server"
        assert not names & set(split.personal)
        if C.EXTRA in content.array_records:  # method state, never a model tensor
            assert not set(content[C.EXTRA].keys()) & model_names
    assert read_final(cfg.run_dir())["rejections"] == 0
    if split.personal:
        assert summary["personalized"]["mean"] is not None
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    chosen = [r for r in rows if r["kind"] == "site" and r["role"] == "train" and r["task"] == "classification"]
    if cfg.method.federated and chosen:  # every image method's sites choose, never the worse model on validation
        for r in chosen:
            assert r.get("serves") in ("joined", "own"), r
            pick, other = (r["val_own"], r["val_joined"]) if r["serves"] == "own" else (r["val_joined"], r["val_own"])
            assert pick >= other, r
    if not cfg.method.federated:
        assert all(len(m.content[C.ARRAYS]) == 0 for m in grid.sent if m.metadata.message_type in ("train", "evaluate"))
        assert summary["bytes"]["up_total"] == 0
