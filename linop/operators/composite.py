r"""Composite operators: stacks, sums, products, block rows and whole DAGs of operators.

Seed 000 (appendix C) linearises a network at a point into fixed operators and composes
them by the recurrence ``J_l = W_l Σ_{l-1} J_{l-1} + [0, R_l]``; residual sums add
Jacobians and concatenations stack them.  This module holds that algebra:

* :class:`Chain` ``A_k ⋯ A_1``, :class:`Sum` ``A_1 + … + A_k``, :class:`VStack` (one input,
  stacked outputs);
* block rows ``y = Σ_i A_i x_i`` over *separate* inputs: :class:`HStack` (a residual sum is
  ``[I I … I]``, a bias node ``[I R]``) and :class:`Concat` (channel concatenation, evaluated
  by ``torch.cat``);
* :class:`GraphOperator` — a DAG of such local operators evaluated node by node, every node
  once (a tree of Chain / Sum would evaluate shared sub-graphs once per path, exponentially
  often on a ResNet).  Its CSR is assembled by the same recurrence on sparse matrices.

A plain :class:`~linop.operators.base.Operator` is a block row with one part; the helpers
:func:`apply_parts`, :func:`adjoint_parts`, :func:`n_parts` treat both alike.
"""
from __future__ import annotations

from math import prod
from typing import Any, Sequence

import numpy as np
import scipy.sparse
import torch

from .base import Operator, as_shape, numpy_dtype
from .conv import DEFAULT_MAX_SPARSE_BYTES, finish_csr, index_dtype, result_dtype, seq_of_ops

__all__ = [
    "VStack",
    "Sum",
    "Chain",
    "BlockRow",
    "HStack",
    "Concat",
    "GraphOperator",
    "apply_parts",
    "adjoint_parts",
    "n_parts",
]


def _nnz(op: Operator) -> int:
    """Non-zeros of a part: its own bound for a composite, else its structural pattern."""
    return op.nnz_bound() if isinstance(op, _Composite) else int(op.structure[0][-1])


def _row_counts(op: Operator) -> np.ndarray:
    return np.diff(op.structure[0]).astype(np.float64)


class _Composite(Operator):
    """Operators built from others; their explicit matrix is built from the parts' CSR
    matrices (so each part's fast assembly is used) by sparse vstack / sum / product."""

    ops: list

    def _sparse(self, dtype) -> scipy.sparse.csr_matrix:
        raise NotImplementedError

    def nnz_bound(self) -> int:
        """An upper bound of the non-zeros of :meth:`to_sparse`, from the parts' patterns only
        (no product is formed): the sum of the parts' for stacks and sums; for a chain the
        row-count bound ``r ← |A_i| r`` (``rowcount(AB) ≤ |A| rowcount(B)``), capped at the
        input size per row."""
        return int(sum(_nnz(op) for op in self.ops))

    def to_sparse(self, gpu: bool = False, dtype: Any = None, max_bytes: int | None = None):
        """Explicit CSR from the parts' CSR matrices; refused (``MemoryError``, before any product
        is formed) when the :meth:`nnz_bound` estimate exceeds ``max_bytes`` (default
        :data:`~linop.operators.conv.DEFAULT_MAX_SPARSE_BYTES`)."""
        dt = numpy_dtype(dtype) if dtype is not None else self.dtype
        limit = DEFAULT_MAX_SPARSE_BYTES if max_bytes is None else int(max_bytes)
        nnz = self.nnz_bound()
        need = nnz * (dt.itemsize + np.dtype(index_dtype(nnz, max(self.shape))).itemsize) + 8 * (self.shape[0] + 1)
        if need > limit:
            raise MemoryError(
                f"{type(self).__name__}.to_sparse: up to {nnz:,} non-zeros, ~{need:,} bytes "
                f"({need / 2**30:.3g} GiB) > max_bytes={limit:,} bytes; use the matrix-free matvec / "
                f"rmatvec, or pass a larger max_bytes")
        A = scipy.sparse.csr_matrix(self._sparse(dt), dtype=dt)
        A.sum_duplicates()
        A.sort_indices()
        return finish_csr(A, gpu)

    def _coo(self):
        A = self._sparse(self.dtype).tocoo()
        return A.row, A.col, A.data


