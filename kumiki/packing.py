"""One array per message (issue 26 item 1): a message's tensors as one contiguous byte array plus a small index.

Why: Flower 1.41 moves every ``Array`` of a message as its own object (one push and one pull request per object
per hop, each stored and looked up by id in the SuperLink), so a model of 20 tensors costs 20+ requests a hop
where one would do. Packed, the ``arrays`` record holds one ``Array`` (``packed``: uint8, the tensors' bytes one
after another, each at an offset aligned to ``ALIGN``), and the message's ``config`` record holds the index under
``kumiki.packed-index``: JSON ``{"v": 1, "total": bytes, "tensors": [[name, dtype, shape, offset], ...]}``.

Both directions use this module: the server packs what it sends and unpacks replies; a site unpacks what it
receives and packs its reply the same way. The index is untrusted input on both sides, so ``unpack`` is strict:
a JSON object of the exact form above, at most ``MAX_TENSORS`` entries, unique names, a dtype from ``DTYPES``,
non-negative integer dimensions, and offsets that are exactly the canonical layout (each tensor at the aligned
end of the one before, in index order; ``total`` the end of the last, and the array's size): no overlap, no gap
that could hide bytes, no read past the end. ``expect`` (name -> (dtype, shape)) then demands exactly those names,
dtypes and shapes, as today's per-tensor check does (``strategies.replies.check_arrays``); finiteness is checked
by the callers as before (the server checks a round's replies in one pass). Anything else is a ``PackError``,
which the server logs as a rejected reply and a site as an error reply: never a crash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from kumiki.npy import NpyError, expect as npy_expect, npy_header, read_npy

#: the one Array of a packed ``arrays`` record
PACKED = "packed"
#: the index's key in the message's ``config`` ConfigRecord
INDEX = "kumiki.packed-index"
#: every tensor starts at a multiple of this many bytes (cache-line aligned views)
ALIGN = 64
#: the dtypes a tensor may travel in (numpy names)
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
#: at most this many tensors in one message, and this many bytes of index (sanity bounds, not quotas)
MAX_TENSORS = 100_000
MAX_INDEX_CHARS = 8_000_000
_NUMPY = "numpy.ndarray"


class PackError(ValueError):
    """A packed message that does not hold what its index says (or an index that is not one)."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack(arrays: Mapping[str, Any]) -> tuple[Array, str]:
    """``arrays`` (numpy arrays or torch tensors) as one uint8 ``Array`` and its index (JSON). One copy of the
    data: the parts are joined straight into the Array's bytes (.npy format, as Flower's ``Array`` holds)."""
    entries, parts, offset = [], [], 0
    for name, value in arrays.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        v = np.asarray(value)
        if v.dtype.kind not in "biufc" or v.dtype.hasobject:  # the receiver refuses all but DTYPES (``unpack``)
            raise PackError(f"tensor {name}: dtype {v.dtype} is not numeric")
        v = v if v.flags.c_contiguous else v.copy(order="C")
        start = _aligned(offset)
        if start > offset:
            parts.append(bytes(start - offset))
        entries.append([str(name), v.dtype.name, [int(d) for d in v.shape], start])
        if v.nbytes:
            parts.append(memoryview(v.reshape(-1)).cast("B"))
        offset = start + v.nbytes
    index = json.dumps({"v": 1, "total": offset, "tensors": entries}, separators=(",", ":"))
    data = b"".join([npy_header(np.dtype(np.uint8), (offset,)), *parts])
    return Array(dtype="uint8", shape=(offset,), stype=_NUMPY, data=data), index


