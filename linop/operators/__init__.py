"""Explicit linear operators for CNN layers (one family per module).

Every operator exists in three agreeing forms: batched torch ``apply``/``apply_adjoint``,
``scipy.sparse.linalg.LinearOperator`` matvec/rmatvec (numpy or cupy in, same out), and
the explicit CSR matrix ``to_sparse()``.  ``dottest`` checks the adjoint identity.
"""
from .base import AdjointOperator, Operator, dottest
from .adapt import LinearOperatorAdapter, MatrixOperator, as_operator
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
from .composite import BlockRow, Chain, Concat, GraphOperator, HStack, Sum, VStack
from .pool import AvgPool2d, GlobalAvgPool2d, MaxPool2d
from .structural import BiasRestriction, ChannelPad, Flatten, Identity, Scale, Slice, Subsample
from .conv_transpose import ConvTranspose2d
from .layers1d import AvgPool1d, Conv1d, Lift1d, MaxPool1d, UnitAxis
from .padding import Pad2d
from .permutation import ChannelPermutation, ChannelShuffle
from .polyphase import Polyphase
from .resample import AdaptiveAvgPool2d, AdaptiveWindows, Upsample2d
from .separable import AxisTaps, SeparableOperator

__all__ = [
    "AdaptiveAvgPool2d",
    "AdaptiveWindows",
    "Upsample2d",
    "ConvTranspose2d",
    "Pad2d",
    "Conv1d",
    "AvgPool1d",
    "MaxPool1d",
    "Lift1d",
    "ChannelPermutation",
    "ChannelShuffle",
    "Polyphase",
    "SeparableOperator",
    "AxisTaps",
    "Operator",
    "AdjointOperator",
    "dottest",
    "as_operator",
    "MatrixOperator",
    "LinearOperatorAdapter",
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
    "Slice",
    "Chain",
    "BlockRow",
    "HStack",
    "Concat",
    "GraphOperator",
    "UnitAxis",
]
