"""Quantizer rules and their registry. Importing this package registers every built-in rule."""

from . import uniform  # noqa: F401  (registers minmax, mse)
from .base import Granularity, QParams, QTensor, Quantizer
from .registry import available, get_quantizer, quantizer_class, register

__all__ = [
    "Granularity",
    "QParams",
    "QTensor",
    "Quantizer",
    "available",
    "get_quantizer",
    "quantizer_class",
    "register",
]
