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
