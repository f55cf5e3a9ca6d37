"""dfquant: data-free low-bit quantization of PyTorch models, with measured costs.

The public surface: grids (number formats), quantizer rules and their registry, the quantized tensor type, and
the error model. Whole-model quantization lives in :mod:`dfquant.api`.
"""

from .api import quantize_model
from .config import LayerRule, PatternRule, QuantConfig
from .errors import ConfigError, DfquantError, FileFormatError, InputError, ModelError
from .graph import QuantizationReport
from .grids import Grid, make_grid
from .io import load_quantized, read_manifest, save_quantized
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
    "LayerRule",
    "ModelError",
    "PatternRule",
    "QTensor",
    "QuantConfig",
    "QuantizationReport",
    "Quantizer",
    "__version__",
    "available",
    "get_quantizer",
    "load_quantized",
    "make_grid",
    "pack",
    "quantize_model",
    "read_manifest",
    "register",
    "save_quantized",
    "unpack",
]
