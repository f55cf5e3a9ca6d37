"""DF-MPC on the real ResNet-20 (exact 1017 test images only, to stay short; the full table with agreement on
the 10,000-image JPEG copy comes from ``benchmarks/dfmpc_table.py``).

Measured (default settings: projection statistics, coefficients c = 1, bias correction on, 6-bit minmax high
layers; float 91.64 %): MP3/6 with 3-bit ``mse`` low layers 91.94 %; MP2/6 ternary 79.06 % (the paper's loss
coefficients: 55.75 %) against 35.99 % without compensation; MP2/6 with the 2-bit ``lloyd-optimal`` rule
weighted by input variance and the ``projection-noise`` statistics 89.58 % (2.06 points below float).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import require_asset
from dfquant.cli.main import main
from dfquant.config import LayerRule
from dfquant.eval.cifar10 import EXACT_FILE, load_cifar10, predict
from dfquant.io.load import load_quantized
from dfquant.pipeline.compensate import compensate_model, dfmpc_config
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import build_architecture
from dfquant.zoo.cifar_resnet import load_cifar_resnet

pytestmark = [pytest.mark.assets, pytest.mark.slow]

FLOAT_TOP1 = 91.64


@pytest.fixture(scope="module")
def setup() -> dict[str, object]:
    ckpt = require_asset("cifar10-resnet", "resnet20-12fca82f.th")
    require_asset("cifar10-test", EXACT_FILE)
    x, y = load_cifar10(EXACT_FILE)
    return {"model": load_cifar_resnet(20, ckpt).model.eval(), "x": x, "y": y}


def _top1(model: torch.nn.Module, setup: dict[str, object]) -> float:
    x, y = setup["x"], setup["y"]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    return 100.0 * float((predict(model, x) == y).float().mean())


def test_mp3_6_within_one_point_of_float(setup: dict[str, object]) -> None:
    model = setup["model"]
    assert isinstance(model, torch.nn.Module)
    q, report, dreport = compensate_model(model, low=LayerRule("mse", 3))
    assert len(dreport.pairs) == 9
    assert max(max(p.weight_dev, p.bias_dev) for p in dreport.pairs) < 1e-5
    assert _top1(q, setup) >= FLOAT_TOP1 - 1.0
    assert 4.6 < report.bits_per_weight < 4.8


def test_mp2_6_compensation_beats_no_compensation(setup: dict[str, object]) -> None:
    model = setup["model"]
    assert isinstance(model, torch.nn.Module)
    q, _, dreport = compensate_model(model)
    lows = [p.low for p in dreport.pairs]
    plain, _ = quantize_model(model, dfmpc_config(lows, LayerRule("ternary", 2), LayerRule("minmax", 6)))
    q_loss, _, _ = compensate_model(model, coefficient="loss")
    top1, top1_plain, top1_loss = _top1(q, setup), _top1(plain, setup), _top1(q_loss, setup)
    # 79.06 / 35.99 / 55.75: both compensate, the re-derived statistics alone (c = 1) by far the most
    assert top1 >= top1_plain + 30.0 and top1_loss >= top1_plain + 10.0 and top1 >= top1_loss + 15.0


def test_mp2_6_within_three_points_of_float(setup: dict[str, object]) -> None:
    """The issue's target, with the best 2-bit low rule: 89.58 % against 91.64 %."""
    model = setup["model"]
    assert isinstance(model, torch.nn.Module)
    low = LayerRule("lloyd-optimal", 2, options={"weighting": "input-variance"})
    q, report, dreport = compensate_model(model, low=low, stats="projection-noise")
    assert len(dreport.pairs) == 9 and dreport.coefficient == "none"
    assert _top1(q, setup) >= FLOAT_TOP1 - 3.0
    assert 4.4 < report.bits_per_weight < 4.5


def test_cli_writes_an_ordinary_file(setup: dict[str, object], tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r20.safetensors"
    rc = main(
        [
            "quantize",
            "cifar-resnet20",
            "--method",
            "dfmpc",
            "--low-bits",
            "2",
            "--high-bits",
            "6",
            "--lambda1",
            "0.5",
            "--lambda2",
            "0",
            "--out",
            str(out),
            "--json",
            "--quiet",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    pairs = result["dfmpc"]["pairs"]
    assert len(pairs) == 9 and all(0.0 <= p["c_min"] <= p["c_mean"] <= p["c_max"] for p in pairs)
    assert result["bits"] == [2, 6] and 4.2 < result["bits_per_weight"] < 4.3
    loaded, _ = load_quantized(out, build=lambda src: build_architecture(src))
    model = setup["model"]
    assert isinstance(model, torch.nn.Module)
    q, _, _ = compensate_model(model, coefficient="loss")  # --lambda1/--lambda2 select the loss coefficients
    x = setup["x"]
    assert isinstance(x, torch.Tensor)
    assert torch.equal(predict(loaded, x), predict(q, x))


def test_cli_low_rule_options_and_statistics(setup: dict[str, object], tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r20-lloyd.safetensors"
    argv = ["quantize", "cifar-resnet20", "--method", "dfmpc", "--low-quantizer", "lloyd-optimal"]
    argv += ["--low-options", "weighting=input-variance", "--bn-stats", "projection-noise"]
    assert main([*argv, "--out", str(out), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dfmpc"]["stats"] == "projection-noise" and result["dfmpc"]["coefficient"] == "none"
    lows = {p["low"] for p in result["dfmpc"]["pairs"]}
    rules = {r["name"]: (r["quantizer"], r["bits"]) for r in result["layers"]}
    assert all(rules[n] == ("lloyd-optimal", 2) for n in lows) and rules["linear"] == ("minmax", 6)
    model = setup["model"]
    assert isinstance(model, torch.nn.Module)
    low = LayerRule("lloyd-optimal", 2, options={"weighting": "input-variance"})
    q, _, _ = compensate_model(model, low=low, stats="projection-noise")
    loaded, _ = load_quantized(out, build=lambda src: build_architecture(src))
    x = setup["x"]
    assert isinstance(x, torch.Tensor)
    assert torch.equal(predict(loaded, x), predict(q, x))


def test_rotated_dfmpc_on_the_command_line(setup: dict[str, object], tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """``--rotate hadamard:64`` with ``--method dfmpc`` rotates every layer, low and high; the compensation stays
    exact (the rotation acts on the fan-in, the folding on the rows), and MP2/6 ternary gains (measured 79.06 ->
    85.05 %, ``benchmarks/dfmpc_table.py``). The file reloads to the same predictions."""
    out = tmp_path / "r20-rot.safetensors"
    argv = ["quantize", "cifar-resnet20", "--method", "dfmpc", "--rotate", "hadamard:64"]
    assert main([*argv, "--out", str(out), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(r["rotate"] == "hadamard:64" for r in result["layers"]) and len(result["layers"]) == 20
    assert result["dfmpc"]["low"]["rotate"] == "hadamard:64"
    assert max(max(p["weight_dev"], p["bias_dev"]) for p in result["dfmpc"]["pairs"]) < 1e-5
    loaded, _ = load_quantized(out, build=lambda src: build_architecture(src))
    model = setup["model"]
    assert isinstance(model, torch.nn.Module)
    plain, _, _ = compensate_model(model)
    rotated = _top1(loaded, setup)
    assert rotated >= _top1(plain, setup) + 3.0, f"rotated {rotated:.2f} %"
