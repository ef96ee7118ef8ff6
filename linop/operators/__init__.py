"""Explicit linear operators for CNN layers (one family per module)."""
from .base import AdjointOperator, Operator, dottest

__all__ = ["Operator", "AdjointOperator", "dottest"]
