"""Model walking: quantizable layers, conv->BN pairs and BN->ReLU->layer chains (torch.fx and the module-order
fallback), module swaps, and the report's JSON and text forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ModelError
from dfquant.graph.modules import find_layers, find_unsupported, get_module, replace_module
from dfquant.graph.trace import analyze_graph
from dfquant.pipeline.report import LayerReport, QuantizationReport, SkippedLayer, dist_summary
from shared_models import Block


class Conv1D(nn.Module):
    """A stand-in for transformers' ``Conv1D`` (weight ``(in, out)``)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dwbn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.tap = nn.Conv2d(8, 8, 1)  # its output feeds a BN *and* the head: no fold
        self.tapbn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.pw(self.drop(self.act(self.dwbn(self.dw(x)))))
        t = self.tap(x)
        x = self.tapbn(t) + t
        return self.head(x.mean((2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx; module order still shows conv-bn-relu-conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.bn2 = nn.BatchNorm2d(6)  # does not fit conv2: not paired
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.bn1(self.conv1(x))))
        if y.sum() > 0:
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_find_layers_and_unsupported() -> None:
    model = nn.Sequential(
        nn.Embedding(10, 4),
        nn.Linear(4, 6),
        nn.Conv1d(6, 6, 3, groups=3),
        Conv1D(5, 6),
        nn.ConvTranspose2d(2, 2, 3),
        nn.Embedding(10, 4, max_norm=1.0),
    )
    found = [(i.name, i.kind) for i in find_layers(model)]
    assert found == [("0", "embedding"), ("1", "linear"), ("2", "conv1d"), ("3", "hf-conv1d")]
    assert [(n, p) for n, _, p in find_unsupported(model)] == [("4", ["weight"]), ("5", ["weight"])]
    mha = nn.MultiheadAttention(8, 2)
    assert [(n, p) for n, _, p in find_unsupported(mha)] == [("", ["in_proj_weight"])]
    assert [(i.name, i.kind) for i in find_layers(nn.Linear(2, 2))] == [("", "linear")]


def test_fx_pairs_and_chains() -> None:
    info = analyze_graph(Net())
    assert info.method == "fx"
    assert info.bn_pairs == [
        ("stem", "bn"),
        ("block.conv1", "block.bn1"),
        ("block.conv2", "block.bn2"),
        ("dw", "dwbn"),
    ]
    assert info.input_bn == {
        "block.conv1": ("bn", "relu"),
        "block.conv2": ("block.bn1", "relu"),
        "pw": ("dwbn", "relu"),
    }
    # block.conv1 shares its input with the block's shortcut: only conv2 and pw read their BatchNorm alone
    assert info.sole_input_bn == {"block.conv2": ("block.bn1", "relu"), "pw": ("dwbn", "relu")}


def test_module_order_fallback() -> None:
    info = analyze_graph(Untraceable())
    assert info.method == "module-order" and "torch.fx" in info.note
    assert info.bn_pairs == [("conv1", "bn1")]
    assert info.input_bn == {"conv2": ("bn1", "relu")}
    assert info.sole_input_bn == {}  # registration order cannot show a second reader


def test_no_batchnorm() -> None:
    info = analyze_graph(nn.Sequential(nn.Linear(3, 3)))
    assert info.method == "none" and not info.bn_pairs and not info.input_bn


def test_bn_without_running_stats_is_ignored() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 4, 1))
    info = analyze_graph(model)
    assert info.bn_pairs == [] and info.input_bn == {}


def test_get_and_replace_module() -> None:
    model = Net()
    new = nn.Identity()
    assert replace_module(model, "block.bn1", new) is model
    assert get_module(model, "block.bn1") is new
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    replace_module(seq, "1", nn.Tanh())
    assert isinstance(seq[1], nn.Tanh)
    assert replace_module(seq, "", new) is new
    with pytest.raises(ModelError, match="nope"):
        get_module(model, "block.nope")
    with pytest.raises(ModelError, match="nope"):
        replace_module(model, "nope", new)


def _report() -> QuantizationReport:
    layer = LayerReport(
        "conv1",
        "Conv2d",
        (16, 3, 3, 3),
        "lloyd-max",
        4,
        "channel",
        1,
        432,
        0.01,
        5.0,
        300,
        1728,
        {"gaussian": 0.75, "laplace": 0.25},
    )
    empty = LayerReport("fc", "Linear", (10, 64), "minmax", 4, "channel", 1, 640, float("nan"), 4.5, 400, 2560)
    return QuantizationReport(
        layers=[layer, empty],
        skipped=[SkippedLayer("head", "Linear", (2, 2), "tiny")],
        total_params=2000,
        float_model_bytes=8000,
        model_bytes=1000,
    )


def test_report_totals_json_and_text() -> None:
    r = _report()
    assert r.quantized_params == 1072
    assert r.bits_per_weight == pytest.approx((5.0 * 432 + 4.5 * 640) / 1072)
    assert r.totals()["compression"] == 8.0
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["layers"][1]["rel_mse"] is None
    assert d["layers"][0]["shape"] == [16, 3, 3, 3]
    table = r.to_text()
    for needle in ("conv1", "lloyd-max", "g75% l25%", "head", "tiny", "8.00x"):
        assert needle in table
    assert math.isnan(QuantizationReport().bits_per_weight)


def test_dist_summary() -> None:
    assert dist_summary(None) is None
    assert dist_summary(torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == {
        "gaussian": 0.5,
        "laplace": 0.25,
        "empirical": 0.25,
    }
