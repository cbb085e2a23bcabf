"""One array per message (issue 26 item 1): the codec both directions use, and its refusals of hostile indexes.

A packed message's index is untrusted on both sides: every malformed one here must be a ``PackError`` (the server
logs it as a rejected reply, a site answers with an error), never another exception."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from kumiki import packing
from strategies.replies import BadReply, check_packed

ARRAYS = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "a.bias": np.ones(3, np.float16),
          "bn.count": np.array(7, dtype=np.int64), "empty": np.zeros((0, 5), np.float32)}
EXPECT = {k: (v.dtype, v.shape) for k, v in ARRAYS.items()}


def _roundtrip(arrays=ARRAYS):
    array, index = packing.pack(arrays)
    return array, index, packing.unpack(array, index, expect={k: (v.dtype, v.shape) for k, v in arrays.items()})


def test_pack_then_unpack_gives_back_every_tensor_bit_for_bit_in_one_array():
    array, index, out = _roundtrip()
    assert array.dtype == "uint8" and len(array.shape) == 1
    for k, v in ARRAYS.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and out[k].tobytes() == v.tobytes()
        assert not out[k].flags.writeable, "views of the message's bytes, read-only"
    offsets = [e[3] for e in json.loads(index)["tensors"]]
    assert all(o % packing.ALIGN == 0 for o in offsets)


def test_a_message_carries_the_index_in_its_config_record():
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    packing.put(content, ARRAYS)
    assert list(content["arrays"].keys()) == [packing.PACKED] and packing.INDEX in content["config"]
    assert content["config"]["server-round"] == 1
    reply = RecordDict()  # a reply has no config record: one is made for the index
    packing.put(reply, ARRAYS)
    out = packing.take(reply, expect=EXPECT)
    assert set(out) == set(ARRAYS)


def _edit(index: str, change) -> str:
    obj = json.loads(index)
    change(obj)
    return json.dumps(obj)


def _set(i, j, value):
    def change(obj):
        obj["tensors"][i][j] = value
    return change


HOSTILE = {
    "overlapping offsets": _set(1, 3, 0),
    "a gap that hides bytes": _set(1, 3, 128 + 64),
    "an offset past the end": _set(3, 3, 10**9),
    "a wrong total": lambda o: o.update(total=o["total"] + 64),
    "a smaller total": lambda o: o.update(total=8),
    "a wrong dtype": _set(0, 1, "float64"),
    "an unknown dtype": _set(0, 1, "object"),
    "a complex dtype": _set(0, 1, "complex64"),
    "a wrong shape": _set(0, 2, [4, 3]),
    "a negative dimension": _set(0, 2, [-3, -4]),
    "a float dimension": _set(0, 2, [3.0, 4]),
    "a name not in the contract": _set(0, 0, "head.weight"),
    "a name twice": _set(1, 0, "a.weight"),
    "a missing tensor": lambda o: o["tensors"].pop(),
    "a bool offset": _set(0, 3, False),
    "an entry that is not a list": _set(0, 0, None) if False else (lambda o: o["tensors"].__setitem__(0, {"n": 1})),
    "another version": lambda o: o.update(v=2),
    "an extra key": lambda o: o.update(x=1),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_hostile_index_is_a_pack_error_never_a_crash(attack):
    array, index = packing.pack(ARRAYS)
    bad = _edit(index, HOSTILE[attack])
    with pytest.raises(packing.PackError):
        packing.unpack(array, bad, expect=EXPECT)


@pytest.mark.parametrize("index", ["not json", "[]", "{}", json.dumps({"v": 1, "total": 0, "tensors": {}}), 5, None,
                                   "x" * (packing.MAX_INDEX_CHARS + 1)])
def test_an_index_that_is_not_one_is_refused(index):
    array, _ = packing.pack(ARRAYS)
    with pytest.raises(packing.PackError):
        packing.unpack(array, index, expect=EXPECT)


def test_a_complex_tensor_packs_but_never_unpacks():
    array, index = packing.pack({"w": np.ones(3, np.complex64)})
    with pytest.raises(packing.PackError, match="dtype complex64 is not one of"):
        packing.unpack(array, index)


def test_bytes_that_do_not_match_the_index_are_refused():
    array, index = packing.pack(ARRAYS)
    short, _ = packing.pack({"x": np.zeros(3, np.uint8)})
    with pytest.raises(packing.PackError):
        packing.unpack(short, index, expect=EXPECT)
    with pytest.raises(packing.PackError):
        packing.unpack(type(array)(dtype="uint8", shape=array.shape, stype="pickle", data=array.data), index)


def test_a_record_that_is_not_packed_is_refused_but_an_empty_one_means_no_tensors():
    from flwr.app import ArrayRecord

    from kumiki import contract as C

    assert packing.take(RecordDict({"arrays": ArrayRecord()})) == {}
    with pytest.raises(packing.PackError):
        packing.take(RecordDict({"arrays": C.to_record(ARRAYS)}), expect=EXPECT)  # per-tensor records: not ours
    content = RecordDict()
    packing.put(content, ARRAYS)
    content["arrays"]["other"] = content["arrays"][packing.PACKED]
    with pytest.raises(packing.PackError):
        packing.take(content, expect=EXPECT)


def test_a_site_refuses_names_outside_what_may_travel_to_it():
    content = RecordDict()
    packing.put(content, ARRAYS)
    assert set(packing.take(content, allowed=list(ARRAYS) + ["more"])) == set(ARRAYS)
    with pytest.raises(packing.PackError):
        packing.take(content, allowed=["a.weight"])


def test_the_server_rejects_a_nan_and_a_wrong_dtype_as_a_bad_reply():
    ref = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in ARRAYS.items()}
    wire = {k: v.dtype for k, v in ARRAYS.items()}
    reply = RecordDict()
    packing.put(reply, ARRAYS)
    assert set(check_packed(reply, ref, list(ARRAYS), wire=wire)) == set(ARRAYS)
    nan = dict(ARRAYS, **{"a.weight": np.full((3, 4), np.nan, np.float32)})
    packing.put(reply, nan)
    with pytest.raises(BadReply, match="NaN"):
        check_packed(reply, ref, list(ARRAYS), wire=wire)
    assert check_packed(reply, ref, list(ARRAYS), wire=wire, finite=False)  # the round's one-pass check does it
    packing.put(reply, dict(ARRAYS, **{"a.bias": np.ones(3, np.float32)}))
    with pytest.raises(BadReply, match="dtype"):
        check_packed(reply, ref, list(ARRAYS), wire=wire)


def test_a_site_answers_a_hostile_index_with_an_error_not_a_crash():
    from types import SimpleNamespace

    from client.app import BadArrays, _received

    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    packing.put(content, ARRAYS)
    content["config"][packing.INDEX] = _edit(content["config"][packing.INDEX], HOSTILE["overlapping offsets"])
    msg = SimpleNamespace(content=content)  # _received reads the message's content only
    with pytest.raises(BadArrays, match="offset"):
        _received(msg, tuple(ARRAYS))


def test_a_reply_with_a_hostile_index_is_a_logged_rejection_and_the_run_goes_on(tmp_path):
    import json as _json

    from launch.engines.inprocess import run_inprocess
    from tests.conftest import make_config
    from tests.replies import rewrite_replies

    def overlap(rep):
        rep.content["config"][packing.INDEX] = _edit(rep.content["config"][packing.INDEX], HOSTILE["overlapping offsets"])

    cfg = make_config(tmp_path, rounds=1, sites=3)
    summary = run_inprocess(cfg, quiet=True, grid_hook=rewrite_replies("train", overlap))
    rows = [_json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    [row] = [r for r in rows if r["kind"] == "round"]
    [rej] = row["sites"]["rejected"]
    assert rej["site"] == "site-1" and "offset" in rej["reason"]
    assert row["sites"]["aggregated"] and summary["rounds"] == 1
