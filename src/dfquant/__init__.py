"""dfquant: data-free low-bit quantization of PyTorch models, with measured costs.

The public surface: grids (number formats), quantizer rules and their registry, the quantized tensor type, and
the error model. Whole-model quantization lives in :mod:`dfquant.api`.
"""

from .errors import ConfigError, DfquantError, FileFormatError, InputError, ModelError
from .grids import Grid, make_grid
from .packing import pack, unpack
from .quantizers import Granularity, QTensor, Quantizer, available, get_quantizer, register

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DfquantError",
    "FileFormatError",
    "Granularity",
    "Grid",
    "InputError",
    "ModelError",
    "QTensor",
    "Quantizer",
    "__version__",
    "available",
    "get_quantizer",
    "make_grid",
    "pack",
    "register",
    "unpack",
]
