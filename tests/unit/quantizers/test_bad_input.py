"""Bad input everywhere: every registered quantizer at every granularity, and the whole-model entry point.

Each case gives either an exact, defined result or a clear :class:`~dfquant.errors.DfquantError` naming the
tensor and what is allowed; the caller's tensor is never modified; the report says what was skipped and why.

Defined results checked here:

* a constant group (all-zero included, a single element included) decodes exactly to its value;
* groups are consecutive runs of ``G`` values along each row, the last one shorter when ``G`` does not divide
  the row (or the whole row when the row is shorter than ``G``): the result on each group equals quantizing
  that group alone;
* half-precision input is quantized from its float32 values and the result cast back to the input's dtype.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError, InputError, ModelError
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers import available, get_quantizer, quantizer_class
from shared_models import mlp

QUANTIZERS = available()
GRANULARITIES = ["tensor", "channel", "group:4", "group:16"]


def _bits(name: str) -> int:
    supported = quantizer_class(name).supported_bits
    return 4 if 4 in supported else supported[-1]


def _q(name: str):  # type: ignore[no-untyped-def]
    return get_quantizer(name, _bits(name))


def _block_format(name: str) -> bool:
    """Block-scaled formats (MX, NVFP4): fixed block size, scales restricted to the format's scale dtype."""
    return bool(getattr(quantizer_class(name), "fmt", ""))


def _refused(name: str, gran: str) -> bool:
    """Whether the rule refuses ``gran`` altogether (a block format takes only its own block size); the refusal
    must then be a ConfigError naming the rule and the granularity."""
    try:
        _q(name).quantize(torch.randn(4, 64), gran)
    except ConfigError as e:
        assert name in str(e) and gran in str(e), str(e)
        return True
    return False


#: The (rule, granularity) pairs a rule refuses: block formats take only their own block size.
REFUSED = sorted(
    (name, gran)
    for name in QUANTIZERS
    for gran in [*GRANULARITIES, "group:8"]
    if _block_format(name) and _refused(name, gran)
)


def _pairs(grans: list[str]) -> list:  # type: ignore[type-arg]
    """``(name, gran)`` cases; those the rule refuses are skipped with the reason (their refusal is tested in
    :func:`test_block_formats_refuse_other_granularities`)."""
    out = []
    for name in QUANTIZERS:
        for gran in grans:
            marks = ()
            if (name, gran) in REFUSED:
                reason = f"{name} refuses {gran}: a block format takes only its own block size"
                marks = (pytest.mark.skip(reason=reason),)
            out.append(pytest.param(name, gran, marks=marks))
    return out


@pytest.mark.parametrize(("name", "gran"), REFUSED)
def test_block_formats_refuse_other_granularities(name: str, gran: str) -> None:
    with pytest.raises(ConfigError) as e:
        _q(name).quantize(torch.randn(4, 64), gran)
    assert name in str(e.value) and gran in str(e.value)


def test_only_block_formats_refuse_a_granularity() -> None:
    assert REFUSED and {n for n, _ in REFUSED} <= {n for n in QUANTIZERS if _block_format(n)}
    for name in QUANTIZERS:
        if not _block_format(name):
            assert not any(_refused(name, g) for g in [*GRANULARITIES, "group:8"]), name


def _exact_or_nearest(name: str, out: torch.Tensor, x: torch.Tensor) -> None:
    """Constant groups decode exactly, except with block formats, whose power-of-two (MX) or E4M3 (NVFP4) block
    scales put a constant on the nearest FP4 level: ``|err| <= |x| / 4`` (MX maps amax into [4, 8) of E2M1,
    whose levels there are 4 and 6)."""
    if _block_format(name):
        assert bool(((out - x).abs() <= x.abs() * (1 / 4 + 1e-6)).all()), (out, x)
    else:
        assert torch.equal(out, x), (out, x)


def _fq(name: str, x: torch.Tensor, gran: str) -> torch.Tensor:
    """Fake-quantize, checking that the input is left as it was and the output has its shape and dtype."""
    before = x.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _q(name).fake_quantize(x, gran)
    assert torch.equal(x, before) or (x.isnan() == before.isnan()).all(), "the input was modified"
    assert out.shape == x.shape and out.dtype == x.dtype
    return out


