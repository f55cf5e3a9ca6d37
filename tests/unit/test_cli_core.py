"""The `theory` and `analyze` commands: JSON shape, figures, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dfquant.cli import main


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_theory_json_is_keyed_by_quantizer(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "theory", "--dist", "gaussian", "--bits", "3")
    assert "minmax" in out and "mse" in out
    assert out["mse"]["mse"] == pytest.approx(0.03744, abs=5e-5)
    assert len(out["mse"]["levels"]) == 8
    for row in out.values():
        assert row["mse"] > 0


def test_theory_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["theory", "--bits", "2", "--dist", "laplace"]) == 0
    text = capsys.readouterr().out
    assert "laplace" in text and "mse" in text


def test_analyze_safetensors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.safetensors"
    save_file(
        {
            "fc.weight": torch.randn(32, 256),
            "fc.bias": torch.randn(32),
            "conv.weight": torch.randn(8, 4, 3, 3),
        },
        str(path),
    )
    out = run_json(capsys, "analyze", str(path), "--bits", "4", "--quantizers", "minmax,mse")
    by_name = {lay["name"]: lay for lay in out["layers"]}
    assert sorted(by_name) == ["conv.weight", "fc.weight"]  # biases are not weight tensors
    fc = by_name["fc.weight"]
    assert fc["dist"] == "gaussian" and fc["shape"] == [32, 256]
    assert fc["methods"]["mse"]["rel_mse"] < fc["methods"]["minmax"]["rel_mse"]
    for m in fc["methods"].values():
        assert m["pred_rel_mse"] == pytest.approx(m["rel_mse"], rel=0.25)
    assert out["summary"]["mse"]["rel_mse"] < out["summary"]["minmax"]["rel_mse"]


@pytest.mark.parametrize(
    "argv",
    [
        ["theory", "--bits", "12"],
        ["theory", "--bits", "3", "--quantizers", "nope"],
        ["analyze", "missing-file.safetensors", "--bits", "4"],
        ["analyze", "__FILE__", "--bits", "4", "--granularity", "group:0"],
        ["theory"],
    ],
)
def test_errors_are_one_line_exit_2(argv: list[str], tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.randn(4, 8)}, str(path))
    argv = [str(path) if a == "__FILE__" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfquant: error:")


def test_pickle_that_runs_code_is_refused(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": Evil()}}, f)
    assert main(["analyze", str(path), "--bits", "4"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()
