"""Linearisation of an equivalent network at a point (seed 000 appendix C)."""
from .jacobian import LayerJacobian, Linearisation, check_piecewise_linear, linearise

__all__ = ["linearise", "Linearisation", "LayerJacobian", "check_piecewise_linear"]
