"""Flower ``Array`` bytes (numpy's .npy format) without the extra copies of ``np.save`` / ``np.load``.

Flower serializes every tensor with ``np.save`` into a BytesIO and deserializes it with ``np.load``: two or three
copies out, one (chunked) copy in. Both ends of Kumiki move whole models every round, so this shared module
(numpy only; the server's ``strategies`` and the sites' ``client`` both use it) does each side with at most one:

* :func:`npy_bytes`: the exact bytes ``np.save`` writes, built with one copy of the data;
* :func:`read_npy`: the bytes as a read-only view, no copy; a header other than the canonical one is parsed by
  numpy's own reader, with its size bound, and anything that is not one plain numeric array is refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

#: Largest .npy header read from untrusted bytes (numpy's own default bound).
MAX_HEADER = 10_000


class NpyError(ValueError):
    """Bytes that are not the .npy serialization of one plain numeric array."""


@lru_cache(maxsize=4096)
def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes for a C-ordered array of this dtype and shape (format 1.0)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


@dataclass(frozen=True)
class Expect:
    """What a tensor's bytes should be: its dtype, shape, the header ``np.save`` writes for them, and sizes."""

    dtype: np.dtype
    shape: tuple[int, ...]
    header: bytes
    count: int
    nbytes: int


@lru_cache(maxsize=4096)
def expect(dtype: np.dtype, shape: tuple[int, ...]) -> Expect:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return Expect(dtype, tuple(shape), npy_header(dtype, tuple(shape)), count, count * dtype.itemsize)


def read_npy(data: Any, want: Expect | None = None) -> np.ndarray:
    """``data`` (the bytes of a Flower ``Array``, ``stype`` numpy.ndarray) as a read-only array view.

    ``want``: when the data is exactly the header ``np.save`` writes for that dtype and shape followed by the
    right number of bytes, nothing is parsed. Otherwise the header is read with numpy's reader (format 1.0 or
    2.0, at most ``MAX_HEADER`` bytes) and the array is what it says (the caller compares dtype and shape).
    Object or non-numeric dtypes and a data length other than the header promises raise :class:`NpyError`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise NpyError(f"array data is {type(data).__name__}, not bytes")
    if (want is not None and len(data) == len(want.header) + want.nbytes
            and (data.startswith(want.header) if isinstance(data, bytes) else data[:len(want.header)] == want.header)):
        return np.frombuffer(data, dtype=want.dtype, count=want.count, offset=len(want.header)).reshape(want.shape)
    fp = io.BytesIO(memoryview(data)[:MAX_HEADER + 16])
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=MAX_HEADER)
        else:
            raise NpyError(f".npy format {version} is not supported (1.0 or 2.0)")
    except NpyError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, ...: all mean bad bytes
        raise NpyError(f"not a .npy array ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject or dtype.kind not in "biufc":
        raise NpyError(f"dtype {dtype} is not a plain numeric type")
    offset = fp.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != count * dtype.itemsize:
        raise NpyError(f"{len(data) - offset} data bytes for {dtype}{list(shape)} ({count * dtype.itemsize} expected)")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")


def npy_bytes(array: np.ndarray) -> bytes:
    """What ``np.save`` writes for a C-contiguous numeric array, built with one copy of its data (``np.save``
    into a BytesIO makes two or three); anything else goes through ``np.save``."""
    if array.flags.c_contiguous and array.dtype.kind in "biufc" and not array.dtype.hasobject:
        try:
            return b"".join((npy_header(array.dtype, array.shape), memoryview(array).cast("B")))
        except (ValueError, TypeError):  # a header numpy would write in another format version, an odd buffer
            pass
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
