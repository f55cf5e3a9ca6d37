"""Quantized layers: the quantizable modules and the layer base holding a list of terms (:mod:`~dfquant.nn.base`),
the terms (:mod:`~dfquant.nn.terms`), activation quantization (:mod:`~dfquant.nn.act`), the concrete layers,
registered by type (:mod:`~dfquant.nn.layers`), and the outlier residual term (:mod:`~dfquant.nn.rex`).

Importing the package registers every layer type in :data:`~dfquant.nn.base.QUANT_MODULES`.
"""

from dfquant.nn.act import ActQuant
from dfquant.nn.base import QUANT_MODULES, QuantModule, layer_kind, oriented_weight, register_quant_module
from dfquant.nn.layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantHFConv1D, QuantLinear
from dfquant.nn.terms import QuantTerm, term_layout

__all__ = [
    "QUANT_MODULES",
    "ActQuant",
    "QuantConv1d",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantHFConv1D",
    "QuantLinear",
    "QuantModule",
    "QuantTerm",
    "layer_kind",
    "oriented_weight",
    "register_quant_module",
    "term_layout",
]
