"""The CPU int4 path (``matmul="int4"``): torch's int4 kernel on uniform 4-bit terms gives the decode path's
outputs within bfloat16 rounding of its inputs and scales, and every other term stays on the decode path with the
reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.nn import kernel
from dfquant.nn.base import QuantModule, set_matmul
from dfquant.nn.terms import QuantTerm
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers import get_quantizer

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="this torch has no int4 CPU kernel"
)


@pytest.mark.parametrize(("grid", "sdtype", "gran"), [("uint", "float16", "group:32"), ("int", "float32", "group:128")])
def test_int4_path_matches_decode_within_bfloat16(grid: str, sdtype: str, gran: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    cfg = QuantConfig(
        LayerRule("minmax", 4, gran, options={"grid": grid}, scale_dtype=sdtype),
        rules=(PatternRule("2", granularity="group:32"),),
    )
    q, _ = quantize_model(model, cfg)
    x = torch.randn(5, 256)
    with torch.no_grad():
        set_matmul(q, "decode")
        ref = q(x)
        set_matmul(q, "int4")
        assert all(m.matmul_path("cpu") == ("int4", "") for m in q.modules() if isinstance(m, QuantModule))
        y = q(x)
    # bfloat16 keeps 8 bits of mantissa: inputs and scales rounded to it, sums in float32
    assert float((y - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    assert not torch.equal(y, ref)  # a different computation, not the decode path in disguise


def test_int4_path_refusals() -> None:
    w = torch.randn(16, 64)

    def reason(rule: str, gran: str, **opts: object) -> str | None:
        return kernel.int4_cpu_reason(QuantTerm.from_qtensor(get_quantizer(rule, 4, **opts).quantize(w, gran)))

    assert reason("minmax", "group:32", grid="uint") is None
    assert "levels other than" in str(reason("minmax", "group:32"))  # mid-rise levels
    assert "levels other than" in str(reason("nf4", "group:32"))
    assert "per-group tables" in str(reason("lloyd-max", "group:32"))
    assert "groups of 16" in str(reason("minmax", "group:16", grid="uint"))
    q, _ = quantize_model(nn.Sequential(nn.Linear(64, 8)), QuantConfig(LayerRule("nf4", 4, "group:32")))
    set_matmul(q, "int4")
    with pytest.raises(ConfigError, match="matmul='int4', but levels other than"):
        q(torch.randn(1, 64))