@pytest.mark.parametrize(("name", "gran"), _pairs(GRANULARITIES))
def test_non_finite_weights_are_refused_by_name(name: str, gran: str) -> None:
    for bad, what in ((float("nan"), "1 NaN"), (float("inf"), "1 infinite"), (-float("inf"), "1 infinite")):
        x = torch.randn(4, 20)
        x[2, 7] = bad
        before = x.clone()
        with pytest.raises(InputError) as e:
            _q(name).quantize(x, gran, name="blocks.3.fc.weight")
        msg = str(e.value)
        assert "blocks.3.fc.weight" in msg and "only finite values" in msg
        assert (what in msg) if what != "1 infinite" else ("0 NaN and 1 infinite" in msg)
        assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize(("name", "gran"), _pairs(GRANULARITIES))
def test_constant_and_zero_groups_are_exact(name: str, gran: str) -> None:
    assert torch.equal(_fq(name, torch.zeros(3, 24), gran), torch.zeros(3, 24))
    _exact_or_nearest(name, _fq(name, torch.full((3, 24), -0.37), gran), torch.full((3, 24), -0.37))
    # some constant groups inside an ordinary tensor: those groups are exact (at channel and group granularity)
    x = torch.randn(4, 32)
    x[1] = 0.0
    x[3, :16] = 2.5
    out = _fq(name, x, gran)
    assert torch.isfinite(out).all()
    if gran != "tensor":
        assert torch.equal(out[1], x[1])
    if gran in ("group:4", "group:16"):
        _exact_or_nearest(name, out[3, :16], x[3, :16])


@pytest.mark.parametrize(("name", "gran"), _pairs(GRANULARITIES))
def test_single_elements_are_exact(name: str, gran: str) -> None:
    for x in (torch.tensor([[0.3]]), torch.tensor([-1.7]), torch.tensor(0.25)):
        if x.dim() or not _block_format(name):  # a block format has no per-tensor form for a 0-d tensor
            _exact_or_nearest(name, _fq(name, x, gran), x)
    if gran != "tensor":  # one element per row: every row is its own constant group
        x = torch.tensor([[5.0], [-2.0], [0.0]])
        _exact_or_nearest(name, _fq(name, x, gran), x)


@pytest.mark.parametrize(("name", "gran"), _pairs(GRANULARITIES))
def test_empty_tensors_are_refused(name: str, gran: str) -> None:
    for shape in ((0, 8), (3, 0), (0,)):
        with pytest.raises(InputError, match=rf"tensor 'w' is empty \(shape {re_shape(shape)}\)"):
            _q(name).quantize(torch.zeros(shape), gran, name="w")


def re_shape(shape: tuple[int, ...]) -> str:
    return r"\(" + ", ".join(map(str, shape)) + (r",\)" if len(shape) == 1 else r"\)")


@pytest.mark.parametrize(("name", "gran"), _pairs(["group:4", "group:16"]))
def test_groups_that_do_not_divide_the_row(name: str, gran: str) -> None:
    """Rows of 13 (prime) and 3 (shorter than the group): each group is quantized as if on its own."""
    G = int(gran.split(":")[1])
    g = torch.Generator().manual_seed(11)
    for cols in (13, 3, 37):
        x = torch.randn(5, cols, generator=g)
        out = _fq(name, x, f"group:{G}")
        assert torch.isfinite(out).all()
        shared = {}  # a rule with a per-tensor scale (NVFP4) keeps the whole tensor's for each group alone
        if "tensor_amax" in quantizer_class(name).options_allowed:
            shared = {"tensor_amax": float(x.abs().max())}
        for start in range(0, cols, G):
            part = x[:, start : start + G]
            alone = get_quantizer(name, _bits(name), **shared).fake_quantize(part.contiguous(), "channel")
            assert torch.equal(out[:, start : start + G], alone), (cols, start)
    # an odd 4-D conv weight: the rows are (in, kh, kw) flattened
    w = torch.randn(3, 5, 3, 3, generator=g)
    out = _fq(name, w, f"group:{G}")
    assert torch.isfinite(out).all() and math.prod(out.shape) == 135


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("name", "gran"), _pairs(["channel", "group:4"]))
def test_half_precision_inputs_follow_float32(name: str, gran: str, dtype: torch.dtype) -> None:
    x = (torch.randn(6, 22) * 0.05).to(dtype)
    out = _fq(name, x, gran)
    ref = _fq(name, x.float(), gran).to(dtype)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_bits_outside_the_supported_set(name: str) -> None:
    supported = quantizer_class(name).supported_bits
    for bits in [0, -1, 9, 16, 2.5, True, "4", None, *[b for b in range(1, 9) if b not in supported]]:
        with pytest.raises(ConfigError) as e:
            get_quantizer(name, bits)  # type: ignore[arg-type]
        assert name in str(e.value) or "bits" in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=r"layer '<root>' \(Linear 4x8\)"):
        quantize_model(nn.Linear(8, 4), _bad_bits_config(name))


