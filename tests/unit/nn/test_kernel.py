"""The fused decode-in-matmul kernel against decode-then-matmul: every bit width, group size, table form, odd
sizes and batch sizes, then the layers that use it.

On a machine without a GPU the kernel runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set
here before the kernel is first defined); with a GPU the same cases run compiled on CUDA. The reference is the
term's own decoded weight times the input in float64, so the only difference is the kernel's float32 sum order.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from conftest import require_package
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.nn import kernel
from dfquant.nn.base import QuantModule, set_matmul
from dfquant.nn.terms import QuantTerm
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers import get_quantizer
from shared_models import mlp

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first defined
DEVICE = torch.device("cuda" if GPU else "cpu")


@pytest.fixture(autouse=True)
def _triton() -> None:
    require_package("triton", "triton")
    if not GPU and not kernel.interpreted():
        pytest.skip("no GPU, and TRITON_INTERPRET was set to another value before this module")


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Within float32 rounding of a sum of ``K`` products: ``1e-5`` of the output's largest magnitude."""
    scale = float(ref.abs().max())
    torch.testing.assert_close(y.double().cpu(), ref.cpu(), rtol=0, atol=1e-5 * scale)


CASES = [
    # rule, bits, granularity: single tables (minmax, mse, nf4), offsets and stacked tables (lloyd-max on mixed
    # rows), per-group codebooks (lloyd-optimal), 8-bit codes (4 per word) and 3-bit codes (10 per word)
    ("minmax", 4, "group:32"),
    ("minmax", 8, "group:128"),
    ("mse", 2, "group:64"),
    ("nf4", 4, "channel"),
    ("lloyd-max", 3, "group:16"),
    ("lloyd-optimal", 2, "group:32"),
    ("statq", 4, "group:64"),
]


@pytest.mark.parametrize(("rule", "bits", "gran"), CASES)
@pytest.mark.parametrize("batch", [1, 5, 17])
def test_kernel_matches_decode_then_matmul(rule: str, bits: int, gran: str, batch: int) -> None:
    g = torch.Generator().manual_seed(bits * 10 + batch)
    w = torch.randn(70, 100, generator=g)  # 100 inputs: a last partial group and a partial word per row
    w[35:] = torch.distributions.Laplace(0.0, 1.0).sample((35, 100))  # rows of another shape: mixed tables
    term = QuantTerm.from_qtensor(get_quantizer(rule, bits).quantize(w, gran))
    kw = kernel.pack_for_kernel(term, DEVICE)
    x = torch.randn(batch, 100, generator=g)
    y = kernel.lut_matmul(x.to(DEVICE), kw)
    assert y.shape == (batch, 70) and y.dtype == torch.float32
    _close(y, x.double() @ term.dequantize().double().T)


def test_kernel_forms_tables_offsets_and_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(16, 64, generator=g), torch.distributions.Laplace(0.0, 1.0).sample((16, 64))])
    term = QuantTerm.from_qtensor(get_quantizer("lloyd-max", 3).quantize(w, "group:16"))
    kw = kernel.pack_for_kernel(term, DEVICE)
    assert kw.table is not None and kw.levels.shape[0] >= 2 and kw.offset is not None  # both tables, offsets
    assert kw.words.dtype == torch.int32 and kw.words.shape == (32, 7)  # 64 codes, 10 per word
    x = torch.randn(2, 3, 64, generator=g)  # leading dimensions are kept
    y = kernel.lut_matmul(x.to(DEVICE), kw)
    assert y.shape == (2, 3, 32)
    _close(y, x.double() @ term.dequantize().double().T)
    yb = kernel.lut_matmul(x.to(DEVICE, torch.bfloat16), kw)  # bfloat16 in, bfloat16 out
    assert yb.dtype == torch.bfloat16
    ref = x.to(torch.bfloat16).double() @ term.dequantize().double().T
    torch.testing.assert_close(yb.double().cpu(), ref, rtol=0, atol=1e-2 * float(ref.abs().max()))
    with pytest.raises(ConfigError, match="input of width 63"):
        kernel.lut_matmul(torch.randn(1, 63, device=DEVICE), kw)


def test_pack_refuses_what_the_kernel_does_not_take() -> None:
    w = torch.randn(8, 32)
    for gran, needle in (("tensor", "granularity tensor"), ("group:8:1", "granularity group:8:1")):
        term = QuantTerm.from_qtensor(get_quantizer("minmax", 4).quantize(w, gran))
        assert needle in str(kernel.unsupported_reason(term))
        with pytest.raises(ConfigError, match="does not take"):
            kernel.pack_for_kernel(term)
    conv = QuantTerm.from_qtensor(get_quantizer("minmax", 4).quantize(torch.randn(4, 2, 3, 3), "channel"))
    assert "4-D weight" in str(kernel.unsupported_reason(conv))


def test_layers_run_through_the_kernel_and_say_so() -> None:
    """A model's linear layers (balanced, balanced and rotated, a residual expansion of two terms) give the decode
    path's outputs through the kernel; a convolution stays on the decode path and says why."""
    torch.manual_seed(0)
    model = nn.Sequential(mlp(48, 64, 32), nn.Linear(32, 10)).eval()
    cfg = QuantConfig(
        LayerRule("minmax", 4, "group:16"),
        rules=(
            PatternRule("0.0", balance=True),
            PatternRule("0.2", rotate="hadamard:16", balance=True),
            PatternRule("1", quantizer="lloyd-max", bits=3, expand=2),
        ),
    )
    q, report = quantize_model(model, cfg)
    assert all(r.matmul.startswith("decode: ") for r in report.layers)  # CPU model: decode, with the reason
    q = q.to(DEVICE)
    x = torch.randn(3, 48, device=DEVICE)
    with torch.no_grad():
        set_matmul(q, "decode")
        ref = q(x).double()
        assert set_matmul(q, "kernel") == 3
        for m in q.modules():
            if isinstance(m, QuantModule):
                assert m.matmul_path(DEVICE) == ("kernel", "")
        _close(q(x), ref)
    conv = quantize_model(nn.Sequential(nn.Conv2d(2, 4, 3)), QuantConfig(LayerRule("minmax", 4)))[0]
    set_matmul(conv, "kernel")
    with pytest.raises(ConfigError, match="the kernel multiplies linear layers, not conv2d"):
        conv(torch.randn(1, 2, 5, 5))
    with pytest.raises(ConfigError, match="matmul must be one of auto, decode, kernel"):
        set_matmul(q, "fast")
