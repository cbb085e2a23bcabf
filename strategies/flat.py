"""One flat buffer per reply: a round's updates as the rows of one K x P matrix.

Why: aggregation is a reduction over K replies of P parameters. Done per tensor name, it costs a Python
loop, a float64 copy and a temporary per tensor per reply (and a second copy when Flower's ``Array.numpy()``
deserializes each tensor). Here each reply is a row, read straight from its wire bytes: one pass over the
replies, in blocks of columns that stay in cache, sums each row (a NaN or inf anywhere makes the sum
non-finite: the reply check) and, where the round's update is a plain weighted mean (FedAvg and the methods
that only choose weights), adds the row into that mean, so no K x P matrix is made at all. Rules that need
the rows (trimmed mean, median, norm bounding, central DP, FedHB, FLoRAL) get them as one matrix, and work
on blocks of its columns.

* ``kumiki.npy.read_npy``: a Flower ``Array``'s bytes as a read-only numpy view, without copying them; its
  header is checked (a canonical header is compared as bytes, anything else parsed by numpy's own reader).
* :class:`Layout`: where each floating tensor sits in a row. Integer tensors (BatchNorm's
  ``num_batches_tracked``) stay aside, one copy per row, and are never averaged.
* :class:`Stack`: the matrix and each row's integer tensors. It is a sequence of mappings (row k is a
  :class:`RowView`: name -> view into row k), so code written for ``list[dict[str, ndarray]]`` reads it unchanged.

Rows are in the layout's dtype: float32, or float64 when a tensor is float64. A reply sent in float16
(``server.transport_dtype``) is widened to it as it is copied in: the server's math is never in float16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Columns per block where a rule needs a float64 or sorted copy (K x BLOCK x 8 bytes at a time).
BLOCK = 1 << 15
#: Columns per step of a reply's copy into its row, summed while in cache (256 KB of float32: fits in L2).
CHUNK = 1 << 16


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating)


def add_weighted(acc: np.ndarray, row: np.ndarray, w, tmp: np.ndarray) -> None:
    """``acc += w * row`` as two rounded operations (a product, then a sum) in ``acc``'s dtype, never fused:
    the one weighted-sum step every path takes (:meth:`Stack.read`, :meth:`Stack.weighted_sum`), so a mean is
    bit-identical whichever path made it and on any CPU. ``tmp`` may be ``row`` itself (it is overwritten)."""
    np.multiply(row, w, out=tmp)
    np.add(acc, tmp, out=acc)


def scaled(w: np.ndarray) -> np.ndarray:
    """``w`` times the power of two that brings its largest entry into (1/2, 1]: exact, every bit kept."""
    return w * 2.0 ** -np.ceil(np.log2(w.max()))


@dataclass(frozen=True)
class Layout:
    """Where every floating tensor of a set of named arrays sits in a flat row (in the arrays' order)."""

    order: tuple[str, ...]  # every name, in the arrays' order (outputs keep it)
    names: tuple[str, ...]  # floating tensors, in row order
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    offsets: tuple[int, ...]  # len(names) + 1; the last is the row size
    ints: tuple[str, ...]  # non-floating tensors (never averaged)
    dtype: np.dtype  # the rows' dtype
    _pos: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    _plan: list = field(default_factory=list, compare=False, repr=False)  # filled once by plan()

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        names, shapes, dtypes, offsets, ints = [], [], [], [0], []
        for k, v in arrays.items():
            v = np.asarray(v)
            if _is_float(v.dtype):
                names.append(k)
                shapes.append(tuple(v.shape))
                dtypes.append(v.dtype)
                offsets.append(offsets[-1] + int(v.size))
            else:
                ints.append(k)
        dtype = np.result_type(np.float32, *dtypes)
        return cls(tuple(arrays), tuple(names), tuple(shapes), tuple(dtypes), tuple(offsets), tuple(ints),
                   np.dtype(dtype), {n: i for i, n in enumerate(names)})

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def slice(self, name: str) -> slice:
        i = self._pos[name]
        return slice(self.offsets[i], self.offsets[i + 1])

    def sub(self, names: Sequence[str]) -> tuple[Layout, np.ndarray | slice]:
        """The layout of ``names`` (in this layout's order) and the columns that hold them: a slice when they
        sit side by side (a view, no copy), else an index array."""
        wanted = set(names)
        unknown = wanted - set(self.order)
        if unknown:
            raise KeyError(f"no tensor {sorted(unknown)[0]!r} in these updates")
        idx = [self._pos[n] for n in self.names if n in wanted]
        sizes = [self.offsets[i + 1] - self.offsets[i] for i in idx]
        offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        floats = tuple(self.names[i] for i in idx)
        sub = Layout(tuple(n for n in self.order if n in wanted), floats, tuple(self.shapes[i] for i in idx),
                     tuple(self.dtypes[i] for i in idx), offsets, tuple(n for n in self.ints if n in wanted),
                     self.dtype, {n: j for j, n in enumerate(floats)})
        if not idx or idx == list(range(idx[0], idx[0] + len(idx))):
            lo = self.offsets[idx[0]] if idx else 0
            return sub, slice(lo, lo + sub.size)
        return sub, np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])

    def flatten(self, arrays: Mapping[str, np.ndarray], out: np.ndarray | None = None, dtype=None) -> np.ndarray:
        """The floating tensors of ``arrays`` as one row (a new one, in ``dtype`` or the rows' dtype, unless
        ``out`` is given)."""
        row = np.empty(self.size, dtype or self.dtype) if out is None else out
        missing = [n for n in self.names if n not in arrays]
        if missing:
            raise KeyError(f"update lacks tensor {missing[0]!r}")
        if self.names:
            np.concatenate([np.asarray(arrays[n]).reshape(-1) for n in self.names], out=row)
        return row

    def plan(self) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
        """How to fill a row in ``CHUNK``-column steps: (lo, hi, [(tensor index, start, end), ...]) per step."""
        if not self._plan and self.size:
            steps, i = [], 0
            for lo in range(0, self.size, CHUNK):
                hi = min(lo + CHUNK, self.size)
                pieces = []
                while i < len(self.names) and self.offsets[i + 1] <= lo:
                    i += 1
                j = i
                while j < len(self.names) and self.offsets[j] < hi:
                    a, b = max(lo, self.offsets[j]), min(hi, self.offsets[j + 1])
                    if b > a:
                        pieces.append((j, a - self.offsets[j], b - self.offsets[j]))
                    j += 1
                steps.append((lo, hi, pieces))
            self._plan.extend(steps)
        return self._plan

    def views(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """The floating tensors of one row as reshaped views, in the row's own dtype (no cast, no copy)."""
        return {n: row[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i]) for i, n in enumerate(self.names)}

    def unflatten(self, row: np.ndarray, ints: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named tensors of one row (views when the dtype matches, else cast copies), with ``ints`` copied in,
        in the original order."""
        out: dict[str, np.ndarray] = {}
        for n in self.order:
            if n in self._pos:
                i = self._pos[n]
                v = row[self.offsets[i]:self.offsets[i + 1]].reshape(self.shapes[i])
                out[n] = v if v.dtype == self.dtypes[i] else v.astype(self.dtypes[i])
            else:
                out[n] = np.array(ints[n])
        return out


class RowView(Mapping):
    """Row ``index`` of a :class:`Stack` as a mapping name -> array (views into the matrix, no copies);
    ``names``: the tensors this update carried (a site of one group does not carry another group's)."""

    __slots__ = ("stack", "index", "names")

    def __init__(self, stack: Stack, index: int, names: tuple[str, ...] | None = None):
        self.stack, self.index, self.names = stack, index, stack.layout.order if names is None else names

    def __getitem__(self, name: str) -> np.ndarray:
        lay = self.stack.layout
        if name not in self.names:
            raise KeyError(name)
        if name in lay._pos:
            i = lay._pos[name]
            v = self.stack.rows[self.index, lay.offsets[i]:lay.offsets[i + 1]].reshape(lay.shapes[i])
            return v if v.dtype == lay.dtypes[i] else v.astype(lay.dtypes[i])
        return self.stack.ints[self.index][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names


class Stack(Sequence):
    """K updates: ``rows`` (K x P, floating tensors per :class:`Layout`) and each row's integer tensors.

    A stack :meth:`read` for a plain weighted mean keeps its rows' sources (views of the replies' bytes) and
    copies them into the matrix only when something asks for ``rows``: FedAvg's round never does.
    """

    def __init__(self, layout: Layout, rows: np.ndarray | None, ints: list[dict[str, np.ndarray]],
                 sources: list[list[np.ndarray]] | None = None):
        if rows is not None and (rows.ndim != 2 or rows.shape[1] != layout.size or len(ints) != rows.shape[0]):
            raise ValueError("rows do not fit the layout")
        if rows is None and (sources is None or len(sources) != len(ints)):
            raise ValueError("a stack needs its rows or their sources")
        self.layout, self.ints = layout, ints
        self._rows, self._sources = rows, sources
        #: each row's sum where :meth:`read` computed it while copying (else None: computed when asked)
        self.sums: np.ndarray | None = None
        #: (scaled weights, their weighted sum of the rows) where :meth:`read` computed it (see :meth:`premean`)
        self._premean: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def rows(self) -> np.ndarray:
        """The K x P matrix (made from the sources on first use)."""
        if self._rows is None:
            rows = np.empty((len(self.ints), self.layout.size), self.layout.dtype)
            for r, src in enumerate(self._sources):
                if src:
                    np.concatenate(src, out=rows[r])
            self._rows, self._sources = rows, None
        return self._rows

    # ---------------------------------------------------------------- building
    @classmethod
    def of(cls, updates: Sequence[Mapping[str, np.ndarray]], names: Sequence[str] | None = None) -> Stack:
        """``updates`` (every one with the same tensors) as a stack over ``names`` (default: all).

        Rows of one stack (its :class:`RowView` s, as the server's updates hold them) are taken without copying
        where the rows and the names' columns are contiguous; anything else is copied in once.
        """
        if isinstance(updates, Stack) and names is None:
            return updates
        if not len(updates):
            raise ValueError("nothing to aggregate")
        parent = getattr(updates[0], "stack", None)
        if parent is not None and all(getattr(u, "stack", None) is parent for u in updates):
            return parent.take([u.index for u in updates], list(updates[0]) if names is None else names)
        first = updates[0]
        keys = list(first) if names is None else list(names)
        layout = Layout.of({k: first[k] for k in keys})
        rows = np.empty((len(updates), layout.size), layout.dtype)
        ints = []
        for r, u in enumerate(updates):
            if set(u) != set(first) and names is None:
                raise ValueError("updates hold different tensors")
            layout.flatten(u, out=rows[r])
            ints.append({k: np.array(u[k]) for k in layout.ints})
        return cls(layout, rows, ints)

    @classmethod
    def read(cls, layout: Layout, updates: Sequence[Mapping[str, np.ndarray]], fill: Callable[[], np.ndarray],
             weights: Sequence[float] | None = None) -> Stack:
        """The server's round batch: one row per update over the full ``layout`` (shared + every group).

        A row's tensors come from its update; where an update does not carry a tensor (another group's), the row
        holds ``fill()`` (the server's current values), so a change computed over a whole row is the update's own.
        One pass over the replies, in blocks of ``CHUNK`` columns that stay in cache, sums each row (the sums
        flag NaN or inf: :meth:`nonfinite`) and

        * without ``weights``: copies each block into the matrix;
        * with ``weights`` (what the round's plain weighted mean will use): adds each block, weighted, into
          that mean's sum (:meth:`premean`) and copies nothing: the matrix is made only if asked for.
        """
        k = len(updates)
        ints, sources, fill_row = [], [], None
        for u in updates:  # each row's sources, in layout order: the update's tensors, else the server's
            if fill_row is None and any(n not in u for n in layout.names):
                fill_row = fill()
            sources.append([np.asarray(u[n]).reshape(-1) if n in u else fill_row[layout.slice(n)]
                            for n in layout.names])
            ints.append({n: np.array(u[n]) for n in layout.ints if n in u})
        stack = cls(layout, None, ints, sources)
        stack.sums = sums = np.zeros(k)
        w = None if weights is None else scaled(np.asarray(weights, np.float64)).astype(layout.dtype)
        rows = np.empty((k, layout.size), layout.dtype) if w is None else None
        acc = np.zeros(layout.size, layout.dtype) if w is not None else None
        step = np.empty(min(CHUNK, max(layout.size, 1)), layout.dtype)
        ones = np.ones_like(step)
        with np.errstate(over="ignore", invalid="ignore"):
            for lo, hi, pieces in layout.plan():
                for r, src in enumerate(sources):
                    dst = rows[r, lo:hi] if rows is not None else step[:hi - lo]
                    if len(pieces) == 1:
                        i, a, b = pieces[0]
                        np.copyto(dst, src[i][a:b])
                    else:
                        np.concatenate([src[i][a:b] for i, a, b in pieces], out=dst)
                    sums[r] += float(np.dot(dst, ones[:hi - lo]))
                    if acc is not None:
                        add_weighted(acc[lo:hi], dst, w[r], dst)
        if rows is not None:
            stack._rows, stack._sources = rows, None
        else:
            stack._premean = (w, acc)
        return stack

    def premean(self, w: np.ndarray) -> np.ndarray | None:
        """``w @ rows`` where :meth:`read` already summed it with exactly these (scaled) weights, else None."""
        if self._premean is not None and np.array_equal(self._premean[0], w):
            return self._premean[1]
        return None

    def weighted_sum(self, w: np.ndarray) -> np.ndarray:
        """``sum_r w[r] * row_r`` in the rows' dtype, rows added in order (:func:`add_weighted`): the sum
        :meth:`read` took where it used exactly these weights, else the same arithmetic over the matrix.

        Why not ``w @ rows``: a BLAS product sums in an order, and with fused multiply-adds, that depend on the
        CPU's kernel; M-Fed's encoder mean (from the matrix) then differed from FedAvg's (summed as read) in the
        last bit on one machine and not on another."""
        pre = self.premean(w)
        if pre is not None:
            return pre
        size = self.layout.size
        acc = np.zeros(size, self.layout.dtype)
        step = np.empty(min(CHUNK, max(size, 1)), self.layout.dtype)
        rows = self.rows
        with np.errstate(over="ignore", invalid="ignore"):
            for lo in range(0, size, CHUNK):
                hi = min(lo + CHUNK, size)
                for r in range(len(rows)):
                    add_weighted(acc[lo:hi], rows[r, lo:hi], w[r], step[:hi - lo])
        return acc

    def take(self, index: Sequence[int], names: Sequence[str] | None = None) -> Stack:
        """Rows ``index`` over ``names``: views where both are contiguous, else one copy (all rows of a stack
        not yet copied: its sources, no copy)."""
        index = list(index)
        if names is None:
            layout, cols = self.layout, slice(0, self.layout.size)
        else:
            layout, cols = self.layout.sub(names)
        ints = [{k: v for k, v in self.ints[i].items() if k in layout.ints} for i in index]
        everything = index == list(range(len(self)))
        if self._rows is None and everything:
            pos = [self.layout._pos[n] for n in layout.names]
            out = Stack(layout, None, ints, [[src[p] for p in pos] for src in self._sources])
        else:
            if index and index == list(range(index[0], index[0] + len(index))):
                rows = self.rows[index[0]:index[0] + len(index)]
            else:
                rows = self.rows[index]
            out = Stack(layout, rows[:, cols], ints)
        if self._premean is not None and everything:
            out._premean = (self._premean[0], self._premean[1][cols])
        return out

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.ints)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return self.take(range(len(self))[k])
        return self.row(k)

    def row(self, k: int, names: tuple[str, ...] | None = None) -> RowView:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return RowView(self, k % len(self), names)

    def unflatten(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """One aggregated row as named tensors; integer tensors from the first update (never averaged)."""
        return self.layout.unflatten(row, self.ints[0])

    def nonfinite(self) -> dict[int, str]:
        """Rows holding NaN or inf, each with the first such tensor's name.

        The rows' sums flag them (a NaN or inf anywhere makes a sum non-finite; :meth:`read` took them in its
        pass, else one matrix-vector product does); a flagged row is then checked exactly (a finite row whose
        float32 sum overflows is not rejected)."""
        if not self.layout.size or not len(self):
            return {}
        sums = self.sums
        if sums is None:
            with np.errstate(over="ignore", invalid="ignore"):
                sums = self.rows @ np.ones(self.layout.size, self.rows.dtype)
        bad = {}
        lay = self.layout
        for k in np.flatnonzero(~np.isfinite(sums)):
            parts = (self._sources[k] if self._rows is None else
                     [self._rows[k, lay.offsets[i]:lay.offsets[i + 1]] for i in range(len(lay.names))])
            first = next((n for n, v in zip(lay.names, parts) if not np.isfinite(v).all()), None)
            if first is not None:
                bad[int(k)] = first
        return bad

    def blocks(self) -> Iterator[slice]:
        """Column blocks for rules that need float64 or sorted copies (bounded memory, no per-tensor loop)."""
        for lo in range(0, self.layout.size, BLOCK):
            yield slice(lo, min(lo + BLOCK, self.layout.size))
