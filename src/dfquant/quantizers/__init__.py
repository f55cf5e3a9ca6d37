"""Quantizer rules and their registry. Importing this package registers every built-in rule."""

# Registration order is the order in which rules are listed: keep these lines in this order.
# isort: off
from . import uniform  # noqa: F401  (registers minmax, mse)
from . import lloyd  # noqa: F401  (registers lloyd-max, lloyd-empirical)
from . import codebook  # noqa: F401  (registers nf4, apot)
from . import aciq  # noqa: F401  (registers aciq)
from . import statq  # noqa: F401  (registers statq)
from . import optimal  # noqa: F401  (registers lloyd-optimal)
from . import ternary  # noqa: F401  (registers ternary, dorefa)
from . import blockscaled  # noqa: F401  (registers mxfp4, nvfp4)

# isort: on
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
