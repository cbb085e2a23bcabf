"""The server's aggregation on one flat buffer per reply (strategies/flat.py, issue 13 part 5).

Replies go through the real path (``aggregate_train``: reply checks, one K x P matrix, one NaN/inf pass, one
reduction) and must give the hand-computed means the per-tensor code gave; group tensors aggregate over their
group only; a reply's bytes are read as they are, whatever header numpy wrote.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from kumiki import contract as C, packing
from kumiki.split import ParamSplit
from models import build_model
from server.federation import build_strategy, model_spec
from strategies.base import KumikiStrategy, SiteProfile
from kumiki.npy import NpyError, expect, npy_bytes, npy_header, read_npy
from strategies.flat import Layout, Stack
from tests.conftest import make_config
from tests.replies import arrays_of


def _strategy(tmp_path, groups=None, **server):
    cfg = make_config(tmp_path, sites=4, server={"discovery_timeout_s": 20.0, **server})
    if groups is None:
        s = build_strategy(cfg)
    else:  # the same model with one group-level part (as an M-Fed task's decoder would be)
        model = build_model(model_spec(cfg), cfg.method)
        split = ParamSplit.from_rules(model, shared=["*"], groups={"g": ["head.*"]})
        initial = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        s = KumikiStrategy(cfg, build_strategy(cfg).job, split, initial)
    for nid in range(1, 5):
        s.profiles[nid] = SiteProfile(nid, f"site-{nid}", "train", (groups or {}).get(nid, ""), 100, 10)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return s


def _round(s, values, sizes, ints=None, order=None, rnd=1):
    """One training round: node n replies every floating tensor it was sent filled with ``values[n]`` (or
    ``values[n](name, sent)``), integer tensors with ``ints[n]``."""
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(rnd, None, ConfigRecord(), None)}
    replies = []
    for nid in order or sorted(values):
        sent = arrays_of(msgs[nid].content)
        fill = values[nid] if callable(values[nid]) else (lambda k, a, v=values[nid]: np.full(a.shape, v, a.dtype))
        arrays = {k: (fill(k, a) if a.dtype.kind == "f" else np.full(a.shape, (ints or {}).get(nid, 0), a.dtype))
                  for k, a in sent.items()}
        content = RecordDict({C.METRICS: MetricRecord({C.NUM_EXAMPLES: sizes[nid], "train-loss": 1.0})})
        packing.put(content, arrays)
        replies.append(Message(content, reply_to=msgs[nid]))
    return s.aggregate_train(rnd, replies)


def test_the_server_path_gives_the_hand_computed_weighted_mean_in_any_reply_order(tmp_path):
    s = _strategy(tmp_path)
    values, sizes = {1: 1.0, 2: 2.0, 3: 4.0, 4: -8.0}, {1: 10, 2: 20, 3: 30, 4: 40}
    _round(s, values, sizes, ints={1: 7, 2: 9, 3: 11, 4: 13}, order=[4, 2, 1, 3])
    # (10 * 1 + 20 * 2 + 30 * 4 + 40 * -8) / 100 = -1.5 on every coordinate of every floating tensor
    floats = [k for k, v in s.shared.items() if v.dtype.kind == "f"]
    assert floats and all(np.array_equal(s.shared[k], np.full_like(s.shared[k], -1.5)) for k in floats)
    assert all(s.shared[k].dtype == np.float32 for k in floats)
    ints = [k for k in s.shared if k not in floats]
    assert ints and all(int(s.shared[k]) == 7 for k in ints), "integer buffers: site-1's (site order), not averaged"
    assert s.rounds[1].accepted == 4 and s.completed == {f"site-{n}": 1 for n in range(1, 5)}


def test_a_reply_with_nan_is_rejected_by_name_and_a_huge_finite_one_is_not(tmp_path):
    s = _strategy(tmp_path)
    _round(s, {1: 1.0, 2: np.nan, 3: 3.0e38, 4: 2.0}, {1: 10, 2: 10, 3: 1, 4: 10})
    [rej] = s.rounds[1].rejected
    assert rej["site"] == "site-2" and "NaN or inf" in rej["reason"] and "tensor encoder." in rej["reason"]
    # site-3's row sums to inf in float32, but every value is finite: it is accepted
    assert s.rounds[1].accepted == 3 and "site-3" in s.rounds[1].train_metrics
    w = s.shared["head.bias"]
    assert np.allclose(w, (10 * 1.0 + 3.0e38 + 10 * 2.0) / 21, rtol=1e-6) and np.isfinite(w).all()


def test_group_tensors_average_over_their_group_and_norm_bound_measures_each_sites_own_change(tmp_path):
    s = _strategy(tmp_path, groups={1: "g", 2: "g"})
    _round(s, {1: 1.0, 2: 3.0, 3: 5.0, 4: 7.0}, {1: 10, 2: 30, 3: 10, 4: 10})
    assert np.allclose(s.group_arrays["g"]["head.weight"], (10 * 1 + 30 * 3) / 40)  # sites 1 and 2 only
    assert np.allclose(s.shared["encoder.net.1.weight"], (10 * 1 + 30 * 3 + 10 * 5 + 10 * 7) / 60)
    assert "head.weight" not in s.shared

    # norm_bound: every site moves its shared tensors by the same step; the group sites send their head back
    # unchanged. Sites 3 and 4 carry no head: their change is their shared step alone (their rows hold the
    # server's head there), so all four changes are equal, none exceeds the median and nobody is clipped.
    s = _strategy(tmp_path, groups={1: "g", 2: "g"}, aggregation="norm_bound", norm_bound=1.0)
    ref = {k: v.copy() for k, v in s.reference_arrays().items()}

    def step(k, a):
        return a + 0.5 if k in s.shared else a

    _round(s, dict.fromkeys(range(1, 5), step), dict.fromkeys(range(1, 5), 10))
    for k in ("encoder.net.1.weight", "encoder.net.4.bias"):
        assert np.allclose(s.shared[k], ref[k] + 0.5, atol=1e-6), k
    assert np.allclose(s.group_arrays["g"]["head.weight"], ref["head.weight"])


def test_the_updates_are_views_of_one_matrix_and_parts_take_no_copy():
    lay = Layout.of({"a": np.zeros((2, 3), np.float32), "n": np.zeros((), np.int64), "b": np.zeros(4, np.float32)})
    ups = [{"a": np.full((2, 3), k, np.float32), "n": np.array(k), "b": np.arange(4, dtype=np.float32) * k}
           for k in range(3)]
    batch = Stack.read(lay, ups, lambda: np.zeros(lay.size, np.float32))
    assert batch.rows.shape == (3, 10) and [int(r["n"]) for r in batch] == [0, 1, 2]
    part = Stack.of([batch[0], batch[1], batch[2]], ["b"])
    assert np.shares_memory(part.rows, batch.rows) and np.array_equal(part[2]["b"], [0, 2, 4, 6])
    assert Layout.of(ups[0]).names == ("a", "b") and lay.ints == ("n",)


def test_reply_bytes_are_read_as_numpy_wrote_them():
    for y in (np.array(2.5, np.float32), np.arange(6, dtype=np.float16), np.arange(6, dtype=">f4").reshape(2, 3),
              np.array([True, False]), np.zeros((0, 3), np.int64)):
        assert npy_bytes(y) == Array(y).data, y.dtype  # the one-copy serializer writes exactly np.save's bytes
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = Array(x).data  # what Flower puts on the wire
    assert data.startswith(npy_header(x.dtype, x.shape)), "the canonical header (the fast path) matches np.save"
    view = read_npy(data, expect(x.dtype, x.shape))
    assert np.array_equal(view, x) and not view.flags.writeable  # a view of the bytes, not a copy
    for other in (np.asfortranarray(x), x.astype(np.float64)):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, other, version=(2, 0))
        got = read_npy(buf.getvalue(), expect(x.dtype, x.shape))
        assert np.array_equal(got, x) and got.dtype == other.dtype  # parsed: the caller compares the dtype
    with pytest.raises(NpyError, match="data bytes"):
        read_npy(data[:-4])
    with pytest.raises(NpyError, match="not a .npy"):
        read_npy(b"\x93NUMPY\x01\x00" + b"\xff" * 40)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(NpyError, match="plain numeric"):
        read_npy(buf.getvalue())


def test_a_mean_is_bit_identical_whichever_path_made_it():
    """The round's mean summed as the replies are read (FedAvg) and the mean of a part taken from the matrix
    (M-Fed's encoder, a rule that kept the rows) add the same products in the same order: bit for bit equal on
    any CPU (a BLAS ``w @ rows`` sums in a kernel-dependent order, with fused multiply-adds, and differed in the
    last bit on one machine and not another)."""
    from strategies.aggregate import weighted_mean

    rng = np.random.default_rng(3)
    lay = Layout.of({"a": np.zeros((300, 70), np.float32), "b": np.zeros(17, np.float32)})
    ups = [{"a": rng.normal(size=(300, 70)).astype(np.float32), "b": rng.normal(size=17).astype(np.float32)}
           for _ in range(7)]
    weights = [float(n) for n in rng.integers(20, 900, size=7)]
    read = weighted_mean(Stack.read(lay, ups, lambda: np.zeros(lay.size, np.float32), weights=weights), weights)
    batch = Stack.read(lay, ups, lambda: np.zeros(lay.size, np.float32))  # the rows kept, no sum taken
    part = weighted_mean(Stack.of(list(batch), ["a"]), weights)
    whole = weighted_mean(Stack.of(ups), weights)
    for k in ("a", "b"):
        assert np.array_equal(read[k], whole[k]), k
    assert np.array_equal(read["a"], part["a"])