class VStack(_Composite):
    """Concatenation of several operators' outputs for the same input (``J`` of a
    concatenation of branches that read one tensor stacks their Jacobians).

    Output ``(ΣC_i, H, W)`` when every output is ``(C_i, H, W)`` with equal ``H, W``
    (channel concatenation — in C order this is also the flat concatenation), else flat.
    """

    def __init__(self, ops: Sequence[Operator]):
        ops = seq_of_ops(ops, "VStack")
        ins = ops[0].in_shape
        for i, op in enumerate(ops):
            if op.in_shape != ins:
                raise ValueError(f"VStack: ops[{i}] has in_shape {op.in_shape}, expected {ins} (same input for all)")
        outs = [op.out_shape for op in ops]
        if all(len(o) == 3 for o in outs) and len({o[1:] for o in outs}) == 1:
            out = (sum(o[0] for o in outs),) + outs[0][1:]
        else:
            out = (sum(prod(o) for o in outs),)
        self.ops = ops
        self._sizes = [prod(o) for o in outs]
        super().__init__(ins, out, dtype=result_dtype(*[op.dtype for op in ops]))

    def _apply(self, x):
        n = x.shape[0]
        return torch.cat([op._apply(x).reshape(n, -1) for op in self.ops], dim=1).reshape((n,) + self.out_shape)

    def _apply_adjoint(self, y):
        n = y.shape[0]
        parts = y.reshape(n, -1).split(self._sizes, dim=1)
        out = None
        for op, p in zip(self.ops, parts):
            z = op._apply_adjoint(p.reshape((n,) + op.out_shape))
            out = z if out is None else out + z
        return out

    def _sparse(self, dtype):
        return scipy.sparse.vstack([op.to_sparse(dtype=dtype) for op in self.ops], format="csr")


class Sum(_Composite):
    """``(A_1 + … + A_k) x`` — all parts share in/out shapes (and the input)."""

    def __init__(self, ops: Sequence[Operator]):
        ops = seq_of_ops(ops, "Sum")
        for i, op in enumerate(ops):
            if op.in_shape != ops[0].in_shape or op.out_shape != ops[0].out_shape:
                raise ValueError(
                    f"Sum: ops[{i}] maps {op.in_shape} -> {op.out_shape}, expected "
                    f"{ops[0].in_shape} -> {ops[0].out_shape}"
                )
        self.ops = ops
        super().__init__(ops[0].in_shape, ops[0].out_shape, dtype=result_dtype(*[op.dtype for op in ops]))

    def _apply(self, x):
        out = self.ops[0]._apply(x)
        for op in self.ops[1:]:
            out = out + op._apply(x)
        return out

    def _apply_adjoint(self, y):
        out = self.ops[0]._apply_adjoint(y)
        for op in self.ops[1:]:
            out = out + op._apply_adjoint(y)
        return out

    def _sparse(self, dtype):
        A = self.ops[0].to_sparse(dtype=dtype)
        for op in self.ops[1:]:
            A = A + op.to_sparse(dtype=dtype)
        return A


