"""Explicit linear operators for CNN layers (one family per module).

Every operator exists in three agreeing forms: batched torch ``apply``/``apply_adjoint``,
``scipy.sparse.linalg.LinearOperator`` matvec/rmatvec (numpy or cupy in, same out), and
the explicit CSR matrix ``to_sparse()``.  ``dottest`` checks the adjoint identity.
"""
from .base import AdjointOperator, Operator, dottest
from .conv import Conv2d
from .dense import Linear
from .elementwise import (
    Diagonal,
    LeakyReLUMask,
    PiecewiseLinearMask,
    PReLUMask,
    ReLUMask,
    SigmoidDerivative,
    TanhDerivative,
)
from .pool import AvgPool2d, GlobalAvgPool2d, MaxPool2d
from .structural import BiasRestriction, Chain, ChannelPad, Flatten, Identity, Scale, Subsample, Sum, VStack

__all__ = [
    "Operator",
    "AdjointOperator",
    "dottest",
    "Conv2d",
    "Linear",
    "AvgPool2d",
    "GlobalAvgPool2d",
    "MaxPool2d",
    "Diagonal",
    "ReLUMask",
    "LeakyReLUMask",
    "PReLUMask",
    "PiecewiseLinearMask",
    "TanhDerivative",
    "SigmoidDerivative",
    "BiasRestriction",
    "ChannelPad",
    "Subsample",
    "VStack",
    "Sum",
    "Flatten",
    "Scale",
    "Identity",
    "Chain",
]
