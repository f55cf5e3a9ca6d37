"""The quantizer contract written once in base.py, exercised through the uniform rules."""

from __future__ import annotations

import math

import pytest
import torch

from dfquant.errors import ConfigError, InputError
from dfquant.quantizers import Granularity, available, get_quantizer
from dfquant.quantizers.qtensor import from_rows, to_rows


@pytest.mark.parametrize(
    ("text", "kind", "axis", "group"),
    [
        ("tensor", "tensor", 0, None),
        ("channel", "channel", 0, None),
        ("channel:1", "channel", 1, None),
        ("group:64", "group", 0, 64),
        ("group:32:1", "group", 1, 32),
    ],
)
def test_granularity_parse(text: str, kind: str, axis: int, group: int | None) -> None:
    g = Granularity.parse(text)
    assert (g.kind, g.axis, g.group_size) == (kind, axis, group)
    assert Granularity.parse(str(g)) == g


@pytest.mark.parametrize("bad", ["group", "group:0", "chan", "group:x", "tensor:3"])
def test_granularity_parse_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        Granularity.parse(bad)


@pytest.mark.parametrize("gran", ["tensor", "channel", "channel:1", "group:5", "group:4:2"])
def test_rows_round_trip(gran: str) -> None:
    x = torch.randn(3, 4, 5)
    g = Granularity.parse(gran)
    assert torch.equal(from_rows(to_rows(x, g), tuple(x.shape), g), x)


