"""Linearisation of an equivalent network at a point (seed 000 appendix C).

* :mod:`.linearisation` — :func:`linearise`, :class:`Linearisation` (the local Jacobians at
  the point; ``lin.operator(layer)`` the layer's Jacobian as an Operator, ``lin.sweep`` /
  ``lin.vjp`` its fast evaluations);
* :mod:`.sweep`, :mod:`.tangents` — the compressed-window forward sweep and its per-node step;
* :mod:`.schedule` — its period schedule and memory plan;
* :mod:`.layer_jacobian` — :class:`LayerJacobian`, one layer's rows in compressed form.
"""
from .layer_jacobian import LayerJacobian
from .linearisation import Linearisation, check_piecewise_linear, linearise

__all__ = ["linearise", "Linearisation", "LayerJacobian", "check_piecewise_linear"]