def _bad_bits_config(name: str) -> QuantConfig:
    """A rule the quantizer cannot take: the first bit-width in 1..8 it does not support, or an unknown option."""
    supported = quantizer_class(name).supported_bits
    missing = [b for b in range(1, 9) if b not in supported]
    if missing:
        return QuantConfig(LayerRule(name, missing[0]))
    return QuantConfig(LayerRule(name, 4, options={"no_such_option": 1}))


@pytest.mark.parametrize(("name", "gran"), _pairs(GRANULARITIES))
def test_non_float_input_is_refused(name: str, gran: str) -> None:
    for x in (torch.arange(12).reshape(3, 4), torch.ones(3, 4, dtype=torch.bool), [[1.0, 2.0]]):
        with pytest.raises(InputError, match=r"must be a floating-point torch\.Tensor"):
            _q(name).quantize(x, gran, name="w")  # type: ignore[arg-type]


# -- whole models ---------------------------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(1)
    return mlp(8, 16, 4)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_whole_model_bad_input(name: str) -> None:
    rule = LayerRule(name, _bits(name), "channel" if _block_format(name) else "group:4")
    # NaN in one layer: the error names the layer, and the caller's model is untouched
    model = _net()
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"tensor '2.weight' has 1 NaN"):
        quantize_model(model, QuantConfig(rule))
    after = model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
    assert type(model[0]) is nn.Linear
    # fp16 and bf16 models quantize and keep their dtype; the float model is not modified
    for dtype in (torch.float16, torch.bfloat16):
        model = _net().to(dtype)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, report = quantize_model(model, QuantConfig(rule))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        out = q(torch.randn(2, 8, dtype=dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert report.quantized_params == 8 * 16 + 16 * 4


def test_empty_layers_are_skipped_with_a_reason() -> None:
    model = mlp(8, 16, 4)
    model.add_module("unused", nn.Linear(0, 3))
    with pytest.warns(UserWarning, match=r"unused \(empty weight \(shape \[3, 0\]\)\)"):
        q, report = quantize_model(model, QuantConfig(LayerRule("minmax", 4)))
    assert [(s.name, s.reason) for s in report.skipped] == [("unused", "empty weight (shape [3, 0])")]
    assert type(q.unused) is nn.Linear and "empty weight" in report.to_text()
    with pytest.raises(ConfigError, match=r"strict mode.*empty weight"):
        quantize_model(model, QuantConfig(LayerRule("minmax", 4), strict=True))


def test_an_already_quantized_model() -> None:
    q, _ = quantize_model(_net(), QuantConfig(LayerRule("minmax", 4)))
    x = torch.randn(3, 8)
    ref = q(x)
    with pytest.raises(ModelError, match=r"already quantized \(2 quantized layer\(s\): 0, 2\)"):
        quantize_model(q, QuantConfig(LayerRule("minmax", 4)))
    assert torch.equal(q(x), ref)
    # partly quantized: the float layers are quantized, the quantized one is kept and the report says so
    with pytest.warns(UserWarning, match="left in float"):
        part, _ = quantize_model(_net(), QuantConfig(LayerRule("minmax", 4), rules=(PatternRule("2", skip=True),)))
    again, report = quantize_model(part, QuantConfig(LayerRule("minmax", 3)))
    assert again[0].terms[0].bits == 4 and again[2].terms[0].bits == 3
    assert [(s.name, s.reason) for s in report.skipped] == [("0", "already quantized (kept as is)")]
    assert "already quantized" in report.to_text()
    assert part[0].terms[0].bits == 4 and type(part[2]) is nn.Linear  # the caller's model is unchanged