def test_ragged_last_group_is_fitted_on_its_own_elements() -> None:
    x = torch.randn(5, 67)
    x[:, 64:] *= 100.0  # the 3-element tail has a much larger range than the full groups
    q = get_quantizer("minmax", 4)
    qt = q.quantize(x, "group:16")
    assert qt.scale.shape == (5, 5)
    tail_scale = x[:, 64:].abs().amax(dim=1) / 7.5
    assert torch.allclose(qt.scale[:, 4], tail_scale)
    full_scale = x[:, :16].abs().amax(dim=1) / 7.5
    assert torch.allclose(qt.scale[:, 0], full_scale)
    # min-max never clips: every element is within half a step of its level
    err = (qt.dequantize() - x).abs()
    half_step = torch.repeat_interleave(qt.scale, 16, dim=1)[:, :67] / 2
    assert bool((err <= half_step * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("name", ["minmax", "mse"])
def test_constant_and_zero_groups_are_exact(name: str) -> None:
    x = torch.randn(4, 32)
    x[1] = 0.0
    x[2] = 0.3125
    x[3, :16] = -2.5
    q = get_quantizer(name, 3)
    for gran in ("channel", "group:16"):
        y = q.fake_quantize(x, gran)
        assert torch.equal(y[1], x[1])
        assert torch.equal(y[2], x[2])
    assert torch.equal(q.fake_quantize(x, "group:16")[3, :16], x[3, :16])


@pytest.mark.parametrize("name", ["minmax", "mse"])
def test_nan_and_inf_name_the_tensor(name: str) -> None:
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    x[1, 1] = float("inf")
    with pytest.raises(InputError, match=r"layer3\.conv1\.weight.*1 NaN and 1 infinite"):
        get_quantizer(name, 4).quantize(x, "channel", name="layer3.conv1.weight")


def test_empty_and_integer_tensors_raise() -> None:
    q = get_quantizer("minmax", 4)
    with pytest.raises(InputError, match="empty"):
        q.quantize(torch.empty(0, 3), name="w")
    with pytest.raises(InputError, match="floating-point"):
        q.quantize(torch.ones(3, 3, dtype=torch.int32), name="w")


def test_single_element_and_scalar() -> None:
    q = get_quantizer("minmax", 2)
    for x in (torch.tensor([0.7]), torch.tensor(-1.25)):
        assert torch.equal(q.fake_quantize(x, "channel"), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    x32 = torch.randn(16, 64)
    x = x32.to(dtype)
    q = get_quantizer("mse", 4)
    y = q.fake_quantize(x, "channel")
    ref = q.fake_quantize(x.to(torch.float32), "channel").to(dtype)
    assert y.dtype == dtype and torch.equal(y, ref)


@pytest.mark.parametrize("bits", [0, 9, 2.0, True])
def test_bits_out_of_range(bits: object) -> None:
    for name in available():
        with pytest.raises(ConfigError, match=name):
            get_quantizer(name, bits)  # type: ignore[arg-type]


def test_unknown_option_and_quantizer() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        get_quantizer("minmax", 4, colour="red")
    with pytest.raises(ConfigError, match="unknown quantizer 'nope'"):
        get_quantizer("nope", 4)


def test_bits_per_weight_accounting() -> None:
    x = torch.randn(64, 128)
    qt = get_quantizer("minmax", 4).quantize(x, "group:64")
    # 4-bit codes + one float32 scale per 64 weights; symmetric: no offsets stored
    assert qt.bits_per_weight() == pytest.approx(4 + 32 / 64)
    qa = get_quantizer("minmax", 4, grid="uint").quantize(x, "channel")
    assert qa.bits_per_weight() == pytest.approx(4 + 64 / 128)


def test_asymmetric_minmax_hits_min_and_max() -> None:
    x = torch.rand(8, 100) * 3 + 1
    y = get_quantizer("minmax", 3, grid="uint").fake_quantize(x, "channel")
    assert torch.allclose(y.amin(dim=1), x.amin(dim=1)) and torch.allclose(y.amax(dim=1), x.amax(dim=1), rtol=1e-6)


def test_mse_beats_minmax_on_gaussian_rows() -> None:
    x = torch.randn(256, 1024)
    for bits in (2, 3, 4):
        e_mm = get_quantizer("minmax", bits).quantize(x, "channel").rel_mse(x)
        e_mse = get_quantizer("mse", bits).quantize(x, "channel").rel_mse(x)
        assert e_mse < e_mm
        assert math.isfinite(e_mse)


# -- scale storage dtype -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["minmax", "mse", "lloyd-max", "lloyd-empirical", "nf4"])
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16])
def test_scales_are_rounded_before_encoding(name: str, sdtype: torch.dtype) -> None:
    """The QTensor holds its scales/offsets in the storage dtype and its codes are the nearest levels for the
    *rounded* scales: re-encoding with the stored values gives the same codes."""
    from dfquant.quantizers.codes import encode_rows

    assert name in available()
    x = torch.randn(16, 96) * 0.02 + 0.003
    bits = 4
    qt = get_quantizer(name, bits).quantize(x, "group:32", scale_dtype=sdtype)
    assert qt.scale.dtype == sdtype and (qt.offset is None or qt.offset.dtype == sdtype)
    off = torch.zeros_like(qt.scale) if qt.offset is None else qt.offset
    rows = to_rows(x, qt.granularity)
    codes = encode_rows(rows, qt.scale.float(), off.float(), qt.levels, 32, qt.table_index)
    assert torch.equal(codes, qt.codes)
    # the float32 rule on the same input differs only by the rounding of its scales
    q32 = get_quantizer(name, bits).quantize(x, "group:32")
    assert torch.equal(q32.scale.to(sdtype), qt.scale)
    assert qt.rel_mse(x) < 1.05 * q32.rel_mse(x) + 1e-6


def test_scale_dtype_bits_and_default() -> None:
    x = torch.randn(64, 128)
    q = get_quantizer("minmax", 4, grid="uint")
    q32 = q.quantize(x, "group:64")
    q16 = q.quantize(x, "group:64", scale_dtype="float16")
    assert q32.scale.dtype == torch.float32
    assert q32.bits_per_weight() == pytest.approx(4 + 64 / 64)  # float32 scale and offset per 64 weights
    assert q16.bits_per_weight() == pytest.approx(4 + 32 / 64)  # float16 scale and offset
    assert torch.equal(q.quantize(x, "group:64", scale_dtype=torch.float32).codes, q32.codes)


def test_scale_dtype_refusals() -> None:
    with pytest.raises(ConfigError, match=r"scale dtype must be one of float32, float16, bfloat16"):
        get_quantizer("minmax", 4).quantize(torch.randn(4, 8), scale_dtype="float8")
    with pytest.raises(ConfigError, match=r"tensor 'big'.*overflows float16.*bfloat16"):
        get_quantizer("minmax", 4).quantize(torch.full((2, 8), 1e6), name="big", scale_dtype="float16")
    # bfloat16 has the float32 range
    q = get_quantizer("minmax", 4).quantize(torch.randn(2, 8) * 1e6, scale_dtype="bfloat16")
    assert bool(torch.isfinite(q.scale).all())


def test_tiny_float16_scales_underflow_to_offset() -> None:
    """Below float16's range a group's scale rounds to 0 and the group decodes to its (rounded) offset."""
    x = torch.randn(1, 32) * 1e-9
    q = get_quantizer("minmax", 4).quantize(x, "channel", scale_dtype="float16")
    assert float(q.scale) == 0.0
    assert torch.equal(q.dequantize(), torch.zeros_like(x))
