"""dfquant: data-free low-bit quantization of PyTorch models, with measured costs.

The public surface: grids (number formats), quantizer rules and their registry, the quantized tensor type, and
the error model. Whole-model quantization lives in :mod:`dfquant.pipeline.quantize`.
"""

from dfquant._version import __version__
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError, DfquantError, FileFormatError, InputError, ModelError
from dfquant.grids.formats import Grid, make_grid
from dfquant.io.hf import arrange_registration, save_hf
from dfquant.io.load import load_quantized
from dfquant.io.manifest import read_manifest
from dfquant.io.save import save_quantized
from dfquant.pipeline.quantize import quantize_model
from dfquant.pipeline.report import QuantizationReport
from dfquant.quantizers import Granularity, QTensor, Quantizer, available, get_quantizer, register
from dfquant.quantizers.packing import pack, unpack

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
    "save_hf",
    "save_quantized",
    "unpack",
]

arrange_registration()  # from_pretrained of dfquant folders (see dfquant.io.hf_quantizer)
