"""quantize_model end to end on small models built here: BatchNorm folding, measured bias correction, plan
validation before any change, warnings and strict mode, and save -> load bit-exactness."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import ConfigError, InputError, ModelError
from dfquant.graph.modules import FoldedBatchNorm
from dfquant.io.load import load_quantized
from dfquant.io.save import save_quantized
from dfquant.nn.layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantHFConv1D, QuantLinear
from dfquant.pipeline.plan import plan_quantization
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers import available
from shared_models import Block, trained_like


class SmallCNN(nn.Module):
    """stem conv-BN-ReLU, a residual block, a depthwise conv-BN-ReLU, a grouped 1x1 conv, a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block = Block(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 2 * width, 1, groups=2)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.pw(F.relu(self.dw_bn(self.dw(x))))
        return self.fc(x.mean((2, 3)))


class Conv1D(nn.Module):
    """A stand-in for transformers' ``Conv1D`` (weight ``(in, out)``)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class TinyText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.attn = Conv1D(96, 32)
        self.mix = nn.Conv1d(96, 32, 3, padding=1)
        self.out = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.emb(ids))
        h = self.mix(h.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.tanh(h))


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m).__name__ for m in model.modules()],
    )


def same(a: tuple, b: tuple) -> bool:
    """Same module types and bit-identical tensors (NaN equal to NaN)."""
    if a[1] != b[1] or a[0].keys() != b[0].keys():
        return False
    return all(bool(((a[0][k] == b[0][k]) | (a[0][k].isnan() & b[0][k].isnan())).all()) for k in a[0])


X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def test_folding_alone_keeps_float_outputs() -> None:
    model = trained_like(SmallCNN())
    cfg = QuantConfig(rules=(PatternRule("*", skip=True, reason="fold only"),))
    with pytest.warns(UserWarning, match=r"6 layer\(s\) left in float"):
        folded, report = quantize_model(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(folded(X), model(X), atol=1e-5, rtol=1e-5)
    assert [(f.layer, f.bn) for f in report.folded_bn] == [
        ("stem", "bn"),
        ("block.conv1", "block.bn1"),
        ("block.conv2", "block.bn2"),
        ("dw", "dw_bn"),
    ]
    assert isinstance(folded.block.bn2, FoldedBatchNorm) and folded.stem.bias is not None
    assert report.graph_method == "fx" and not report.layers


def test_quantize_cnn_end_to_end() -> None:
    model = trained_like(SmallCNN())
    before = snapshot(model)
    calls: list[tuple[int, int, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning at all
        q, report = quantize_model(model, QuantConfig(LayerRule("minmax", 6)), progress=lambda *a: calls.append(a))
    assert same(before, snapshot(model))  # the caller's model is untouched
    assert calls == [(i + 1, 6, n) for i, n in enumerate(["stem", "block.conv1", "block.conv2", "dw", "pw", "fc"])]
    assert isinstance(q.stem, QuantConv2d) and isinstance(q.fc, QuantLinear) and q.dw.groups == 16
    assert {b.layer: (b.bn, b.activation) for b in report.bias_corrected} == {
        "block.conv1": ("bn", "relu"),
        "block.conv2": ("block.bn1", "relu"),
        "dw": ("block.bn2 + relu", "relu"),  # ReLU(bn2(.) + shortcut): moments propagated
        "pw": ("dw_bn", "relu"),
    }
    with torch.no_grad():
        ref, out = model(X), q(X)
    assert float((out - ref).norm() / ref.norm()) < 0.05
    assert all(0 < r.rel_mse < 0.01 for r in report.layers)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.quantized_params == sum(r.params for r in report.layers) == 16 * 27 + 2 * 16 * 144 + 144 + 256 + 320
    assert report.model_bytes < report.float_model_bytes / 2
    json.dumps(report.to_dict(), allow_nan=False)
    assert "block.conv2" in report.to_text()


def test_bias_correction_reduces_output_mean_shift() -> None:
    """Inputs drawn from the BatchNorm's own statistics, so that its outputs are N(beta, gamma^2) as DFQ
    assumes."""
    torch.manual_seed(3)
    c, o = 8, 12
    model = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, o, 3))
    trained_like(model, seed=3)
    bn = model[0]
    bn.bias.data = torch.rand(c) + 0.2  # positive means: large E[x], large shift
    std = bn.running_var.sqrt().reshape(1, c, 1, 1)
    x = torch.randn(3000, c, 10, 10) * std + bn.running_mean.reshape(1, c, 1, 1)
    rule = LayerRule("minmax", 2, "tensor")
    shifts = {}
    for on in (False, True):
        q, report = quantize_model(model, QuantConfig(rule, bias_correction=on))
        with torch.no_grad():
            shifts[on] = (q(x) - model(x)).mean((0, 2, 3))
        if on:
            (rec,) = report.bias_corrected
            assert (rec.layer, rec.bn, rec.activation) == ("2", "0", "relu")
            # the predicted shift matches the measured one of the uncorrected model
            assert rec.shift_l2 == pytest.approx(float(shifts[False].norm()), rel=0.05)
        else:
            assert report.bias_corrected == []
    assert float(shifts[False].abs().max()) > 0.05
    assert float(shifts[True].abs().max()) < 0.1 * float(shifts[False].abs().max())


def test_save_load_identical(tmp_path: Path) -> None:
    rule = LayerRule("lloyd-max", 4) if "lloyd-max" in available() else LayerRule("mse", 4)
    # the stem stays float but keeps its folded BatchNorm: loading must give the skeleton's stem a bias
    cfg = QuantConfig(rule, rules=(PatternRule("stem", skip=True, reason="first layer"), PatternRule("fc", bits=8)))
    model = trained_like(SmallCNN())
    with pytest.warns(UserWarning, match="first layer"):
        q, report = quantize_model(model, cfg)
    path = save_quantized(q, tmp_path / "cnn.safetensors", source={"zoo": "small-cnn"}, report=report)
    loaded, manifest = load_quantized(path, build=lambda src: SmallCNN())
    with torch.no_grad():
        assert torch.equal(loaded(X), q(X))
    assert manifest["layers"]["fc"]["terms"][0]["bits"] == 8
    assert "stem" not in manifest["layers"] and isinstance(loaded.bn, FoldedBatchNorm)
    if rule.quantizer == "lloyd-max":
        assert all(r.dist and abs(sum(r.dist.values()) - 1) < 1e-9 for r in report.layers)


def test_text_model_with_hf_conv1d(tmp_path: Path) -> None:
    model = TinyText().eval()
    q, report = quantize_model(model, QuantConfig(LayerRule("minmax", 4, "group:16")))
    assert isinstance(q.attn, QuantHFConv1D) and isinstance(q.mix, QuantConv1d)
    assert isinstance(q.emb, QuantEmbedding) and report.unsupported == []
    assert [r.name for r in report.layers] == ["emb", "attn", "mix", "out"]
    assert report.graph_method == "none"
    ids = torch.randint(0, 50, (3, 7))
    path = save_quantized(q, tmp_path / "t.safetensors", source={"zoo": "tiny"})
    loaded, _ = load_quantized(path, build=lambda src: TinyText())
    with torch.no_grad():
        assert torch.equal(loaded(ids), q(ids))
        rel = float((q(ids) - model(ids)).norm() / model(ids).norm())
    assert rel < 0.2


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        (PatternRule("fc", quantizer="no-such-rule"), "unknown quantizer 'no-such-rule'"),
        (PatternRule("fc", granularity="channel:2"), "axis 2"),
        (PatternRule("fc", options={"colour": "red"}), "colour"),
        (PatternRule("fc", quantizer="mse", options={"grid": "int17"}), "grid"),
    ],
)
def test_plan_validation_raises_before_any_change(rule: PatternRule, needle: str) -> None:
    model = trained_like(SmallCNN())
    before = snapshot(model)
    with pytest.raises(ConfigError) as e:
        quantize_model(model, QuantConfig(LayerRule("minmax", 4), rules=(rule,)), inplace=True)
    assert "layer 'fc'" in str(e.value) and needle in str(e.value)
    assert same(before, snapshot(model))


def test_bits_a_rule_does_not_support() -> None:
    with pytest.raises(ConfigError, match=r"layer 'pw'.*nf4.*4"):
        plan_quantization(SmallCNN(), QuantConfig(rules=(PatternRule("pw", quantizer="nf4", bits=3),)))


def test_nan_weight_names_the_layer() -> None:
    model = trained_like(SmallCNN())
    with torch.no_grad():
        model.block.conv2.weight[0, 0, 0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(InputError, match=r"block.conv2"):
        quantize_model(model, inplace=True)
    assert same(before, snapshot(model))


def test_strict_mode_and_single_warning() -> None:
    model = trained_like(SmallCNN())
    cfg = QuantConfig(rules=(PatternRule("fc", skip=True), PatternRule("nothing*", bits=2)), strict=True)
    with pytest.raises(ConfigError, match=r"strict.*fc.*nothing"):
        quantize_model(model, cfg)
    with pytest.warns(UserWarning) as rec:
        _, report = quantize_model(model, QuantConfig(rules=cfg.rules))
    assert len(rec) == 1 and "fc" in str(rec[0].message) and "'nothing*'" in str(rec[0].message)
    assert [s.name for s in report.skipped] == ["fc"]


def test_inplace_and_single_layer_model() -> None:
    model = trained_like(SmallCNN())
    q, _ = quantize_model(model, inplace=True)
    assert q is model and isinstance(model.block.conv1, QuantConv2d)
    lin = nn.Linear(8, 3)
    q, report = quantize_model(lin)
    assert isinstance(q, QuantLinear) and report.layers[0].name == ""
    with pytest.raises(ModelError, match="no quantizable layer"):
        quantize_model(nn.Sequential(nn.ReLU()))


@pytest.mark.assets
def test_resnet20_smoke(tmp_path: Path) -> None:
    """The real CIFAR-10 ResNet-20 weights through the pipeline and the file format (needs the zoo)."""
    from conftest import require_asset
    from dfquant import zoo

    ckpt = require_asset("cifar10-resnet", "resnet20-12fca82f.th")
    require_asset("cifar10-test", "cifar10_test_first1017.npz")
    from dfquant.eval.cifar10 import load_cifar10, preprocess

    loaded = zoo.load_model("cifar-resnet20", checkpoint=str(ckpt))
    q, report = quantize_model(loaded.model, QuantConfig(LayerRule("minmax", 4)))
    assert report.graph_method == "fx" and len(report.folded_bn) == 19 and len(report.layers) == 20
    # every layer but the stem (whose input is the image): each block's conv2 reads ReLU(bn1(.)), the conv1s
    # and the head read ReLU(bn2(.) + shortcut), whose moments are propagated from the BatchNorms
    assert sorted(b.layer for b in report.bias_corrected) == sorted(
        [f"layer{s}.{i}.conv{j}" for s in (1, 2, 3) for i in range(3) for j in (1, 2)] + ["linear"]
    )
    path = save_quantized(q, tmp_path / "r20.safetensors", source=loaded.source, report=report)
    back, _ = load_quantized(path)
    x = preprocess(load_cifar10()[0][:256])  # the first 256 real test images
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
        agree = float((q(x).argmax(1) == loaded.model(x).argmax(1)).float().mean())
    assert agree >= 0.95  # W4 per channel keeps the float model's class on 98 % of them (251 of 256)
    assert path.stat().st_size < report.float_model_bytes / 5
