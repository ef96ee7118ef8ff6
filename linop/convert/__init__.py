"""Conversion of a torch module into an equivalent network (torch.fx)."""
from .converter import ConversionError, check_conversion, from_torch

__all__ = ["from_torch", "check_conversion", "ConversionError"]
