"""The equivalent network on the extended input ``[x; x_b]`` (seed 000 Fig. 2).

One module per node kind (:mod:`.node` documents the protocol every kind implements),
:mod:`.geometry` for receptive fields, :mod:`.graph` for the network itself and
:mod:`.reverse` for the reverse-step interface.
"""
from .activation import PIECEWISE_LINEAR, ActivationNode
from .geometry import Window
from .graph import EquivalentNetwork
from .linear import BiasNode, LinearNode
from .merge import AddNode, CatNode
from .node import InputNode, Node
from .pool import MaxPoolNode

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
    "Window",
    "PIECEWISE_LINEAR",
]
