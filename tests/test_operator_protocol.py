"""Operators own their evaluation: the sweep engine calls only the operator protocol.

``Operator.apply_parts(xs, out)`` / ``apply_into(x, out)`` / ``apply_(x)`` are evaluation
strategies of an operator's plain ``_apply`` (the same values, bit for bit); the engine
(``linop/linearize``) never tests an operator's type, so

* a user's subclass of :class:`Diagonal` that overrides ``_apply`` gets exactly its own path
  (no inherited fast path bypasses the override: a sweep through it is the sweep through the
  plain operator of the same map);
* a user's operator that implements the protocol gets the fused paths (into the chunk's slot,
  in place), and its sweeps equal the plain operator's bit for bit;
* no engine module imports an operator class to branch on it (checked on the source).
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import linop.operators as ops_pkg
from linop.linearize import linearise, tangents
from linop.operators.base import Operator
from linop.operators.elementwise import Diagonal

from kit_nets import residual_net  # test kit

pytestmark = pytest.mark.usefixtures("one_thread")


class Twice(Diagonal):
    """A user's diagonal whose own ``_apply`` is ``2 d ⊙ x`` (``d`` kept as ``diag``): an inherited
    ``x ⊙ d`` fast path would give half of every entry."""

    calls = 0

    def _apply(self, x):
        type(self).calls += 1
        return x * (2 * self._param("diag", x))

    _apply_adjoint = _apply


class Scale(Operator):
    """A user's operator ``y = c x`` that implements the protocol (into ``out``, in place) and
    counts which strategy ran."""

    def __init__(self, c: float, shape):
        super().__init__(shape, shape)
        self.c = float(c)
        self.count = {"apply": 0, "into": 0, "inplace": 0}

    def _apply(self, x):
        self.count["apply"] += 1
        return x * self.c

    _apply_adjoint = _apply

    def _coo(self):
        i = np.arange(self.shape[0])
        return i, i, np.full(i.size, self.c)

    def apply_into(self, x, out):
        if out.shape != x.shape or out.stride() != x.stride():
            return False
        self.count["into"] += 1
        torch.mul(x, self.c, out=out)
        return True

    def apply_(self, x):
        self.count["inplace"] += 1
        x.mul_(self.c)
        return True


def _slopes(lin):
    return [n.name for n in lin.net.nodes if n.inputs and isinstance(lin.node_operator(n.name), Diagonal)]


def _sweeps(lin):
    """Densified rows of a plain and of a transient sweep (ĉ for the transient one: its
    Jacobians are contracted as they come)."""
    rows = {LJ.name: (LJ.image(), LJ.bias()) for LJ in lin.sweep()}
    dots = {LJ.name: LJ.dot(lin.x, lin.x_b) for LJ in lin.sweep(transient=True)}
    return rows, dots


def _assert_same(a, b):
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for k in a[0]:
        assert torch.equal(a[0][k][0], b[0][k][0]) and torch.equal(a[0][k][1], b[0][k][1]), k
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


@pytest.fixture(scope="module")
def res():
    return residual_net(5, 4)


def _budgets(net, x):
    """No budget (one chunk per node) and one that chunks the steps (writes into the slots)."""
    full = linearise(net, x, memory_budget="8GiB").plan()["peak_bytes"]
    return [None, int(full * 0.3)]


def test_diagonal_subclass_overriding_apply_gets_its_own_path(res):
    """Every slope replaced by ``Twice(d)`` sweeps exactly as by the plain ``Diagonal(2d)``
    (bit for bit: ``2d`` is exact, the products the same), chunked or not, plain or transient;
    the protocol declines for it (False, nothing written) and its ``_apply`` runs."""
    net, x = res
    for budget in _budgets(net, x):
        kw = {} if budget is None else {"memory_budget": budget}
        mine, ref = linearise(net, x, **kw), linearise(net, x, **kw)
        names = _slopes(mine)
        assert len(names) >= 2
        for k in names:
            d = mine.node_operator(k).diag
            mine._local[k], ref._local[k] = Twice(d), Diagonal(2 * d)
        Twice.calls = 0
        _assert_same(_sweeps(mine), _sweeps(ref))
        assert Twice.calls >= 2 * len(names)
    op = Twice(torch.rand(2, 3, 4, dtype=torch.float64) + 0.5)
    xb = torch.rand(5, 2, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = torch.full_like(xb, float("nan"))
    assert op.apply_into(xb, out) is False and bool(out.isnan().all())
    keep = xb.clone()
    assert op.apply_(xb) is False and torch.equal(xb, keep)
    assert tangents.step_in_place(op, tangents.State(xb, (1, 1), xb[:0], torch.zeros(0, dtype=torch.long))) is None
    assert torch.equal(tangents.apply_parts(op, [xb], out=out), 2 * op.diag * xb)


def test_user_operator_implementing_the_protocol_gets_the_fused_paths(res):
    """Every slope replaced by ``Scale(c)``: the sweep writes its chunks into the slots
    (``apply_into``) and the transient sweep multiplies in place (``apply_``); both equal the
    sweeps through ``Diagonal(c·1)`` bit for bit (the same products ``x·c``)."""
    net, x = res
    c = 0.375  # a few bits: c·1 == c exactly
    inplace = 0
    for budget in _budgets(net, x):
        kw = {} if budget is None else {"memory_budget": budget}
        mine, ref = linearise(net, x, **kw), linearise(net, x, **kw)
        for k in _slopes(mine):
            shape = mine.node_operator(k).in_shape
            mine._local[k] = Scale(c, shape)
            ref._local[k] = Diagonal(torch.full(shape, c, dtype=torch.float64))
        _assert_same(_sweeps(mine), _sweeps(ref))
        inplace += sum(mine._local[k].count["inplace"] for k in _slopes(ref))
    assert inplace > 0, "no user operator ran in place"
    # a chunked step writes every chunk into its slot of the new state through apply_into
    shape, g = (4, 5, 6), torch.Generator().manual_seed(9)
    cl = torch.channels_last
    s = tangents.State(torch.randn((10,) + shape, generator=g, dtype=torch.float64).contiguous(memory_format=cl),
                       (1, 1), torch.randn((7,) + shape, generator=g, dtype=torch.float64).contiguous(memory_format=cl),
                       torch.arange(7))
    mine, ref = Scale(c, shape), Diagonal(torch.full(shape, c, dtype=torch.float64))
    args = (1, False, [s], (1, 1), 7, shape, 10, [None])
    a, b = tangents.step(mine, *args, chunk=3), tangents.step(ref, *args, chunk=3)
    assert mine.count == {"apply": 0, "into": 4 + 3, "inplace": 0}  # ⌈10/3⌉ + ⌈7/3⌉ chunks
    assert torch.equal(a.Ti, b.Ti) and torch.equal(a.Tb, b.Tb) and torch.equal(a.Ti, s.Ti * c)


def test_diagonal_fast_paths_equal_its_apply():
    """``Diagonal.apply_into`` / ``apply_`` / ``_apply`` in either layout (float32 and float64):
    the products of the contiguous ``x * d``, bit for bit; a layout-mismatched ``out`` is declined
    (the caller copies) and ``apply_parts`` then returns the plain result."""
    g = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.float64):
        d = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
        op = Diagonal(d)
        x = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64).to(dtype)
        ref = x * d.to(dtype)
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(op._apply(xx), ref)
            out = torch.full_like(xx, float("nan"))  # the same layout as xx
            assert op.apply_into(xx, out) and torch.equal(out, ref)
            other = torch.full_like(x, float("nan"), memory_format=torch.channels_last) if xx.is_contiguous() \
                else torch.full_like(x, float("nan"))
            if other.stride() != xx.stride():
                assert not op.apply_into(xx, other)
                assert torch.equal(op.apply_parts([xx], out=other), ref)
            y = xx.clone(memory_format=torch.preserve_format)
            assert op.apply_(y) and torch.equal(y, ref)
        flat = Diagonal(d.reshape(-1))
        y = x.reshape(6, -1).clone()
        assert flat.apply_(y) and torch.equal(y, ref.reshape(6, -1))
        shared = x[:1].expand(6, 3, 4, 5)  # every row one storage: no in-place form
        assert not op.apply_(shared) and torch.equal(shared[0], x[0])


def test_plain_operator_apply_parts_checks_its_inputs():
    op = Diagonal(torch.ones(4, dtype=torch.float64))
    x = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="len\\(xs\\)=2"):
        op.apply_parts([x, x])
    with pytest.raises(ValueError, match="xs\\[0\\] is None"):
        op.apply_parts([None])


def test_block_row_with_the_old_apply_parts_signature_still_runs_chunked():
    """A user block row written before ``out=`` (``apply_parts(self, xs)``) is wrapped at class
    creation: a chunked step passes ``out``, the row's own result comes back and is copied, the
    same values as its plain call (bit for bit: nothing but a copy differs)."""
    from linop.operators.composite import HStack
    from linop.operators.structural import Identity

    class OldSum(HStack):
        def apply_parts(self, xs):  # the pre-``out`` signature
            return xs[0] * 1.0 + xs[1] * 2.0

    op = OldSum([Identity((3, 4, 4)), Identity((3, 4, 4))])
    assert "out" in inspect.signature(type(op).apply_parts).parameters
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    out = torch.empty(5, 3, 4, 4, dtype=torch.float64)
    res = tangents.chunked(lambda r0, r1, dst: tangents.apply_parts(op, [x[r0:r1] for x in xs], out=dst),
                           5, 2, (3, 4, 4), xs[0])
    assert torch.equal(res, xs[0] + 2.0 * xs[1])
    assert op.apply_parts(xs, out=out) is not out  # the old row never writes out: the caller copies


# --------------------------------------------------------------------------- the engine's source

ENGINE = Path(inspect.getfile(tangents)).parent
#: operator classes an engine module may name, and why: it builds one (not a type test)
ALLOWED = {"Operator", "GraphOperator"}
#: no known exceptions: the memory plan asks the operator too (Operator.sweep_workspace)
KNOWN: set = set()


def _operator_classes() -> set[str]:
    names = set()
    for mod in (ops_pkg,) + tuple(getattr(ops_pkg, m) for m in dir(ops_pkg) if inspect.ismodule(getattr(ops_pkg, m))):
        for k, v in vars(mod).items():
            if inspect.isclass(v) and issubclass(v, Operator):
                names.add(k)
    return names


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def _op_type_uses(src: str, classes: set[str], imports: bool = True) -> set[str]:
    """Operator classes that ``src`` imports from linop's operators, tests with ``isinstance`` /
    ``issubclass``, or compares a ``type(...)`` with."""
    found = set()
    for node in ast.walk(ast.parse(src)):
        if imports and isinstance(node, ast.ImportFrom) and "operators" in (node.module or ""):
            found |= {a.name for a in node.names if a.name in classes}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
            found |= _names(node.args[1]) & classes
        elif isinstance(node, ast.Compare) and any(isinstance(o, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq))
                                                   for o in node.ops):
            parts = [node.left] + list(node.comparators)
            if any(isinstance(p, ast.Call) and isinstance(p.func, ast.Name) and p.func.id == "type" for p in parts):
                found |= set().union(*(_names(p) for p in parts)) & classes
    return found - ALLOWED


def test_engine_does_not_branch_on_operator_types():
    """No ``linop/linearize`` module (nor the linear node's reverse step) imports an operator class to test an operator's type
    (``isinstance`` / ``issubclass`` / ``type(op) is ...``); the detector itself flags such code."""
    classes = _operator_classes()
    assert {"HStack", "Diagonal", "Identity", "Conv2d", "ReLUMask"} <= classes
    bad = ("from ..operators.elementwise import Diagonal\nfrom ..operators.composite import HStack\n"
           "def f(op):\n    return isinstance(op, (HStack, int)) or type(op) is Diagonal\n")
    assert _op_type_uses(bad, classes) == {"Diagonal", "HStack"}
    # the sweep engine, and the reverse walk's step of a linear node (closed-form pinv pattern,
    # §3.4(b) window copy: declared by the operator, Operator.pinv_by_pattern / average_windows)
    # (the node builds operators, so only its type tests count there, not its imports)
    files = sorted(ENGINE.glob("*.py"))
    assert {"tangents.py", "sweep.py", "layer_jacobian.py"} <= {f.name for f in files}
    node = ENGINE.parent / "network" / "linear.py"
    hits = {(f.name, c) for f in files for c in _op_type_uses(f.read_text(), classes)}
    hits |= {(node.name, c) for c in _op_type_uses(node.read_text(), classes, imports=False)}
    assert _op_type_uses("def f(op):\n    return isinstance(op, AvgPool2d)\n", classes, imports=False) == {"AvgPool2d"}
    assert hits <= KNOWN, sorted(hits - KNOWN)


def test_reverse_step_uses_what_the_operator_declares():
    """The reverse step of a linear node takes the closed-form pseudo-inverse for an operator that
    declares ``pinv_by_pattern`` (checked against its actual pattern) and never for one that does
    not, whatever its class; average pooling declares its copy-back windows only in floor mode."""
    from linop.network.linear import LinearNode
    from linop.operators.pool import AvgPool2d
    from linop.operators.structural import Identity

    class Declared(Scale):
        pinv_by_pattern = True

        def _coo(self):
            n = int(np.prod(self.in_shape))
            i = np.arange(n)
            return i, i, np.full(n, self.c)

    node = LinearNode.__new__(LinearNode)
    for op, want in ((Declared(2.0, (2, 3, 3)), True), (Scale(2.0, (2, 3, 3)), False), (Identity((4,)), True)):
        node.op, node._pattern = op, None
        assert (node.structural_pattern is not None) is want, type(op).__name__
    assert AvgPool2d((1, 4, 4), 2).average_windows() == ((2, 2), (2, 2), (0, 0))
    assert AvgPool2d((1, 5, 5), 2, ceil_mode=True).average_windows() is None
    assert Identity((4,)).average_windows() is None


def test_memory_plan_asks_the_operator_for_its_workspace():
    """``schedule.conv_workspace`` is the operator's own ``sweep_workspace`` (a user's operator
    declares its temporaries; the default is 0), never a test of the operator's class."""
    from linop.linearize import schedule
    from linop.operators.conv import Conv2d

    class Scratchy(Scale):
        def sweep_workspace(self, itemsize, channels_last):
            return 7 * itemsize + int(channels_last)

    assert schedule.conv_workspace(Scratchy(1.0, (2, 3, 3)), 8) == 57
    assert schedule.conv_workspace(Scale(1.0, (2, 3, 3)), 8) == 0
    assert schedule.conv_workspace(None, 8) == 0
    conv = Conv2d(torch.randn(8, 4, 3, 3, dtype=torch.float64), (4, 16, 16), padding=1)
    assert schedule.conv_workspace(conv, 8) == conv.sweep_workspace(8, bool(tangents.CHANNELS_LAST)) > 0
