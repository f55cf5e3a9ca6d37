"""REx extras: input (activation) expansion, the outlier residual, per-order rules, the tradeoff command."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from conftest import require_module
from dfquant.cli import tradeoff as cli_tradeoff
from dfquant.cli.main import main
from dfquant.config import LayerRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.io.load import load_quantized
from dfquant.io.manifest import read_manifest
from dfquant.io.save import save_quantized
from dfquant.methods.outliers import outlier_bits, split_outliers
from dfquant.methods.rex import expand, relative_error
from dfquant.methods.rex_act import (
    InputSpec,
    bn_input_range,
    expand_input,
    pair_bits_per_mac,
    paired_forward,
    termwise_pairs,
)
from dfquant.nn.base import QuantModule
from dfquant.nn.rex import order_weights
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers.registry import get_quantizer
from dfquant.zoo.registry import LoadedModel


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


# -- input expansion --


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_input_orders_converge_2_pow_a_minus_1(bits: int) -> None:
    """Inside the range, the worst input error after order k is at most D_k / 2 with D_k = D_1 / (2^A - 1)^(k-1),
    so it falls at least 2^(A-1)-fold per order."""
    x = torch.rand(64, 50) * 3.0  # ReLU-like, inside [0, 3]
    spec = InputSpec(bits, 4, "static", 0.0, 3.0)
    xs = expand_input(x, spec)
    errs = [float((x - sum(xs[:k])).abs().max()) for k in range(1, 5)]
    step = 3.0 / (2**bits - 1)
    assert errs[0] <= step / 2 + 1e-6
    for k in range(1, 4):
        assert errs[k] <= step / 2 / (2**bits - 1) ** k * (1 + 1e-4) + 4e-7  # float32 rounding of x <= 3
        assert errs[k - 1] / max(errs[k], 1e-30) >= 2 ** (bits - 1) or errs[k] < 1e-6
    assert float(xs[0][x == 0].abs().max()) == 0.0 if bool((x == 0).any()) else True
    zeros = expand_input(torch.zeros(3, 4), spec)
    assert all(float(z.abs().max()) == 0.0 for z in zeros)  # zero is a level of every order


def test_token_ranges_are_per_token() -> None:
    x = torch.randn(2, 5, 16) * torch.tensor([0.01, 1.0, 100.0, 3.0, 0.5])[None, :, None]
    xs = expand_input(x, InputSpec(4, 1, "token"))
    rel = (x - xs[0]).abs().amax(-1) / x.abs().amax(-1)
    assert float(rel.max()) <= 0.5 / 15 * 2 + 1e-6  # half a step of each token's own range (and its zero point)


def test_bn_range_rule() -> None:
    beta, gamma = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, -2.0, 0.5])
    assert bn_input_range(beta, gamma, "relu", 4.0) == (0.0, pytest.approx(7.0))
    lo, hi = bn_input_range(beta, gamma, "none", 3.0)
    assert lo == pytest.approx(-7.0) and hi == pytest.approx(5.0)  # max(0.5 + 3, -1 + 6, 2 + 1.5)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_paired_forward_equals_term_by_term(K: int) -> None:
    ws = [torch.randn(6, 4, 3, 3) / (10**k) for k in range(K)]
    xs = expand_input(torch.relu(torch.randn(2, 4, 7, 7)), InputSpec(3, K, "sample"))

    def op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, padding=1)

    fast, ref = paired_forward(xs, ws, op), termwise_pairs(xs, ws, op)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    pairs = [(a, b) for a, b in itertools.product(range(1, K + 1), repeat=2) if a + b <= K + 1]
    brute = sum(op(xs[a - 1], ws[b - 1]) for a, b in pairs)
    torch.testing.assert_close(ref, brute, rtol=1e-5, atol=1e-6)


def test_quantized_model_input_expansion_and_round_trip(tmp_path: Path) -> None:
    """Every quantized layer computes sum_{k1 + k2 <= K + 1} op(X_k1, W_k2) + b with the data-free ranges (static
    from the BatchNorms, run time for the first conv and the head), it beats order 1, and a saved file
    reloads to identical outputs with the spec in its manifest."""
    net = _cnn()
    x = torch.randn(4, 3, 6, 6)
    ref = net(x).detach()
    errs = []
    for K in (1, 2, 3):
        q, rep = quantize_model(net, QuantConfig(LayerRule("minmax", 4, act_bits=4, expand=K)))
        modes = {r.name: r.act["mode"] for r in rep.layers if r.act}
        assert modes == {"0": "sample", "3": "static", "7": "token"}
        conv = q[3]
        assert isinstance(conv, QuantModule) and conv.input_spec.order == K
        # the static range of layer 3 is the ReLU(BN) rule on the first BatchNorm's affine parameters
        bn = net[1]
        assert conv.input_spec.hi == pytest.approx(bn_input_range(bn.bias, bn.weight, "relu")[1])
        h = q[2](q[1](q[0](x)))
        xs = expand_input(h, conv.input_spec)
        ws = order_weights(conv)
        manual = termwise_pairs(xs, ws, lambda a, w: F.conv2d(a, w, padding=1)) + conv.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(conv(h), manual, rtol=1e-5, atol=1e-5)
        expect = pair_bits_per_mac([(4, 8)] * K, 8, 4) / 4
        assert next(r for r in rep.layers if r.name == "3").weight_bits_per_mac == pytest.approx(expect)
        y = q(x)
        errs.append(float((y - ref).abs().max()))
        path = save_quantized(q, tmp_path / f"k{K}.safetensors", source={}, report=rep)
        q2, manifest = load_quantized(path, build=lambda s: copy.deepcopy(net))
        assert torch.equal(q2(x), y)
        assert manifest["layers"]["3"]["act"]["mode"] == "static"
    assert errs[1] < errs[0] and errs[2] < errs[1]


def test_act_bits_validation() -> None:
    with pytest.raises(ConfigError, match="act_bits"):
        LayerRule(act_bits=1)
    with pytest.raises(ConfigError, match="static input range"):
        InputSpec(4, 1, "static", 1.0, 2.0)
    with pytest.raises(ConfigError, match="outliers"):
        LayerRule(outliers=0.9)


# -- outliers --


def _heavy(out: int = 32, inp: int = 64) -> torch.Tensor:
    w = torch.randn(out, inp) * 0.05
    w.view(-1)[torch.randperm(w.numel())[:8]] = torch.randn(8) * 2.0  # a few large outliers
    return w


@pytest.mark.parametrize("scale", ["sign", "row", "row-sign"])
def test_outlier_residual_is_sparse_binary_and_helps(scale: str) -> None:
    w = _heavy()
    q = get_quantizer("minmax", 3)
    bulk, res = split_outliers(w, q, 0.004, scale=scale, select="global")
    n = round(0.004 * w.numel())
    assert res.index.numel() == n
    top = torch.topk(w.abs().reshape(-1), n).indices.sort().values
    assert torch.equal(res.index, top)  # the largest-magnitude weights
    vals = res.values()
    assert set(vals.abs().unique().tolist()) <= set(res.scale.tolist())
    approx = res.add_to(bulk.dequantize())
    plain = q.quantize(w, "channel").dequantize()
    assert float((approx - w).norm()) < 0.5 * float((plain - w).norm())
    assert outlier_bits(n, scale, 32) == 33 * n + 32 * {"sign": 2, "row": 32, "row-sign": 64}[scale]


def test_outliers_per_row_take_each_rows_largest_and_clip_each_row() -> None:
    w = _heavy(32, 256)
    q = get_quantizer("minmax", 3)
    bulk, res = split_outliers(w, q, 0.01, select="row")  # scale: "row-sign" by default
    k = round(0.01 * 256)
    assert res.kind == "row-sign" and res.index.numel() == 32 * k and res.scale.shape == (64,)
    rows, cols = res.index // 256, res.index % 256
    assert torch.equal(torch.bincount(rows, minlength=32), torch.full((32,), k))
    top = torch.topk(w.abs(), k, dim=1).indices.sort(dim=1).values
    assert torch.equal(cols.reshape(32, k), top)
    # each row's bulk range is its own largest weight outside its outliers
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask.view(-1)[res.index] = True
    t = torch.where(mask, torch.zeros_like(w), w.abs()).amax(dim=1)
    torch.testing.assert_close(bulk.dequantize().abs().amax(dim=1), t, rtol=1e-5, atol=1e-7)
    # per row and sign the magnitude is the mean |residual| of that row's outliers of that sign
    r = (w.reshape(-1) - bulk.dequantize().reshape(-1))[res.index]
    for row in (0, 7, 31):
        for sign, col in ((1, 0), (-1, 1)):
            sel = (rows == row) & (torch.sign(r) == sign)
            if sel.any():
                torch.testing.assert_close(res.scale[2 * row + col], r[sel].abs().mean())
    approx = res.add_to(bulk.dequantize())
    glob_bulk, glob = split_outliers(w, q, 0.01, select="global", scale="sign")
    assert float((approx - w).norm()) < float((glob.add_to(glob_bulk.dequantize()) - w).norm())
    with pytest.raises(ConfigError, match="outlier selection must be one of global, row, got 'col'"):
        split_outliers(w, q, 0.01, select="col")


def test_outliers_round_trip_and_bits(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        net[0].weight.copy_(_heavy(32, 64))
    q, rep = quantize_model(net, QuantConfig(LayerRule("minmax", 3, outliers=0.004)))
    _plain, prep = quantize_model(net, QuantConfig(LayerRule("minmax", 3)))
    r0, p0 = rep.layers[0], prep.layers[0]
    assert r0.outliers == round(0.004 * 64 * 32) and r0.rel_mse < 0.5 * p0.rel_mse
    extra = outlier_bits(r0.outliers, "row-sign", 32) / (64 * 32)
    assert r0.bits_per_weight == pytest.approx(p0.bits_per_weight + extra)
    path = save_quantized(q, tmp_path / "o.safetensors", source={}, report=rep)
    q2, _manifest = load_quantized(path, build=lambda s: copy.deepcopy(net))
    x = torch.randn(5, 64)
    assert torch.equal(q2(x), q(x))
    assert torch.equal(q2[0].outliers.index, q[0].outliers.index)
    assert read_manifest(path)["layers"]["0"]["outliers"] == {"kind": "row-sign", "count": r0.outliers}
    with pytest.raises(ConfigError, match="outliers"):
        quantize_model(net, QuantConfig(LayerRule("minmax", 3, outliers=0.004, expand=2)))
    # per-row selection through the rule: one outlier per output channel here (round(0.004 * 64) -> 1)
    qr, rrep = quantize_model(net, QuantConfig(LayerRule("minmax", 3, outliers=0.004, outlier_select="row")))
    assert rrep.layers[0].outliers == 32 and int(torch.bincount(qr[0].outliers.index // 64, minlength=32).min()) == 1
    path = save_quantized(qr, tmp_path / "r.safetensors", source={}, report=rrep)
    qr2, _ = load_quantized(path, build=lambda s: copy.deepcopy(net))
    assert torch.equal(qr2(x), qr(x))
    with pytest.raises(ConfigError, match="'outlier_select' must be one of global, row, got 'col'"):
        LayerRule("minmax", 3, outliers=0.004, outlier_select="col")


# -- per-order rules --


def test_residual_quantizer_per_order() -> None:
    w = torch.randn(16, 40)
    mse, mm = get_quantizer("mse", 3), get_quantizer("minmax", 3)
    terms = expand(w, mse, 3, residual_quantizer=mm)
    assert [t.qtensor.quantizer for t in terms] == ["mse", "minmax", "minmax"]
    assert torch.equal(terms[0].qtensor.dequantize(), mse.quantize(w, "channel").dequantize())
    errs = [relative_error(w, terms[:k]) for k in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]
    rule = LayerRule("mse", 3, expand=2, residual_quantizer="minmax")
    q, _rep = quantize_model(nn.Sequential(nn.Linear(40, 16)), QuantConfig(rule))
    assert [t.quantizer for t in q[0].quant_terms] == ["mse", "minmax"]
    assert LayerRule.from_dict(rule.to_dict()) == rule


# -- tradeoff command --

BUILDER = """
import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
"""
MODULE = "dfquant_rex_tradeoff_builders"


def test_tradeoff_cli_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    require_module("matplotlib")  # the PNG needs the 'plots' extra
    (tmp_path / f"{MODULE}.py").write_text(BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    save_file(model.state_dict(), str(tmp_path / "mlp.safetensors"))
    real_load = cli_tradeoff.load_model_arg

    def load_with_shape(args: object) -> LoadedModel:  # a plain state dict has no input shape: give one
        loaded = real_load(args)
        loaded.input_shape = (16,)
        return loaded

    monkeypatch.setattr(cli_tradeoff, "load_model_arg", load_with_shape)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["tradeoff", str(tmp_path / "mlp.safetensors"), f"--builder={MODULE}:mlp", "--bits", "2"]
    argv += ["--orders", "1,2,3", "--sparsity", "0,50", "--plain-bits", "2,4,8", "--eval", "fidelity"]
    code = main([*argv, "--eval-limit", "32", "--out", str(out), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    pts = doc["points"]
    assert [(p["kind"], p["order"], p["sparsity"]) for p in pts] == [
        ("rex", 1, 0.0),
        ("rex", 2, 0.0),
        ("rex", 2, 0.5),
        ("rex", 3, 0.0),
        ("rex", 3, 0.5),
        ("plain", 1, 0.0),
        ("plain", 1, 0.0),
        ("plain", 1, 0.0),
    ]
    assert all({"bits", "order", "sparsity", "bops", "bits_per_weight", "eval"} <= set(p) for p in pts)
    by = {(p["kind"], p["bits"], p["order"], p["sparsity"]): p for p in pts}
    # BOPs: weight-only (float activations, 32 bits), MACs x sum of term bits; dense K=2 at 2 bits = plain W4
    assert by[("rex", 2, 2, 0.0)]["bops"] == pytest.approx(by[("plain", 4, 1, 0.0)]["bops"])
    assert by[("rex", 2, 1, 0.0)]["bops"] == pytest.approx((16 * 32 + 32 * 8) * 2 * 32)
    assert by[("rex", 2, 2, 0.5)]["bops"] < by[("rex", 2, 2, 0.0)]["bops"]
    errs = [by[("rex", 2, k, 0.0)]["eval"]["rel_error"] for k in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]
    assert all(math.isfinite(p["bops"]) for p in pts)
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_rows = (out / "tradeoff.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(pts)
    assert "REx better" in (out / "tradeoff.md").read_text()
    assert main([*argv[:-2], "--eval", "fidelity,stsb", "--json"]) == 2


def test_cli_outlier_select_needs_outliers(capsys: pytest.CaptureFixture[str]) -> None:
    from dfquant.cli.main import main

    assert main(["quantize", "cifar-resnet20", "--bits", "3", "--outlier-select", "row"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dfquant: error: layer rule: outlier_select 'row' chooses the weights of 'outliers': give outliers too"
    )


def test_cross_field_rules_are_checked_by_the_rule_itself() -> None:
    """The API refuses what the command line refuses: LayerRule.check owns the checks that tie fields together."""
    from dfquant.config import LayerRule
    from dfquant.errors import ConfigError

    with pytest.raises(ConfigError, match="outlier_select 'row' chooses the weights of 'outliers'"):
        LayerRule("minmax", 3, outlier_select="row")
    with pytest.raises(ConfigError, match="residual_quantizer 'mse' is the rule of expansion orders >= 2"):
        LayerRule("minmax", 2, residual_quantizer="mse")
    with pytest.raises(ConfigError, match=r"outliers \(0.002\) combine with plain terms only, not expand=2"):
        LayerRule("minmax", 3, expand=2, outliers=0.002)
    assert LayerRule("minmax", 3, outliers=0.002, outlier_select="row").outlier_select == "row"
    assert LayerRule("minmax", 2, expand=2, residual_quantizer="mse").residual_quantizer == "mse"


def test_rule_field_and_method_name_the_same_selections() -> None:
    from dfquant.config import OUTLIER_SELECTS as CONFIG_SELECTS
    from dfquant.methods.outliers import OUTLIER_SELECTS

    assert CONFIG_SELECTS == OUTLIER_SELECTS


def test_cli_residual_method(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from dfquant.cli.common import rex_extras
    from dfquant.cli.main import main

    base = ["quantize", "cifar-resnet20", "--bits", "2"]
    assert main([*base, "--residual-method", "mse"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dfquant: error: layer rule: residual_quantizer 'mse' is the rule of expansion orders >= 2: give "
        "expand >= 2 (got 1)"
    )
    assert main([*base, "--expand", "2", "--residual-method", "nope"]) == 2
    assert "unknown quantizer 'nope'" in capsys.readouterr().err
    import argparse

    ns = argparse.Namespace(act_bits=None, outliers=None, outlier_select=None, expand=2, residual_method="mse")
    assert rex_extras(ns) == {"residual_quantizer": "mse"}
