"""Built-in converter rules, one family per module; importing this package registers them.

``linear`` conv / conv-transpose / linear unit layers and BatchNorm · ``activation`` ReLU
family, tanh, sigmoid · ``breakpoint`` ReLU6, Hardtanh, Hardsigmoid, clamp, maximum /
minimum (each breakpoint a bias of ``x_b``) · ``pooling`` average / max / adaptive pools and spatial means ·
``resample`` uneven adaptive pooling, upsampling · ``arith`` sums, differences, constant
factors · ``shape`` reshapes, concatenation, padding, slicing, channel shuffle and the values
that pass through (identity, eval-mode dropout, ``x.shape``) · ``refusals`` the ops that are
not piecewise linear (refused with the reason).
"""
from . import activation, arith, breakpoint, linear, pooling, refusals, resample, shape  # noqa: F401  (registration)
