"""server.transport_dtype = "float16" (issue 13 part 6): shared floating tensors travel in float16, down and up;
integer buffers never change; sites and server compute in float32; a reply must use exactly the dtype each
tensor was sent in, and a site refuses dtypes its model cannot take."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from client.app import BadArrays, check_incoming, to_wire, widen
from kumiki import contract as C, packing
from kumiki.config import ConfigError, load_config
from launch.engines.inprocess import run_inprocess
from tests.conftest import make_config
from tests.test_flat import _round, _strategy

F16 = {"transport_dtype": "float16", "discovery_timeout_s": 20.0}


def test_float16_round_trips_through_real_sites_and_the_model_stays_float32(tmp_path):
    grids = []
    cfg = make_config(tmp_path, rounds=2, sites=3, server=F16)
    summary = run_inprocess(cfg, quiet=True, grid_hook=grids.append)
    assert summary["status"] == "ok" and summary["participation"]["incomplete_rounds"] == []
    grid = grids[0]
    ups = [r for r in grid.replies if not r.has_error() and C.ARRAYS in r.content.array_records]
    downs = [m for m in grid.sent if C.ARRAYS in m.content.array_records]
    assert len(ups) == 6 and downs
    for content in [m.content for m in downs] + [r.content for r in ups]:
        kinds = {k: v.dtype for k, v in packing.take(content).items()}
        assert all(d == np.float16 for k, d in kinds.items() if "num_batches" not in k), kinds
        assert all(d == np.int64 for k, d in kinds.items() if "num_batches" in k)
    with np.load(cfg.run_dir() / "checkpoints" / "global.npz") as z:
        model = {k: z[k] for k in z.files if k != "__round__"}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for k, v in model.items() if "num_batches" not in k)
    # every message (3 train a round, 3 evaluate after the last) carries one packed array (kumiki/packing.py):
    # half the float32 bytes, each tensor at an aligned offset, one .npy header and the array's name
    half = packing.pack({k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in model.items()})[0]
    assert half.shape[0] < sum(v.nbytes for v in model.values()) // 2 + 64 * len(model)
    assert len(downs) == 9 and summary["bytes"]["down_total"] == len(downs) * (len(half.data) + len(packing.PACKED))
    assert summary["personalized"]["mean"] > 0.3


def test_a_reply_must_use_the_dtype_each_tensor_was_sent_in(tmp_path):
    s = _strategy(tmp_path, **F16)
    as_f32 = {2: lambda k, a: np.full(a.shape, 1.0, np.float32)}  # site-2 answers in float32 anyway
    _round(s, {1: 1.0, 2: as_f32[2], 3: 3.0, 4: 5.0}, dict.fromkeys(range(1, 5), 10))
    [rej] = s.rounds[1].rejected
    assert rej["site"] == "site-2" and "dtype float32 != float16 (as sent)" in rej["reason"]
    w = s.shared["head.weight"]
    assert w.dtype == np.float32 and np.allclose(w, 3.0)  # the float16 replies, widened: (1 + 3 + 5) / 3


def test_a_tensor_beyond_float16_range_travels_in_its_own_dtype(tmp_path, caplog):
    s = _strategy(tmp_path, **F16)
    s.shared["head.bias"] = np.full_like(s.shared["head.bias"], 1e6)
    with caplog.at_level(logging.WARNING, logger="kumiki.server"):
        msgs = s.configure_train(1, None, C.ConfigRecord(), None)
    rec = packing.take(msgs[0].content)
    assert rec["head.bias"].dtype == np.float32 and rec["head.weight"].dtype == np.float16
    assert "head.bias has values beyond float16's range" in caplog.text
    assert len({id(m.content[C.ARRAYS][packing.PACKED]) for m in msgs}) == 1, "packed once for all sites"


def test_sites_widen_float16_refuse_other_dtypes_and_never_send_an_overflowed_update():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    own = model.state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in own.items()}
    check_incoming(half, model, tuple(own))
    assert all(v.dtype == own[k].dtype for k, v in widen(half, model).items())
    with pytest.raises(BadArrays, match="dtype torch.float64"):
        check_incoming({"0.weight": own["0.weight"].double()}, model, tuple(own))
    with pytest.raises(BadArrays, match="dtype torch.int32"):
        check_incoming({"1.num_batches_tracked": own["1.num_batches_tracked"].int()}, model, tuple(own))
    out = to_wire({"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}, {"0.weight": torch.float16})
    assert out["0.weight"].dtype == torch.float16 and out["0.bias"].dtype == torch.float32
    with pytest.raises(FloatingPointError, match="exceeds torch.float16's range"):
        to_wire({"0.weight": torch.full((2, 2), 1e6)}, {"0.weight": torch.float16})


def test_transport_dtype_is_validated():
    with pytest.raises(ConfigError, match="server.transport_dtype"):
        load_config('[run]\nname="x"\nrounds=1\n[method]\nname="fedavg"\n[data]\nsites=2\n'
                    '[server]\ntransport_dtype="bfloat16"\n')