def _index(index: Any) -> tuple[int, list[tuple[str, np.dtype, tuple[int, ...], int]]]:
    """The index, parsed and checked against the canonical layout; (total bytes, entries)."""
    if not isinstance(index, str) or len(index) > MAX_INDEX_CHARS:
        raise PackError("the packed index is not a string of bounded length")
    try:
        obj = json.loads(index)
    except ValueError as exc:
        raise PackError(f"the packed index is not JSON: {exc}") from None
    if not isinstance(obj, dict) or set(obj) != {"v", "total", "tensors"} or obj["v"] != 1:
        raise PackError("the packed index is not {v: 1, total, tensors}")
    total, tensors = obj["total"], obj["tensors"]
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise PackError(f"the packed index lists no tensors or more than {MAX_TENSORS}")
    out, seen, end = [], set(), 0
    for e in tensors:
        if not (isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and isinstance(e[1], str)
                and isinstance(e[2], list) and _int(e[3])):
            raise PackError(f"packed index entry {str(e)[:80]!r} is not [name, dtype, shape, offset]")
        name, dtype, shape, offset = e
        if name in seen:
            raise PackError(f"tensor {name}: listed twice in the packed index")
        seen.add(name)
        if dtype not in DTYPES:
            raise PackError(f"tensor {name}: dtype {dtype} is not one of {DTYPES}")
        if not all(_int(d) and 0 <= d <= 2**40 for d in shape):
            raise PackError(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        if offset != _aligned(end):
            raise PackError(f"tensor {name}: offset {offset} is not where the tensor before it ends "
                            f"({_aligned(end)}): overlapping or hidden bytes")
        end = offset + nbytes
        out.append((name, dt, tuple(shape), offset))
    if not _int(total) or total != end:
        raise PackError(f"the packed index says {total!r} bytes, its tensors end at {end}")
    return end, out


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def unpack(array: Any, index: Any, expect: Mapping[str, tuple[Any, tuple[int, ...]]] | None = None,
           allowed: Any = None) -> dict[str, np.ndarray]:
    """The tensors of a packed message as read-only numpy views of its bytes (no copy), or ``PackError``.

    ``expect``: name -> (dtype, shape) that must match exactly (the same names, no more, no fewer). ``allowed``:
    the names a message may carry at all (a subset of them may arrive), for a site, which checks dtypes and
    shapes against its model afterwards."""
    total, entries = _index(index)
    if getattr(array, "stype", None) != _NUMPY:
        raise PackError(f"the packed array's serialization {getattr(array, 'stype', None)!r} is not {_NUMPY!r}")
    try:
        blob = read_npy(array.data, npy_expect(np.dtype(np.uint8), (total,)))
    except NpyError as exc:
        raise PackError(f"the packed array does not hold the index's {total} bytes: {exc}") from None
    if blob.dtype != np.uint8 or blob.shape != (total,):
        raise PackError(f"the packed array is {blob.dtype}{list(blob.shape)}, the index says uint8[{total}]")
    names = {n for n, _, _, _ in entries}
    if expect is not None and names != set(expect):
        raise PackError(f"packed tensors differ from the ones expected: {sorted(names ^ set(expect))[:5]}")
    if allowed is not None and not names <= set(allowed):
        raise PackError(f"packed tensors this site keeps private or does not know: {sorted(names - set(allowed))[:5]}")
    out = {}
    for name, dt, shape, offset in entries:
        if expect is not None:
            want_dt, want_shape = np.dtype(expect[name][0]), tuple(expect[name][1])
            if dt != want_dt:
                raise PackError(f"tensor {name}: dtype {dt} != {want_dt} (as sent)")
            if shape != want_shape:
                raise PackError(f"tensor {name}: shape {shape} != {want_shape}")
        count = math.prod(shape)
        v = np.frombuffer(blob, dtype=dt, count=count, offset=offset) if count else np.empty(0, dt)
        v.flags.writeable = False
        out[name] = v.reshape(shape)
    return out


def put(content: Any, arrays: Mapping[str, Any], records: str = "arrays", config: str = "config") -> tuple[Array, str]:
    """Write ``arrays`` packed into a RecordDict: ``content[records]`` = the one Array, and the index into
    ``content[config]`` (created when the message has no config record, as a reply has not)."""
    array, index = pack(arrays)
    return array, attach(content, array, index, records, config)


def attach(content: Any, array: Array, index: str, records: str = "arrays", config: str = "config") -> str:
    """Put an already packed Array and its index into ``content`` (the server packs once for many sites)."""
    if index == EMPTY:  # no tensors (a local-only method): an empty record, as before, and no index
        content[records] = ArrayRecord()
        return index
    rec = ArrayRecord()
    rec[PACKED] = array  # set, not passed to the constructor (which copies): many messages share one Array
    content[records] = rec
    if config not in content.config_records:
        content[config] = ConfigRecord()
    content[config][INDEX] = index
    return index


#: the index of a message without tensors (``attach`` sends an empty record instead)
EMPTY = pack({})[1]


def take(content: Any, expect: Mapping[str, tuple[Any, tuple[int, ...]]] | None = None, allowed: Any = None,
         records: str = "arrays", config: str = "config") -> dict[str, np.ndarray]:
    """The tensors of a message or reply ``put`` wrote, checked (``unpack``). An empty ``arrays`` record without
    an index is a message of no tensors (a local-only method); any other record without one is refused."""
    if records not in content.array_records:
        raise PackError(f"the message lacks its {records!r} record")
    rec = content[records]
    index = content[config].get(INDEX) if config in content.config_records else None
    if index is None:
        if len(rec) == 0:
            return unpack(*pack({}), expect=expect, allowed=allowed)
        raise PackError(f"the {records!r} record is not packed (no {INDEX!r} in the message's {config!r} record)")
    if set(rec.keys()) != {PACKED}:
        raise PackError(f"a packed {records!r} record holds exactly one array, {PACKED!r}")
    return unpack(rec[PACKED], index, expect=expect, allowed=allowed)
