"""Block-scaled FP4 rules: MXFP4 (E8M0 scale per 32) and NVFP4 (E4M3 scale per 16 plus an FP32 tensor scale)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dfquant import get_quantizer
from dfquant.config import LayerRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.io.load import load_quantized
from dfquant.io.manifest import read_manifest
from dfquant.io.save import save_quantized
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers.blockscaled import e8m0_scale, fake_quantize_blocks
from shared_models import mlp

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e8m0_scale_follows_the_mx_definition() -> None:
    amax = torch.tensor([6.0, 1.0, 7.9, 8.0, 0.0, 2.0**-140])
    # 2^(floor(log2 amax) - 2), clamped at 2^-127
    assert e8m0_scale(amax).tolist() == [1.0, 0.25, 1.0, 2.0, 2.0**-127, 2.0**-127]


@pytest.mark.parametrize(
    ("rule", "block", "bpw", "dtype"),
    [("mxfp4", 32, 4.25, torch.float8_e8m0fnu), ("nvfp4", 16, 4.5, torch.float8_e4m3fn)],
)
def test_layout_storage_and_error(rule: str, block: int, bpw: float, dtype: torch.dtype) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    qt = get_quantizer(rule, 4).quantize(w, "channel")
    assert str(qt.granularity) == f"group:{block}" and qt.scale.dtype == dtype and qt.scale.shape == (64, 256 // block)
    assert qt.bits_per_weight() == bpw  # codes + one 8-bit scale per block; the FP4 table is fixed
    # every decoded value is an E2M1 level times its block's scale (times NVFP4's tensor scale)
    unit = qt.levels / qt.levels.abs().max() * 6
    assert sorted({abs(v) for v in unit.tolist()}) == E2M1
    rel = qt.rel_mse(w)
    # Gaussian rows: the per-block maximum scale costs MXFP4 its power-of-two rounding; NVFP4's finer scale
    # and smaller blocks do better
    assert (0.010 < rel < 0.020) if rule == "mxfp4" else (0.005 < rel < 0.011)
    # the run-time block path (inputs) gives the same values: exactly for MXFP4, up to the float rounding of the
    # product of the two NVFP4 scales
    fake = fake_quantize_blocks(w, rule, -1, tensor_scale=_g(qt))
    assert torch.equal(qt.dequantize(), fake) if rule == "mxfp4" else torch.allclose(qt.dequantize(), fake, rtol=1e-6)


def _g(qt: object) -> float:
    levels = qt.levels  # type: ignore[attr-defined]
    return float(levels.abs().max()) / 6.0


def test_mxfp4_scales_are_powers_of_two_and_saturate() -> None:
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 7.9, 0.3, -0.05  # amax 7.9 -> scale 1: 7.9 saturates to 6
    qt = get_quantizer("mxfp4", 4).quantize(w)
    assert float(qt.scale.float()) == 1.0
    assert qt.dequantize()[0, :4].tolist() == [6.0, 0.5, -0.0, 0.0]


def test_bad_granularity_names_the_block() -> None:
    with pytest.raises(ConfigError, match="blocks of 32"):
        get_quantizer("mxfp4", 4).quantize(torch.randn(4, 64), "group:64")
    with pytest.raises(ConfigError, match="blocks of 16"):
        get_quantizer("nvfp4", 4).quantize(torch.randn(4, 64), "tensor")
    with pytest.raises(ConfigError, match="bits"):
        get_quantizer("mxfp4", 8)


@pytest.mark.parametrize("rule", ["mxfp4", "nvfp4"])
def test_quantize_model_save_reload_identical(rule: str, tmp_path: Path) -> None:
    torch.manual_seed(0)

    def build(_: object = None) -> nn.Module:
        return mlp(40, 24, 5)

    net = build()
    q, _ = quantize_model(net, QuantConfig(LayerRule(rule, 4)))
    path = save_quantized(q, tmp_path / "m.safetensors", source={"toy": 1})
    man = read_manifest(path)
    want = "float8_e8m0fnu" if rule == "mxfp4" else "float8_e4m3fn"
    assert man["layers"]["0"]["terms"][0]["scale_dtype"] == want
    loaded, _ = load_quantized(path, build=build)
    x = torch.randn(6, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
        assert float((q(x) - net(x)).abs().max()) < 0.2
