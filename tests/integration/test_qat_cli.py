"""``dfquant qat`` end to end on the real ResNet-20: a few steps on the JPEG copy's training images, the
converted file, the PTQ comparison and the float fine-tune baseline in the JSON result; the saved file reloads
with ``dfquant eval`` to the top-1 the command reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import require_asset
from dfquant.cli import main
from dfquant.eval.cifar10 import EXACT_FILE, JPEG_FILE

pytestmark = [pytest.mark.assets, pytest.mark.slow]


def test_qat_cli_reports_ptq_and_the_float_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_asset("cifar10-resnet", "resnet20-12fca82f.th")
    require_asset("cifar10-test", EXACT_FILE)
    require_asset("cifar10-test", JPEG_FILE)
    out = tmp_path / "r20-w4.safetensors"
    args = ["qat", "cifar-resnet20", "--format", "int4", "--weight-rule", "iterative", "--steps", "3"]
    args += ["--batch", "16", "--lr", "1e-4", "--float-baseline", "--out", str(out), "--json", "--threads", "2"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["weight_rule"] == "iterative" and res["steps"] == 3 and out.is_file()
    # W4 per channel starts at the PTQ result (91.45 % with bias correction; QAT has none) and 3 small steps
    # keep it close to the float model (91.64 %), as does the float fine-tune of the baseline
    assert res["float_top1"] == pytest.approx(91.64, abs=0.01)
    for key in ("qat_top1", "ptq_top1", "float_finetuned_top1", "ptq_finetuned_top1"):
        assert 85.0 < res[key] <= 100.0, key
    assert main(["eval", str(out), "--eval", "cifar10", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["eval"]["cifar10"]["quantized"]["top1"] == pytest.approx(res["qat_top1"], abs=0.01)