class Chain(_Composite):
    """Composition ``A_k ⋯ A_2 A_1``; ``ops`` are given in the order they are applied
    (``ops[0]`` first).  ``to_sparse`` multiplies the parts' CSR matrices."""

    def __init__(self, ops: Sequence[Operator]):
        ops = seq_of_ops(ops, "Chain")
        for i in range(1, len(ops)):
            if ops[i].in_shape != ops[i - 1].out_shape:
                raise ValueError(
                    f"Chain: ops[{i}] expects in_shape {ops[i].in_shape} but ops[{i - 1}] produces "
                    f"{ops[i - 1].out_shape} (insert a Flatten?)"
                )
        self.ops = ops
        super().__init__(ops[0].in_shape, ops[-1].out_shape, dtype=result_dtype(*[op.dtype for op in ops]))

    def _apply(self, x):
        for op in self.ops:
            x = op._apply(x)
        return x

    def _apply_adjoint(self, y):
        for op in reversed(self.ops):
            y = op._apply_adjoint(y)
        return y

    def nnz_bound(self) -> int:
        n_in = self.shape[1]
        r = np.minimum(_row_counts(self.ops[0]), n_in)
        for op in self.ops[1:]:
            indptr, indices = op.structure
            P = scipy.sparse.csr_matrix((np.ones(indices.size), indices, indptr), shape=op.shape)
            r = np.minimum(P @ r, n_in)  # rowcount(A B) ≤ |A| rowcount(B), at most n_in per row
        return int(r.sum())

    def _sparse(self, dtype):
        A = self.ops[0].to_sparse(dtype=dtype)
        for op in self.ops[1:]:
            A = op.to_sparse(dtype=dtype) @ A
        return A


# ----------------------------------------------------------------------------- block rows


