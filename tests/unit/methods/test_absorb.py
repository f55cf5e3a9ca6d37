"""Absorbing a balanced layer's column scale into the BatchNorm before it: the per-input-channel scale, the graph
condition, the unchanged float function, what the quantized layer stores, a file and its reload, and an
``inplace`` run that fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfquant.pipeline.quantize as pq
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError, InputError
from dfquant.graph.trace import analyze_graph
from dfquant.io.load import load_quantized
from dfquant.io.save import save_quantized
from dfquant.methods.balance import channel_imbalance, channel_scale, column_scale
from dfquant.pipeline.absorb import absorb_column_scales, restore
from dfquant.pipeline.plan import plan_quantization
from dfquant.pipeline.quantize import quantize_model
from shared_models import Block


def test_channel_scale_recovers_an_input_channel_spread() -> None:
    """``W[o, i, taps] = a_o Z b_i`` with ``Z`` Gaussian: the scale is ``b`` up to one factor (and the sampling
    noise of 64 x 9 values per channel), the same for every tap, and balancing removes the imbalance."""
    g = torch.Generator().manual_seed(3)
    a = torch.exp(torch.randn(64, generator=g))
    b = torch.exp(1.5 * torch.randn(32, generator=g))
    w = a[:, None, None, None] * torch.randn(64, 32, 3, 3, generator=g) * b[None, :, None, None]
    c = channel_scale(w)
    assert c.shape == (32,) and c.dtype == torch.float32
    ratio = c / b
    assert float(ratio.std() / ratio.mean()) < 0.1
    assert float(torch.exp(torch.log(c).mean())) == pytest.approx(1.0, rel=0.01)
    spread = (w / c[None, :, None, None]).std(dim=(0, 2, 3))  # each input channel's spread, all taps
    assert (
        float(spread.max() / spread.min()) < 1.5 < 50 < float(w.std(dim=(0, 2, 3)).max() / w.std(dim=(0, 2, 3)).min())
    )
    assert channel_imbalance(w / c[None, :, None, None]) < 0.5 * channel_imbalance(w)  # the rows' share is left
    # for a linear layer it is the stored column scale before float16 rounding
    lin = w[:, :, 0, 0]
    torch.testing.assert_close(channel_scale(lin).to(torch.float16), column_scale(lin), rtol=0, atol=0)
    # zero input channels keep one; a single row or channel gets ones
    w[:, 5] = 0
    assert float(channel_scale(w)[5]) == 1.0
    assert torch.equal(channel_scale(torch.randn(1, 4, 3, 3)), torch.ones(4))
    with pytest.raises(InputError, match="NaN or infinite"):
        channel_scale(torch.full((4, 4), float("nan")))


class Chain(nn.Module):
    """stem -> BN -> ReLU -> a residual block (its conv1 shares its input with the shortcut, conv2 reads bn1
    alone) -> BN (no affine) -> conv -> BN -> grouped conv -> pooled linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.plain = nn.BatchNorm2d(8, affine=False)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.cbn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.conv(F.relu(self.plain(x)))
        x = self.dw(F.relu(self.cbn(x)))
        return self.fc(x.mean((2, 3)))


def _trained_chain(seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    net = Chain().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features) * 0.2)
        # uneven input channels for block.conv2: a balance far from ones
        net.block.conv2.weight.mul_(torch.exp(1.5 * torch.randn(1, 8, 1, 1)))
    return net


def test_absorption_keeps_the_float_function_and_only_takes_what_the_graph_allows() -> None:
    net = _trained_chain()
    x = torch.randn(4, 3, 12, 12)
    ref = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plans = plan_quantization(net, QuantConfig(LayerRule("minmax", 4, balance=True)))
    absorbed = absorb_column_scales(net, analyze_graph(net), {p.name: p for p in plans})
    # block.conv1 shares its input with the shortcut, conv's BatchNorm has no affine, dw is grouped, the stem and
    # fc read no BatchNorm: only block.conv2 takes its scale into block.bn1
    assert list(absorbed) == ["block.conv2"]
    a = absorbed["block.conv2"]
    assert a.bn == "block.bn1" and a.act == "relu" and bool((a.scale > 0).all())
    assert not torch.allclose(a.scale, torch.ones(8), atol=0.1)
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)  # the same function, to float32 rounding
    torch.testing.assert_close(net.block.bn1.weight, before["block.bn1.weight"] * a.scale)
    torch.testing.assert_close(net.block.bn1.bias, before["block.bn1.bias"] * a.scale)
    torch.testing.assert_close(net.block.conv2.weight, before["block.conv2.weight"] / a.scale[None, :, None, None])
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"block.bn1.weight", "block.bn1.bias", "block.conv2.weight"}
    restore(net, absorbed)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("fold_bn", [True, False])
