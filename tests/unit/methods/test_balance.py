"""Row/column balancing: the Sinkhorn column scale on matrices with known imbalance, balanced layers through the
pipeline, a file, a reload and every multiplication path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import FileFormatError, InputError
from dfquant.io.load import load_quantized
from dfquant.io.manifest import METADATA_KEY
from dfquant.io.save import save_quantized
from dfquant.methods.balance import apply_balance, column_scale, imbalance, undo_balance
from dfquant.nn.base import set_matmul
from dfquant.pipeline.quantize import quantize_model


def test_a_rank_one_spread_is_balanced_exactly() -> None:
    """``W = diag(a) Z diag(b)`` with ``Z`` Gaussian: the column scale recovers ``b`` up to a common factor and
    the sampling noise of the column spreads."""
    g = torch.Generator().manual_seed(0)
    a = torch.exp(torch.randn(256, generator=g))
    b = torch.exp(2 * torch.randn(128, generator=g))  # column spreads over about e^+-4
    w = a[:, None] * torch.randn(256, 128, generator=g) * b[None, :]
    c = column_scale(w).float()
    ratio = c / b
    assert float(ratio.std() / ratio.mean()) < 0.1  # c is b times one factor, within 10 %
    assert float(torch.exp(torch.log(c).mean())) == pytest.approx(1.0, rel=0.01)  # geometric mean one
    assert imbalance(apply_balance(w, column_scale(w))) < 0.05 * imbalance(w)
    assert column_scale(w).dtype == torch.float16


def test_balanced_matrices_zero_columns_and_vectors_keep_ones() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    w[:, 5] = 0.0
    c = column_scale(w)
    assert c[5] == 1.0 and torch.isfinite(c).all() and (c > 0).all()
    assert torch.equal(column_scale(torch.randn(1, 16, generator=g)), torch.ones(16, dtype=torch.float16))
    with pytest.raises(InputError, match="NaN or infinite"):
        column_scale(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_apply_and_undo_are_inverse_on_conv_fan_in() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 3, 3, 3, generator=g)
    c = column_scale(w)
    assert c.shape == (27,)
    torch.testing.assert_close(undo_balance(apply_balance(w, c), c), w, rtol=1e-6, atol=0)


def _outlier_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        model[0].weight[:, 3] *= 30.0  # one input channel large in every row
        model[0].weight[:, 40] *= 10.0
    return model.eval()


def test_balance_removes_the_cost_of_an_outlier_column() -> None:
    model = _outlier_model()
    errs, bits = {}, {}
    for bal in (False, True):
        _, report = quantize_model(model, QuantConfig(LayerRule("mse", 3, "group:16", balance=bal)))
        errs[bal] = report.layers[0].rel_mse
        bits[bal] = report.layers[0].bits_per_weight
        assert report.layers[0].balance is bal
    assert errs[True] < 0.2 * errs[False], errs
    # a float16 column scale: 16 bits per fan-in column, over 32 rows
    assert bits[True] - bits[False] == pytest.approx(16 * 64 / (32 * 64))
    assert " bal " in report.to_text()


def test_balanced_file_reloads_bit_identical_on_every_path(tmp_path: Path) -> None:
    model = _outlier_model()
    cfg = QuantConfig(
        LayerRule("minmax", 4, "group:32", options={"grid": "uint"}),
        rules=(PatternRule("0", balance=True, rotate="hadamard:16"), PatternRule("2", balance=True)),
    )
    q, _ = quantize_model(model, cfg)
    path = save_quantized(q, tmp_path / "m.safetensors", source={"kind": "test"})
    back, manifest = load_quantized(path, build=lambda src: _outlier_model())
    assert manifest["format_version"] == 4 and manifest["layers"]["0"]["balance"] is True
    x = torch.randn(5, 64)
    for name in ("0", "2"):
        a, b = q.get_submodule(name), back.get_submodule(name)
        assert torch.equal(a.balance.scale, b.balance.scale) and b.balance.scale.dtype == torch.float16
        assert torch.equal(a.dequantize_weight(), b.dequantize_weight())
        rows = torch.tensor([3, 0, 5])
        assert torch.equal(a.dequantize_weight_rows(rows), a.dequantize_weight()[rows])
    ref = q(x)
    assert torch.equal(back(x), ref)
    # casts keep the stored float16 scale
    assert back.double().get_submodule("0").balance.scale.dtype == torch.float16
    # torch's int4 CPU kernel scales the input: the same outputs up to its bfloat16 inputs
    set_matmul(back, "int4")
    torch.testing.assert_close(back(x.float()).float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))

    # a balance in a version-3 file, a scale of the wrong size, or a negative one is refused by name
    with safe_open(str(path), "pt") as f:
        man = json.loads(f.metadata()[METADATA_KEY])
    tensors = load_file(path)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={METADATA_KEY: json.dumps({**man, "format_version": 3})})
    with pytest.raises(FileFormatError, match="a balance needs format version 4"):
        load_quantized(bad, build=lambda src: _outlier_model())
    neg = dict(tensors)
    neg["0.balance.scale"] = -neg["0.balance.scale"]
    save_file(neg, str(bad), metadata={METADATA_KEY: json.dumps(man)})
    with pytest.raises(FileFormatError, match="balance scale must be finite and positive"):
        load_quantized(bad, build=lambda src: _outlier_model())


def test_importance_weights_follow_the_balanced_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that weights each weight's error by its input channel's variance keeps minimizing the same loss on
    the balanced weight: ``sum a (w - c q)^2 = sum a c^2 (w / c - q)^2``, so the pipeline hands it ``a c^2``."""
    from dfquant.quantizers.uniform import MSEClip

    seen: dict[bool, torch.Tensor] = {}
    original = MSEClip.quantize
    state = {"balance": False}

    def spy(self, x, granularity="channel", name="tensor", **kw):  # type: ignore[no-untyped-def]
        if name == "3" and kw.get("importance") is not None:
            seen[state["balance"]] = kw["importance"].clone()
        return original(self, x, granularity, name, **kw)

    monkeypatch.setattr(MSEClip, "quantize", spy)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.rand(8) * 3 + 0.1)  # uneven input variances for the second conv
        net[1].bias.copy_(torch.randn(8))
        net[3].weight.mul_(torch.exp(torch.randn(1, 8, 1, 1)))  # uneven columns: a scale far from one
    for bal in (False, True):
        state["balance"] = bal
        mode = "stored" if bal else False  # the stored scale: this conv's could also move into the BatchNorm
        rule = LayerRule("mse", 3, "channel", options={"weighting": "input-variance"}, balance=mode)
        q, _ = quantize_model(net, QuantConfig(rule))
    assert set(seen) == {False, True}
    c = q.get_submodule("3").balance.scale.to(torch.float32)
    assert not torch.allclose(c, torch.ones_like(c), atol=0.05)
    expected = (seen[False].reshape(4, -1) * c.square()).reshape(seen[False].shape)
    torch.testing.assert_close(seen[True], expected, rtol=1e-6, atol=0.0)