class BlockRow(_Composite):
    r"""``y = Σ_i A_i x_i`` over separate inputs ``x_1 … x_k`` (shapes ``part_shapes``).

    As an :class:`Operator` its input is the flat stack ``[x_1; …; x_k]``; the graph engines
    use the part-wise forms :meth:`apply_parts` / :meth:`adjoint_parts` /
    :meth:`sparse_combine`, which never build the stack.  Subclasses implement those three
    and ``_sparse``."""

    part_shapes: list[tuple[int, ...]]

    def _init_parts(self, part_shapes: Sequence[Sequence[int]], out_shape: Sequence[int], dtype: Any) -> None:
        self.part_shapes = [as_shape(s, "part shape") for s in part_shapes]
        self._sizes = [prod(s) for s in self.part_shapes]
        Operator.__init__(self, (sum(self._sizes),), out_shape, dtype=dtype)

    def apply_parts(self, xs: Sequence[torch.Tensor | None], out: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i A_i x_i`` for batched ``xs[i]`` of shape ``(N, *part_shapes[i])``; ``None``
        stands for a zero input (skipped, where the kind allows it).  ``out``: as in
        :meth:`Operator.apply_parts <linop.operators.base.Operator.apply_parts>` (write the
        result into it and return it, or return a new tensor; the same values either way)."""
        raise NotImplementedError

    def adjoint_parts(self, y: torch.Tensor) -> list[torch.Tensor]:
        """``[A_1ᵀ y, …, A_kᵀ y]`` for a batched ``y`` of shape ``(N, *out_shape)``."""
        raise NotImplementedError

    def sparse_combine(self, Js: Sequence[scipy.sparse.csr_matrix], dtype: Any) -> scipy.sparse.csr_matrix:
        """``Σ_i A_i J_i`` for CSR matrices ``J_i`` with ``prod(part_shapes[i])`` rows."""
        raise NotImplementedError

    def part_columns(self, j: int) -> np.ndarray:
        """Sorted columns of part ``j``'s input that its structure reads (cached; e.g. the
        entries of ``x_b`` a bias part reads)."""
        j = j % len(self._sizes)
        cache = self.__dict__.setdefault("_part_columns", {})
        if j not in cache:
            indptr, indices = self.structure
            lo = sum(self._sizes[:j])
            sel = indices[(indices >= lo) & (indices < lo + self._sizes[j])]
            cache[j] = np.unique(sel) - lo
        return cache[j]

    def _apply(self, x):
        n = x.shape[0]
        parts = x.reshape(n, -1).split(self._sizes, dim=1)
        return self.apply_parts([p.reshape((n,) + s) for p, s in zip(parts, self.part_shapes)])

    def _apply_adjoint(self, y):
        n = y.shape[0]
        return torch.cat([p.reshape(n, -1) for p in self.adjoint_parts(y)], dim=1)


class HStack(BlockRow):
    """``[A_1 … A_k]``: ``y = Σ_i A_i x_i`` with one operator per input (equal out_shapes).

    A residual sum is ``HStack([I, I])``; a bias node ``y = x + R x_b`` is ``HStack([I, R])``."""

    def __init__(self, ops: Sequence[Operator]):
        ops = seq_of_ops(ops, "HStack")
        for i, op in enumerate(ops):
            if op.out_shape != ops[0].out_shape:
                raise ValueError(f"HStack: ops[{i}] has out_shape {op.out_shape}, expected {ops[0].out_shape} (same output for all)")
        self.ops = ops
        self._init_parts([op.in_shape for op in ops], ops[0].out_shape, result_dtype(*[op.dtype for op in ops]))

    def apply_parts(self, xs, out=None):
        r"""``y = A_1 x_1 + A_2 x_2 + …`` summed left to right over the non-zero parts (``None``
        is a zero input, e.g. ``x_b``'s image tangents, and contributes nothing).

        With ``out`` (a batch of ``y``'s shape and dtype): the first two terms are added straight
        into it, ``torch.add(A_1 x_1, A_2 x_2, out=out)``, and each later one in place — the
        same additions in the same order as ``(A_1 x_1 + A_2 x_2) + …``, bit for bit, with no
        result temporary (a residual sum ``[I, I]`` reads its inputs and writes ``out`` once); a
        single term goes through its operator's :meth:`~linop.operators.base.Operator.apply_into`."""
        if len(xs) != len(self.ops):
            raise ValueError(f"HStack.apply_parts: xs has {len(xs)} entries, expected {len(self.ops)} (one per part)")
        live = [(op, x) for op, x in zip(self.ops, xs) if x is not None]
        if not live:
            raise ValueError("HStack.apply_parts: every input is None (zero); the result's batch size is unknown")
        if out is not None and len(live) == 1:
            op, x = live[0]
            return out if op.apply_into(x, out) else op._apply(x)
        y = live[0][0]._apply(live[0][1])
        rest = iter(live[1:])
        if out is not None:
            op, x = next(rest)
            z = op._apply(x)
            if z.shape != out.shape or z.dtype != out.dtype or y.shape != out.shape or y.dtype != out.dtype:
                raise ValueError(f"HStack.apply_parts: out has shape {tuple(out.shape)} / {out.dtype}, the result "
                                 f"{tuple(z.shape)} / {z.dtype}")
            y = torch.add(y, z, out=out)
            del z  # the second term's temporary (if any) is freed before the next one is made
            for op, x in rest:
                y.add_(op._apply(x))
            return y
        for op, x in rest:
            y = y + op._apply(x)
        return y

    def adjoint_parts(self, y):
        return [op._apply_adjoint(y) for op in self.ops]

    def sparse_combine(self, Js, dtype):
        A = self.ops[0].to_sparse(dtype=dtype) @ Js[0]
        for op, J in zip(self.ops[1:], Js[1:]):
            A = A + op.to_sparse(dtype=dtype) @ J
        return A.tocsr()

    def _sparse(self, dtype):
        return scipy.sparse.hstack([op.to_sparse(dtype=dtype) for op in self.ops], format="csr")


class Concat(BlockRow):
    """Concatenation of inputs along per-sample ``axis`` (``torch.cat(xs, dim=axis + 1)``).

    A permutation of the stacked inputs (the identity for ``axis=0`` in C order), evaluated by
    ``torch.cat`` / ``torch.split``; its CSR stacks the parts' rows and permutes them."""

    def nnz_bound(self) -> int:
        return int(self.shape[0])  # a permutation: one entry per row

    def __init__(self, part_shapes: Sequence[Sequence[int]], axis: int = 0, dtype: Any = np.float64):
        shapes = [as_shape(s, "part_shapes[i]") for s in part_shapes]
        if not shapes:
            raise ValueError("Concat needs at least one part shape, got none")
        nd = len(shapes[0])
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis < nd:
            raise ValueError(f"Concat: axis must be an int in [0, {nd}), got {axis!r}")
        for i, s in enumerate(shapes):
            if len(s) != nd or s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:]:
                raise ValueError(f"Concat: part_shapes[{i}]={s} does not match {shapes[0]} off axis {axis}")
        self.axis = int(axis)
        out = list(shapes[0])
        out[axis] = sum(s[axis] for s in shapes)
        self._init_parts(shapes, tuple(out), numpy_dtype(dtype))
        offs = np.cumsum([0] + self._sizes)
        pieces = [torch.arange(int(o), int(o) + n).reshape(s) for o, n, s in zip(offs, self._sizes, shapes)]
        self.perm = torch.cat(pieces, dim=self.axis).reshape(-1)  # output entry -> stacked input entry

    def apply_parts(self, xs, out=None):
        """``torch.cat(xs)`` along the axis (``None`` parts as zeros), written into ``out`` when given."""
        if any(x is None for x in xs):
            like = next(x for x in xs if x is not None)
            xs = [like.new_zeros((like.shape[0],) + s) if x is None else x for x, s in zip(xs, self.part_shapes)]
        if out is not None:
            return torch.cat(list(xs), dim=self.axis + 1, out=out)  # copies: the same values
        return torch.cat(list(xs), dim=self.axis + 1)

    def adjoint_parts(self, y):
        return list(torch.split(y, [s[self.axis] for s in self.part_shapes], dim=self.axis + 1))

    def sparse_combine(self, Js, dtype):
        return scipy.sparse.vstack(Js, format="csr")[self.perm.numpy()]

    def _sparse(self, dtype):
        n = self.shape[0]
        return scipy.sparse.csr_matrix((np.ones(n, dtype=dtype), (np.arange(n), self.perm.numpy())), shape=self.shape)


def n_parts(op: Operator) -> int:
    """Number of inputs of a local operator (a plain operator has one)."""
    return len(op.part_shapes) if isinstance(op, BlockRow) else 1


def apply_parts(op: Operator, xs: Sequence[torch.Tensor | None], out: torch.Tensor | None = None) -> torch.Tensor:
    """``op`` applied to its inputs ``xs`` (one batched tensor per part; a plain operator has
    one): :meth:`Operator.apply_parts <linop.operators.base.Operator.apply_parts>`, into ``out``
    where the operator can (it returns ``out`` then; else a new tensor for the caller to copy)."""
    return op.apply_parts(xs) if out is None else op.apply_parts(xs, out=out)


def adjoint_parts(op: Operator, y: torch.Tensor) -> list[torch.Tensor]:
    """``op``'s adjoint of ``y``, one batched tensor per part."""
    return op.adjoint_parts(y) if isinstance(op, BlockRow) else [op._apply_adjoint(y)]


def _sparse_combine(op: Operator, Js: Sequence[Any], dtype: Any):
    return op.sparse_combine(Js, dtype) if isinstance(op, BlockRow) else (op.to_sparse(dtype=dtype) @ Js[0]).tocsr()


# ----------------------------------------------------------------------------- DAG


class GraphOperator(_Composite):
    r"""The operator of a DAG of local operators, evaluated node by node.

    Parameters
    ----------
    sources : sequence of per-sample shapes ``s_0, s_1, …``; the operator's input is their
        flat concatenation, ``in_shape = (Σ prod(s_i),)`` (e.g. ``[x; x_b]``).
    nodes : sequence of ``(inputs, op)`` in topological order.  ``inputs`` index the entries
        ``sources + nodes`` (sources first) and must refer to earlier entries; ``op`` maps
        them to the node's output: a plain operator for one input, a :class:`BlockRow`
        (one part per input) otherwise.
    output : index of the output entry (default: the last node).

    Notes
    -----
    Forward, every needed node runs once: ``v_n = Σ_i A_{n,i} v_{in(n,i)}``; values are freed
    after their last consumer.  The adjoint runs the nodes in reverse, accumulating
    cotangents (``Σ_i`` over consumers).  ``to_sparse`` assembles the CSR by the same
    recurrence on sparse matrices, ``J_n = Σ_i A_{n,i} J_{in(n,i)}`` with ``J_source`` the
    selection of its slice of the input (seed 000 appendix C: ``J_l = W_l Σ J_{l-1} + [0, R_l]``),
    after estimating its size.
    """

    def __init__(self, sources: Sequence[Sequence[int]], nodes: Sequence[tuple[Sequence[int], Operator]],
                 output: int | None = None):
        self.sources = [as_shape(s, "sources[i]") for s in sources]
        if not self.sources:
            raise ValueError("GraphOperator: sources must name at least one input shape")
        ns = len(self.sources)
        shapes = list(self.sources)
        entries: list[tuple[tuple[int, ...], Operator]] = []
        for k, (ins, op) in enumerate(nodes):
            ins = tuple(int(i) for i in ins)
            if not isinstance(op, Operator):
                raise TypeError(f"GraphOperator: nodes[{k}] op must be a linop Operator, got {type(op).__name__}")
            if any(not 0 <= i < ns + k for i in ins) or len(ins) != n_parts(op):
                raise ValueError(f"GraphOperator: nodes[{k}] reads {ins}: need {n_parts(op)} earlier entries (< {ns + k})")
            want = op.part_shapes if isinstance(op, BlockRow) else [op.in_shape]
            for i, w in zip(ins, want):
                if prod(shapes[i]) != prod(w):
                    raise ValueError(f"GraphOperator: nodes[{k}] expects {w} from entry {i}, which has shape {shapes[i]}")
            entries.append((ins, op))
            shapes.append(op.out_shape)
        out = ns + len(entries) - 1 if output is None else int(output)
        if not 0 <= out < len(shapes):
            raise ValueError(f"GraphOperator: output={output!r} is not an entry index (< {len(shapes)})")
        need = {out}
        for k in range(len(entries) - 1, -1, -1):
            if ns + k in need:
                need.update(entries[k][0])
        #: the needed nodes as (entry index, inputs, op), in order
        self.plan = [(ns + k, ins, op) for k, (ins, op) in enumerate(entries) if ns + k in need]
        self.output = out
        self._shapes = shapes
        self._sizes = [prod(s) for s in self.sources]
        self._last = {}
        for pos, (_, ins, _) in enumerate(self.plan):
            for i in ins:
                self._last[i] = pos
        self.ops = [op for _, _, op in self.plan]
        dt = result_dtype(*[op.dtype for op in self.ops]) if self.ops else np.float64
        super().__init__((sum(self._sizes),), shapes[out], dtype=dt)

    # ------------------------------------------------------------------ evaluation
    def _apply(self, x):
        n = x.shape[0]
        vals: dict[int, torch.Tensor] = {
            i: p.reshape((n,) + s) for i, (p, s) in enumerate(zip(x.reshape(n, -1).split(self._sizes, 1), self.sources))}
        for pos, (k, ins, op) in enumerate(self.plan):
            vals[k] = apply_parts(op, [vals[i].reshape((n,) + self._part_shape(op, j)) for j, i in enumerate(ins)])
            for i in ins:
                if self._last[i] == pos and i != self.output:
                    vals.pop(i, None)
        return vals[self.output].reshape((n,) + self.out_shape)

    @staticmethod
    def _part_shape(op: Operator, j: int) -> tuple[int, ...]:
        return op.part_shapes[j] if isinstance(op, BlockRow) else op.in_shape

    def _apply_adjoint(self, y):
        n = y.shape[0]
        cot: dict[int, torch.Tensor] = {self.output: y}
        for k, ins, op in reversed(self.plan):
            g = cot.pop(k, None)
            if g is None:
                continue
            for i, t in zip(ins, adjoint_parts(op, g.reshape((n,) + op.out_shape))):
                t = t.reshape((n,) + self._shapes[i])
                cot[i] = cot[i] + t if i in cot else t
        parts = [cot[i].reshape(n, -1) if i in cot else y.new_zeros(n, m) for i, m in enumerate(self._sizes)]
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ sparse form
    def sparse_bytes(self, dtype: Any = None) -> int:
        """Upper bound of the peak bytes :meth:`to_sparse` holds (live CSR matrices).

        Row non-zero counts are propagated through the structural patterns (a row of
        ``A J`` has at most ``Σ_j |A_ij| nnz(J_j)`` entries, and at most ``n`` columns)."""
        dt = np.dtype(numpy_dtype(dtype) if dtype is not None else self.dtype)
        n = self.shape[1]
        itemsize = dt.itemsize + np.dtype(index_dtype(0, n)).itemsize
        rows: dict[int, np.ndarray] = {i: np.ones(m) for i, m in enumerate(self._sizes)}
        live = sum(self._sizes) * itemsize
        peak = live
        for pos, (k, ins, op) in enumerate(self.plan):
            indptr, indices = op.structure
            S = scipy.sparse.csr_matrix((np.ones(len(indices)), indices, indptr), shape=op.shape)
            r = np.minimum(S @ np.concatenate([rows[i] for i in ins]), n)
            rows[k] = r
            size = float(r.sum()) * itemsize + (r.size + 1) * 8
            live += size
            peak = max(peak, live)
            for i in ins:
                if self._last[i] == pos and i != self.output:
                    live -= float(rows.pop(i).sum()) * itemsize
        return int(peak)

    def to_sparse(self, gpu: bool = False, dtype: Any = None, max_bytes: int | None = None):
        """The explicit CSR matrix, by the sparse recurrence (see the class notes).

        Parameters
        ----------
        gpu : return a ``cupyx.scipy.sparse.csr_matrix``.
        dtype : value dtype (default the operator's).
        max_bytes : refuse (``MemoryError``, before assembling) when :meth:`sparse_bytes`
            exceeds it (default :data:`~linop.operators.conv.DEFAULT_MAX_SPARSE_BYTES`).
        """
        dt = numpy_dtype(dtype) if dtype is not None else self.dtype
        limit = DEFAULT_MAX_SPARSE_BYTES if max_bytes is None else int(max_bytes)
        need = self.sparse_bytes(dt)
        if need > limit:
            raise MemoryError(
                f"GraphOperator.to_sparse: assembling the {self.shape[0]:,} x {self.shape[1]:,} Jacobian needs up to "
                f"~{need / 2**30:.2f} GiB > max_bytes={limit:,} bytes; use the matrix-free matvec / rmatvec / "
                f"apply_adjoint (J.T) instead, the compressed sweep (Linearisation.sweep / LayerJacobian), "
                f"a smaller input, or pass a larger max_bytes")
        A = self._sparse(dt)
        A.sum_duplicates()
        A.sort_indices()
        return finish_csr(A, gpu)

    def _sparse(self, dtype):
        n = self.shape[1]
        mats: dict[int, Any] = {}
        off = 0
        for i, m in enumerate(self._sizes):
            mats[i] = scipy.sparse.csr_matrix((np.ones(m, dtype=dtype), (np.arange(m), off + np.arange(m))), shape=(m, n))
            off += m
        for pos, (k, ins, op) in enumerate(self.plan):
            mats[k] = _sparse_combine(op, [mats[i] for i in ins], dtype)
            for i in ins:
                if self._last[i] == pos and i != self.output:
                    mats.pop(i, None)
        return scipy.sparse.csr_matrix(mats[self.output], dtype=dtype)

    def __repr__(self) -> str:
        return (f"<GraphOperator {self.in_shape} -> {self.out_shape}, {len(self.plan)} nodes, "
                f"sources {self.sources}, dtype={self.dtype}>")
