"""The ResNet-20 targets of the whole-model issue, met with the recommended data-free setting.

Setting: ``lloyd-optimal`` with ``weighting="input-variance"``, per output channel, every layer (first and
last included), BatchNorm folding and data-free bias correction on (the defaults of :class:`QuantConfig`); no
image is used to quantize. Targets: W4 top-1 >= 91.0 % and agreement >= 93 %; W3 top-1 >= 89.0 % and
agreement >= 85 %. Top-1 is measured on the exact 1017 test images, as in the issue. Agreement is measured
here on the first 2000 images of the 10,000-image JPEG copy to keep the test short (the full-set figures are
in the table of ``benchmarks/resnet_table.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import require_asset
from dfquant.config import LayerRule, QuantConfig
from dfquant.eval.cifar10 import EXACT_FILE, JPEG_FILE, load_cifar10, predict
from dfquant.eval.metrics import agreement, top1_accuracy
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo.cifar_resnet import load_cifar_resnet

pytestmark = pytest.mark.assets

AGREEMENT_IMAGES = 2000
RECOMMENDED = {"quantizer": "lloyd-optimal", "options": {"weighting": "input-variance"}}


@pytest.fixture(scope="module")
def resnet20() -> dict[str, object]:
    ckpt = require_asset("cifar10-resnet", "resnet20-12fca82f.th")
    require_asset("cifar10-test", EXACT_FILE)
    require_asset("cifar10-test", JPEG_FILE)
    model = load_cifar_resnet(20, ckpt).model
    exact_x, exact_y = load_cifar10(EXACT_FILE)
    jpeg_x = load_cifar10(JPEG_FILE)[0][:AGREEMENT_IMAGES]
    return {
        "model": model,
        "exact_x": exact_x,
        "exact_y": exact_y,
        "jpeg_x": jpeg_x,
        "float_top1": top1_accuracy(predict(model, exact_x), exact_y),
        "float_jpeg": predict(model, jpeg_x),
    }


@pytest.mark.parametrize(("bits", "top1_min", "agreement_min"), [(4, 91.0, 93.0), (3, 89.0, 85.0)])
def test_resnet20_targets(resnet20: dict[str, object], bits: int, top1_min: float, agreement_min: float) -> None:
    model = resnet20["model"]
    assert isinstance(model, nn.Module)
    assert resnet20["float_top1"] == pytest.approx(91.64, abs=0.01)
    rule = LayerRule(RECOMMENDED["quantizer"], bits, "channel", options=RECOMMENDED["options"])
    q, report = quantize_model(model, QuantConfig(rule))
    # every layer quantized, first and last included; every layer but the stem bias-corrected
    assert len(report.layers) == 20 and not report.skipped
    assert len(report.bias_corrected) == 19
    exact_x, exact_y, jpeg_x, float_jpeg = (resnet20[k] for k in ("exact_x", "exact_y", "jpeg_x", "float_jpeg"))
    assert isinstance(exact_x, torch.Tensor) and isinstance(jpeg_x, torch.Tensor)
    assert isinstance(exact_y, torch.Tensor) and isinstance(float_jpeg, torch.Tensor)
    top1 = top1_accuracy(predict(q, exact_x), exact_y)
    agree = agreement(predict(q, jpeg_x), float_jpeg)
    assert top1 >= top1_min, f"W{bits} top-1 {top1:.2f} % < {top1_min} %"
    assert agree >= agreement_min, f"W{bits} agreement {agree:.2f} % < {agreement_min} % (first 2000 images)"


def test_resnet20_w3_rotated_gaussian_shape(resnet20: dict[str, object]) -> None:
    """The rotation issue's W3 target, >= 90.0 % at <= 3.25 stored bits per weight, with every layer at 3 bits:
    the Gaussian Lloyd-Max table with a searched per-channel scale (``mse``, ``grid="lloyd-gaussian"``) after
    ``rotate=hadamard:64``, BatchNorm folding and bias correction (3.08 bits per weight; measured 90.76 %)."""
    model = resnet20["model"]
    assert isinstance(model, nn.Module)
    rule = LayerRule("mse", 3, "channel", options={"grid": "lloyd-gaussian"}, rotate="hadamard:64")
    q, report = quantize_model(model, QuantConfig(rule))
    assert len(report.layers) == 20 and report.bits_per_weight <= 3.25
    exact_x, exact_y = resnet20["exact_x"], resnet20["exact_y"]
    assert isinstance(exact_x, torch.Tensor) and isinstance(exact_y, torch.Tensor)
    top1 = top1_accuracy(predict(q, exact_x), exact_y)
    assert top1 >= 90.0, f"W3 rotated Gaussian shape: top-1 {top1:.2f} % < 90.0 %"


@pytest.mark.parametrize(("budget", "top1_min"), [(3.0, 89.0), (2.25, 75.0)])
def test_resnet20_bit_budget_targets(resnet20: dict[str, object], budget: float, top1_min: float) -> None:
    """The rotation issue's budget targets: ``--budget 3.0`` >= 89.0 %, and >= 75.0 % at <= 2.25 stored bits per
    weight (``statq`` per channel, rotation on or off per layer, bits from 2 to 8 chosen by the data-free
    allocation on Gaussian synthetic images; no test image is used to quantize)."""
    from dfquant.eval.fidelity import fidelity_probe
    from dfquant.zoo.registry import LoadedModel

    model = resnet20["model"]
    assert isinstance(model, nn.Module)
    loaded = LoadedModel(model, "cifar-resnet20", {}, kind="image-classifier", input_shape=(3, 32, 32))
    rule = LayerRule("statq", 3, "channel", rotate="hadamard:64")
    q, report = quantize_model(model, QuantConfig(rule, budget=budget), probe=fidelity_probe(loaded))
    assert report.bits_per_weight <= budget + 1e-9
    assert report.allocation is not None and len(report.allocation["layers"]) == 20
    assert len({u["bits"] for u in report.allocation["layers"]}) > 1  # a mixed plan
    exact_x, exact_y = resnet20["exact_x"], resnet20["exact_y"]
    assert isinstance(exact_x, torch.Tensor) and isinstance(exact_y, torch.Tensor)
    top1 = top1_accuracy(predict(q, exact_x), exact_y)
    assert top1 >= top1_min, f"budget {budget}: top-1 {top1:.2f} % < {top1_min} %"


def test_budget_on_the_command_line(resnet20: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    """``dfquant quantize cifar-resnet20 --budget 3.0``: the plan in the printed report and in the JSON result."""
    import json

    from dfquant.cli.main import main

    argv = ["quantize", "cifar-resnet20", "--method", "statq", "--rotate", "hadamard:64", "--budget", "3.0"]
    assert main([*argv, "--budget-bits", "2,3,4,6", "--eval", "cifar10", "--eval-limit", "256"]) == 0
    text = capsys.readouterr().out
    assert "bit allocation: budget 3.000 bits/weight, plan " in text
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    plan = result["report"]["allocation"]
    assert plan["budget"] == 3.0 and plan["bits_per_weight"] <= 3.0
    assert result["bits_per_weight"] == pytest.approx(plan["bits_per_weight"])
    assert {u["bits"] for u in plan["layers"]} <= {2, 3, 4, 5, 6, 8}


def test_resnet20_absorbed_balance_is_free_and_helps(resnet20: dict[str, object]) -> None:
    """``balance="absorbed"``: the nine layers that read a BatchNorm-ReLU output alone (each block's conv2) take a
    per-input-channel balance whose scale moves into that BatchNorm (:mod:`dfquant.pipeline.absorb`). Bits per
    weight stay those of the plain rule (3.08) and W3 ``statq`` per channel gains (measured 84.76 -> 86.53 %)."""
    model = resnet20["model"]
    assert isinstance(model, nn.Module)
    exact_x, exact_y = resnet20["exact_x"], resnet20["exact_y"]
    assert isinstance(exact_x, torch.Tensor) and isinstance(exact_y, torch.Tensor)
    top1, bits = {}, {}
    for mode in (False, "absorbed"):
        q, report = quantize_model(model, QuantConfig(LayerRule("statq", 3, "channel", balance=mode)))
        top1[mode] = top1_accuracy(predict(q, exact_x), exact_y)
        bits[mode] = report.bits_per_weight
        absorbed = [r.name for r in report.layers if r.balance_absorbed]
        assert len(absorbed) == (9 if mode else 0) and all(n.endswith(".conv2") for n in absorbed)
        assert not any(r.balance for r in report.layers)
    assert bits["absorbed"] == bits[False]
    assert top1["absorbed"] >= top1[False] + 1.0, f"absorbed {top1['absorbed']:.2f} % vs plain {top1[False]:.2f} %"


def test_balance_on_the_command_line(resnet20: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    """``--balance`` (absorbed where the graph allows, stored elsewhere) and ``--balance absorbed`` after the
    model's name: the report marks the absorbed layers ``bal>BATCHNORM`` and the JSON names the BatchNorm."""
    import json

    from dfquant.cli.main import main

    base = ["quantize", "cifar-resnet20", "--method", "statq", "--bits", "3"]
    assert main([*base, "--balance"]) == 0
    text = capsys.readouterr().out
    assert "bal>layer1.0.bn1" in text and text.count(" bal ") + text.count(" bal\n") > 0
    assert main([*base, "--balance", "absorbed", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["report"]["layers"]
    absorbed = {r["name"]: r["balance_absorbed"] for r in layers if r["balance_absorbed"]}
    assert absorbed["layer3.2.conv2"] == "layer3.2.bn1" and len(absorbed) == 9
    assert not any(r["balance"] for r in layers)
