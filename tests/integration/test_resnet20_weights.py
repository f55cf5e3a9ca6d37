"""Per-channel weight error of the rules on the real CIFAR-10 ResNet-20 checkpoint (needs the assets)."""

from __future__ import annotations

import pytest

from conftest import require_asset
from dfquant.io.checkpoints import load_state_dict
from dfquant.report.analysis import analyze_tensor, quantizer_variants, summarize, weight_tensors

pytestmark = pytest.mark.assets


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rule_ranking_on_resnet20(bits: int) -> None:
    path = require_asset("cifar10-resnet", "resnet20-12fca82f.th")
    weights = weight_tensors(load_state_dict(path))
    assert len(weights) == 20  # 19 convolutions + the final linear layer
    rules = quantizer_variants(bits, ["minmax", "aciq", "lloyd-max", "lloyd-empirical"])
    layers = [analyze_tensor(w, bits, "channel", rules, name=n) for n, w in weights.items()]
    total = {name: s["rel_mse"] for name, s in summarize(layers).items()}
    assert total["lloyd-empirical"] <= total["lloyd-max"] < total["aciq"] < total["minmax"]
    # the error model predicts each total within 15 %
    for name, s in summarize(layers).items():
        assert s["pred_rel_mse"] == pytest.approx(s["rel_mse"], rel=0.15), name
