"""Built-in converter rules, one family per module; importing this package registers them.

``linear`` conv / linear unit layers and BatchNorm · ``activation`` ReLU family, tanh,
sigmoid · ``pooling`` average / max / adaptive pools and spatial means · ``arith`` sums,
differences, constant factors · ``shape`` reshapes, concatenation, padding, slicing and the
values that pass through (identity, eval-mode dropout, ``x.shape``).
"""
from . import activation, arith, linear, pooling, shape  # noqa: F401  (registration)
