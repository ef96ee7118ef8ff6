"""``PaddedConvSolver`` after its split into :mod:`.solver` + :mod:`.maps` + :mod:`.paths`: same results.

The pins (``tests/data/padded_solver_pins.npz``) were written by the pre-split code (commit 3411dcb,
one thread) for ten layers covering every path: MDP / CCP-direct / square / lifted with forced
refinement / Tikhonov (padding ≥ kernel) / PCG in both cases / dilation + groups / ``fixed_zero``.
The split moves methods between classes and changes no arithmetic, so on the platform that wrote
the pins (same torch, numpy, CPU capability) the results must be *bit-identical*.  Elsewhere the
BLAS / FFT kernels may round differently, so there the values are held to 1e-12 relative (these
layers have cond(W) ≲ 1e3 and the solves' forward error is ~eps·cond) and the path taken (the
flags) exactly.
"""
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from linop.solvers.fft_padded import PaddedConvSolver
from linop.solvers.fft_padded.solver import PaddedConvSolver as FromModule

PINS = Path(__file__).resolve().parent / "data" / "padded_solver_pins.npz"
pytestmark = pytest.mark.usefixtures("one_thread")  # the pins were written with one thread

CASES = ["mdp_same", "ccp_direct", "square", "square_off", "ccp_refine", "tikhonov", "pcg_mdp", "pcg_ccp",
         "dil_grp", "fixed_zero"]


def _cases():
    """The layers of the pins, drawn in the pinned order from one generator."""
    rng = np.random.default_rng(7)
    w = lambda *s: rng.standard_normal(s)
    out = [("mdp_same", w(3, 5, 3, 3), (5, 6, 7), {"padding": "same"}),
           ("ccp_direct", w(6, 2, 3, 3), (2, 5, 6), {"padding": 1}),
           ("square", w(3, 3, 3, 3), (3, 6, 6), {"padding": "same"}),
           ("square_off", w(3, 3, 3, 3), (3, 6, 6), {"padding": "same", "square": False}),
           ("ccp_refine", w(6, 2, 3, 3), (2, 5, 6), {"padding": (0, 1, 2, 1), "refine": True}),
           ("tikhonov", w(2, 4, 3, 3), (4, 5, 5), {"padding": 3}),
           ("pcg_mdp", w(3, 5, 3, 3), (5, 6, 7), {"padding": 1, "method": "pcg"}),
           ("pcg_ccp", w(6, 2, 3, 3), (2, 5, 6), {"padding": 1, "method": "pcg"}),
           ("dil_grp", w(4, 2, 2, 3), (4, 7, 6), {"padding": 2, "dilation": 2, "groups": 2})]
    fz = rng.random((2, 5, 6)) < 0.2
    return out + [("fixed_zero", w(6, 2, 3, 3), (2, 5, 6), {"padding": 1, "fixed_zero": fz})]


def _same_platform(pins) -> bool:
    here = (torch.__version__, np.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability())
    return tuple(str(x) for x in pins["platform"]) == here


def _check(got: np.ndarray, ref: np.ndarray, exact: bool, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    if exact:
        assert np.array_equal(got, ref), f"{what}: not bit-identical to the pre-split code"
    else:  # other kernels: ~eps·cond rounding, cond ≲ 1e3 here
        assert np.linalg.norm(got - ref) <= 1e-12 * np.linalg.norm(ref), what


@pytest.mark.parametrize("case", _cases(), ids=CASES)
def test_split_solver_reproduces_the_pre_split_pins(case):
    name, wt, in_shape, kw = case
    with np.load(PINS, allow_pickle=False) as z:
        pins = {k: z[k] for k in z.files}
    exact = _same_platform(pins)
    ps = PaddedConvSolver(torch.tensor(wt), in_shape, **kw)
    rng = np.random.default_rng(len(name))
    r = torch.tensor(rng.standard_normal((5,) + ps.out_shape))
    a = torch.tensor(rng.standard_normal((3,) + ps.in_shape))
    flags = np.array([ps.single_pass, ps.ccp_direct, ps.method == "pcg", ps._sq is not None, ps.lam > 0, ps.refine])
    np.testing.assert_array_equal(flags, pins[name + "/flags"])  # the same path is taken
    d, info = ps.solve(r, chunk=2)
    _check(d.numpy()[:2], pins[name + "/solve"], exact, name + " solve")
    _check(ps.forward(a).numpy()[:1], pins[name + "/fwd"], exact, name + " forward")
    _check(ps.adjoint_torus(r).numpy()[:1], pins[name + "/adj_torus"], exact, name + " adjoint_torus")
    if ps.single_pass:
        blocks = ps.solve_blocks(iter([r[:2], r[2:3], r[3:]]), chunk=3).numpy()
        _check(blocks[:2], pins[name + "/blocks"], exact, name + " solve_blocks")
    if exact:
        np.testing.assert_array_equal(np.asarray(info["iterations"]), pins[name + "/iters"])
        rep = ps.info()
        rep.pop("factor_seconds")
        assert repr(sorted(rep.items())) == str(pins[name + "/info"])


def test_module_paths_and_mixins():
    """The public import paths still name one class, which carries the split-off methods."""
    from linop.solvers.fft_padded.maps import TorusMaps
    from linop.solvers.fft_padded.paths import SolvePaths
    assert FromModule is PaddedConvSolver and issubclass(PaddedConvSolver, (TorusMaps, SolvePaths))
    for meth in ("select", "place", "embed", "forward_torus", "adjoint_torus", "forward", "adjoint",
                 "tikhonov", "solve_blocks", "solve", "ccp_direct", "single_pass", "info", "from_operator"):
        assert hasattr(PaddedConvSolver, meth), meth
