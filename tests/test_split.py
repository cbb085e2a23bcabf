"""ParamSplit: every tensor claimed exactly once; shared (+ own group) is what travels."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from kumiki import contract as C, packing
from kumiki.contract import Job
from kumiki.split import ParamSplit, SplitError
from models import ModelSpec
from strategies.base import KumikiStrategy, SiteProfile
from tests.conftest import make_config
from tests.replies import arrays_of, names_of


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.dec_a = nn.Linear(2, 2)
        self.dec_b = nn.Linear(2, 1)


def test_every_tensor_classified_and_personal_carves_out_of_shared():
    s = ParamSplit.from_rules(Toy(), shared=["*"], personal=["*.running_mean", "*.running_var", "*.num_batches_tracked"],
                              groups={"a": ["dec_a.*"], "b": ["dec_b.*"]})
    assert set(s.personal) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert set(s.groups["a"]) == {"dec_a.weight", "dec_a.bias"}
    assert set(s.shared) == {"body.weight", "body.bias", "bn.weight", "bn.bias"}
    assert sorted(s.shared + s.personal + s.groups["a"] + s.groups["b"]) == sorted(Toy().state_dict())


def test_unclaimed_tensor_is_a_startup_error():
    with pytest.raises(SplitError, match="unclaimed tensors: .*dec_b.weight"):
        ParamSplit.from_rules(Toy(), shared=["body.*", "bn.*"], groups={"a": ["dec_a.*"]})


def test_doubly_claimed_tensor_is_a_startup_error():
    with pytest.raises(SplitError, match=r"claimed twice: dec_a.weight \(personal and a\)"):
        ParamSplit.from_rules(Toy(), shared=["*"], personal=["dec_a.*"], groups={"a": ["dec_a.*"]})


def test_outgoing_holds_shared_and_own_group_only():
    model = Toy()
    s = ParamSplit.from_rules(model, shared=["body.*", "bn.*"], personal=["bn.running_*", "bn.num_*"],
                              groups={"a": ["dec_a.*"], "b": ["dec_b.*"]})
    out = s.outgoing(model.state_dict(), "a")
    assert set(out) == set(s.shared) | {"dec_a.weight", "dec_a.bias"}
    assert not set(out) & set(s.personal)
    assert set(s.outgoing(model.state_dict(), None)) == set(s.shared)


def _strategy(tmp_path):
    cfg = make_config(tmp_path)
    model = Toy()
    split = ParamSplit.from_rules(model, shared=["body.*", "bn.*"], groups={"a": ["dec_a.*"], "b": ["dec_b.*"]})
    initial = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    job = Job(0, cfg.method, cfg.train, ModelSpec("mlp", (1, 8, 8), 10), cfg.privacy)
    st = KumikiStrategy(cfg, job, split, initial)
    st.profiles = {1: SiteProfile(1, "s1", "train", "a", 10, 5), 2: SiteProfile(2, "s2", "train", "a", 30, 5),
                   3: SiteProfile(3, "s3", "train", "b", 20, 5)}
    return st, split


def test_groups_receive_own_tensors_and_average_within_group(tmp_path):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    st, split = _strategy(tmp_path)
    msgs = list(st.configure_train(1, None, ConfigRecord(), None))
    sent = {m.metadata.dst_node_id: names_of(m.content) for m in msgs}
    assert sent[1] == sent[2] == set(split.shared) | set(split.groups["a"])
    assert sent[3] == set(split.shared) | set(split.groups["b"])
    # Each site replies with constant tensors = its node id, so the means are easy to write by hand.
    replies, n = [], {1: 10, 2: 30, 3: 20}
    for m in msgs:
        nid = m.metadata.dst_node_id
        arrays = {k: np.full_like(v, float(nid)) for k, v in arrays_of(m.content).items()}
        content = RecordDict({C.METRICS: MetricRecord({C.NUM_EXAMPLES: n[nid]})})
        packing.put(content, arrays)
        replies.append(Message(content, reply_to=m))
    st.aggregate_train(1, replies)
    assert np.allclose(st.shared["body.weight"], (1 * 10 + 2 * 30 + 3 * 20) / 60)  # all three sites
    assert np.allclose(st.group_arrays["a"]["dec_a.weight"], (1 * 10 + 2 * 30) / 40)  # group a only
    assert np.allclose(st.group_arrays["b"]["dec_b.weight"], 3.0)  # group b only
