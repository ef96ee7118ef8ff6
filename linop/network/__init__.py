"""The equivalent network on the extended input ``[x; x_b]`` (seed 000 Fig. 2)."""
from .graph import (
    PIECEWISE_LINEAR,
    ActivationNode,
    AddNode,
    BiasNode,
    CatNode,
    EquivalentNetwork,
    InputNode,
    LinearNode,
    MaxPoolNode,
    Node,
)

__all__ = [
    "Node",
    "InputNode",
    "LinearNode",
    "BiasNode",
    "ActivationNode",
    "MaxPoolNode",
    "AddNode",
    "CatNode",
    "EquivalentNetwork",
    "PIECEWISE_LINEAR",
]
