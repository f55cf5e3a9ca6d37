"""The `theory` and `analyze` commands: JSON shape, figures, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dfquant.cli.main import main


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _no_constants(name: str) -> None:
    raise AssertionError(f"the JSON holds {name}, which strict JSON does not allow")


def test_theory_json_is_keyed_by_quantizer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["theory", "--dist", "gaussian", "--bits", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=_no_constants)
    assert "minmax" in out and "mse" in out
    # Lloyd-Max 4-bit Gaussian quantizer: MSE 0.009497 (Max 1960, Table II)
    assert out["lloyd-max"]["mse"] == pytest.approx(0.009497, rel=2e-3)
    assert len(out["mse"]["levels"]) == 16
    covered = {name for name, row in out.items() if row["covered"]}
    assert set(out) - covered == {"dorefa", "mxfp4", "nvfp4"}  # ternary has no 4-bit form
    for name, row in out.items():
        if row["covered"]:
            assert row["mse"] > 0 and row["sqnr_db"] > 0, name
        else:
            assert row["mse"] is None and row["sqnr_db"] is None and "no error model" in row["reason"], name


def test_theory_of_only_uncovered_rules_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["theory", "--bits", "2", "--quantizers", "ternary", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "covers none of the rules asked for (ternary)" in captured.err


def test_theory_text_lists_uncovered_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["theory", "--bits", "4", "--quantizers", "nf4,mxfp4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (mx,) = [line for line in lines if line.startswith("mxfp4")]
    assert "not covered" in mx
    (nf4,) = [line for line in lines if line.startswith("nf4")]
    assert "not covered" not in nf4 and "19.64" in nf4  # NF4's expected SQNR on a unit Gaussian, groups of 1024


def test_json_ready_writes_non_finite_numbers_as_null() -> None:
    import numpy as np

    from dfquant.cli.common import json_ready

    got = json_ready(
        {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": torch.tensor([1.0, float("nan")])}
    )
    assert got == {"a": None, "b": [None, None, 1.5], "c": [1.0, None]}
    assert json_ready({"n": np.int64(3), "x": np.float32(0.5), "t": (1, 2)}) == {"n": 3, "x": 0.5, "t": [1, 2]}


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
