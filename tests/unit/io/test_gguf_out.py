"""GGUF out, tensor by tensor: every exact type's blocks decode (by the ``gguf`` package's own dequantizer) to
dfquant's decoded weight bit for bit, and every other setting is refused naming the closest exact type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_module
from dfquant.io.gguf_out import GGUF_TYPES, exact_gguf_type, pack_blocks
from dfquant.nn.terms import QuantTerm
from dfquant.quantizers import get_quantizer
from dfquant.quantizers.packing import unpack

gguf = require_module("gguf")
from gguf.quants import dequantize  # noqa: E402

SETTINGS = {
    "Q4_0": ("mse", 4, {"grid": "int"}),
    "Q4_1": ("minmax", 4, {"grid": "uint"}),
    "Q5_0": ("minmax", 5, {"grid": "int"}),
    "Q5_1": ("minmax", 5, {"grid": "uint"}),
    "Q8_0": ("minmax", 8, {"grid": "int"}),
    "IQ4_NL": ("statq", 4, {"format": "iq4_nl"}),
}


def _term(rule: str, bits: int, opts: dict, gran: str = "group:32", sdtype: str = "float16") -> QuantTerm:
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(bits))
    w[3] = 0.0  # an all-zero row
    return QuantTerm.from_qtensor(get_quantizer(rule, bits, **opts).quantize(w, gran, scale_dtype=sdtype))


@pytest.mark.parametrize("kind", list(GGUF_TYPES))
def test_each_exact_type_decodes_bit_identical(kind: str) -> None:
    rule, bits, opts = SETTINGS[kind]
    term = _term(rule, bits, opts)
    assert exact_gguf_type(term) == (kind, "")
    codes = unpack(term.packed, term.bits, term.numel).view(24, 96).numpy()
    m = None if term.offset is None else term.offset.numpy()
    blocks = pack_blocks(kind, codes, term.scale.numpy(), m)
    qtype = gguf.GGMLQuantizationType[kind]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == np.uint8 and blocks.shape == (24, 96 // block_size * type_size)
    got = np.asarray(dequantize(blocks, qtype), dtype=np.float32).reshape(24, 96)
    assert np.array_equal(got, term.dequantize().numpy())


@pytest.mark.parametrize(
    ("rule", "bits", "opts", "gran", "sdtype", "why"),
    [
        ("minmax", 4, {"grid": "uint"}, "group:64", "float16", "granularity group:64"),
        ("minmax", 4, {"grid": "uint"}, "group:32", "float32", "float32 scales"),
        ("minmax", 4, {}, "group:32", "float16", "4-bit levels (-7.5"),  # mid-rise levels: no GGUF type
        ("lloyd-max", 4, {}, "group:32", "float16", ""),  # fitted tables: refused either way
        ("minmax", 3, {"grid": "uint"}, "group:32", "float16", "3-bit levels"),
    ],
)
def test_other_settings_have_no_exact_type(rule: str, bits: int, opts: dict, gran: str, sdtype: str, why: str) -> None:
    kind, reason = exact_gguf_type(_term(rule, bits, opts, gran, sdtype))
    assert kind is None and why in reason