def test_absorbed_layers_store_nothing_and_reload_bit_identical(tmp_path: Path, fold_bn: bool) -> None:
    net = _trained_chain()
    x = torch.randn(4, 3, 12, 12)
    cfg = QuantConfig(LayerRule("mse", 3, balance=True), fold_bn=fold_bn)
    q, report = quantize_model(net, cfg)
    by_name = {r.name: r for r in report.layers}
    assert by_name["block.conv2"].balance_absorbed == "block.bn1" and not by_name["block.conv2"].balance
    assert q.get_submodule("block.conv2").balance is None
    stored = {n for n, r in by_name.items() if r.balance}
    assert stored == {n for n in by_name if n != "block.conv2"}  # every other layer stores its scale
    assert "bal>block.bn1" in report.to_text()
    # the absorbed layer costs what an unbalanced one does
    _, plain = quantize_model(net, QuantConfig(LayerRule("mse", 3), fold_bn=fold_bn))
    plain_bits = {r.name: r.bits_per_weight for r in plain.layers}
    assert by_name["block.conv2"].bits_per_weight == plain_bits["block.conv2"]
    assert by_name["block.conv1"].bits_per_weight > plain_bits["block.conv1"]
    # the scaled BatchNorm travels in the file (unfolded) or in the folded layer before it
    path = save_quantized(q, tmp_path / "m.safetensors", source={"kind": "test"}, report=report)
    back, manifest = load_quantized(path, build=lambda src: _trained_chain(seed=1))
    assert "balance" not in manifest["layers"]["block.conv2"] and manifest["layers"]["block.conv1"]["balance"]
    assert torch.equal(back(x), q(x))
    # and the quantized model stays close to the float one (3 bits, a tiny network)
    y, ref = q(x), net(x)
    assert float((y - ref).pow(2).sum() / ref.pow(2).sum()) < 0.05


def test_balance_modes_absorbed_and_stored() -> None:
    net = _trained_chain()
    _, only = quantize_model(net, QuantConfig(LayerRule("minmax", 3, balance="absorbed")))
    assert {r.name for r in only.layers if r.balance_absorbed} == {"block.conv2"}
    assert not any(r.balance for r in only.layers)  # nothing stored: the other layers are not balanced
    _, plain = quantize_model(net, QuantConfig(LayerRule("minmax", 3)))
    assert only.bits_per_weight == plain.bits_per_weight
    _, stored = quantize_model(net, QuantConfig(LayerRule("minmax", 3, balance="stored")))
    assert all(r.balance and not r.balance_absorbed for r in stored.layers)
    # a pattern rule can choose per layer; unknown modes are refused naming what is allowed
    cfg = QuantConfig(LayerRule("minmax", 3), rules=(PatternRule("block.*", balance="absorbed"),))
    _, per = quantize_model(net, cfg)
    assert [r.name for r in per.layers if r.balance_absorbed] == ["block.conv2"]
    with pytest.raises(ConfigError, match="'balance' must be true, false, 'absorbed' or 'stored'"):
        LayerRule("minmax", 3, balance="yes")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg  # the mode survives the JSON form


def test_a_failed_inplace_run_gives_the_batchnorm_back(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _trained_chain()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    original = pq.quantize_weight

    def failing(p, *args, **kw):  # type: ignore[no-untyped-def]
        if p.name == "dw":  # after block.conv2 was balanced through block.bn1
            raise InputError("injected failure")
        return original(p, *args, **kw)

    monkeypatch.setattr(pq, "quantize_weight", failing)
    with pytest.raises(InputError, match="injected failure"):
        quantize_model(net, QuantConfig(LayerRule("minmax", 3, balance=True)), inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in (net.stem, net.block.conv2, net.fc))
