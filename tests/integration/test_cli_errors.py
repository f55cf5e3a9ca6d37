"""Bad input on the command line: every failure is one line on stderr starting ``dfquant: error:``, exit
status 2, no traceback, and no output file (nor temporary file) left behind.

The models are tiny ``.safetensors`` state dicts built by a ``--builder`` module written to a temporary
folder, so the cases need no assets. Most cases call :func:`dfquant.cli.main.main` in-process (an exception
escaping it would fail the test); two run the real command in a subprocess to check what a user's terminal
gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dfquant.cli.main import main

BUILDERS = """
import torch
from torch import nn


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def other() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
"""
MODULE = "dfquant_cli_test_builders"


@dataclass(frozen=True)
class Files:
    """The inputs the cases refer to (``{name}`` in an argument list)."""

    folder: Path

    def path(self, name: str) -> str:
        return str(self.folder / name)


def _write_dfquant_file(folder: Path) -> Path:
    from dfquant.config import LayerRule, QuantConfig
    from dfquant.io.save import save_quantized
    from dfquant.pipeline.quantize import quantize_model
    from dfquant.zoo import load_model

    loaded = load_model(folder / "tiny.safetensors", builder=f"{MODULE}:tiny")
    q, report = quantize_model(loaded.model, QuantConfig(LayerRule("minmax", 4)))
    return save_quantized(q, folder / "good.safetensors", source=loaded.source, report=report)


def _rewrite_manifest(src: Path, dest: Path, edit) -> None:  # type: ignore[no-untyped-def]
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    manifest = json.loads(meta["dfquant"])
    edit(manifest)
    save_file(load_file(src), str(dest), metadata={"dfquant": json.dumps(manifest)})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    folder = tmp_path_factory.mktemp("cli-inputs")
    (folder / f"{MODULE}.py").write_text(BUILDERS)
    sys.path.insert(0, str(folder))
    try:
        import importlib

        mod = importlib.import_module(MODULE)
        tiny = mod.tiny().state_dict()
        save_file(tiny, str(folder / "tiny.safetensors"))
        save_file(mod.other().state_dict(), str(folder / "other.safetensors"))
        nan = {k: v.clone() for k, v in tiny.items()}
        nan["2.weight"][1, 3] = float("nan")
        save_file(nan, str(folder / "nan.safetensors"))
        data = (folder / "tiny.safetensors").read_bytes()
        (folder / "truncated.safetensors").write_bytes(data[: len(data) - 40])
        (folder / "corrupt.safetensors").write_bytes(os.urandom(3000))
        (folder / "config.json").write_text('{"default": {"bitz": 4}}')
        good = _write_dfquant_file(folder)
        gdata = good.read_bytes()
        (folder / "good_truncated.safetensors").write_bytes(gdata[: len(gdata) // 2])
        _rewrite_manifest(
            good,
            folder / "good_wrong_source.safetensors",
            lambda m: m.update(source={"zoo": "cifar-resnet20"}),
        )
        yield Files(folder)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)


B = f"--builder={MODULE}:tiny"
Q = ["quantize", "{tiny.safetensors}", B, "--out", "{OUT}/q.safetensors"]

CASES = {
    # missing files
    "quantize-missing-file": (
        ["quantize", "{missing.safetensors}", B, "--out", "{OUT}/q.safetensors"],
        "no such",
    ),
    "eval-missing-file": (["eval", "{missing.safetensors}"], "No such file"),
    "inspect-missing-file": (["inspect", "{missing.safetensors}"], "No such file"),
    # corrupt files
    "quantize-corrupt-file": (
        ["quantize", "{corrupt.safetensors}", B, "--out", "{OUT}/q.safetensors"],
        "not a readable safetensors",
    ),
    "eval-corrupt-file": (["eval", "{corrupt.safetensors}"], "corrupt.safetensors"),
    "inspect-corrupt-file": (["inspect", "{corrupt.safetensors}"], "corrupt.safetensors"),
    "eval-plain-safetensors": (["eval", "{tiny.safetensors}"], "not a file written by dfquant"),
    # a file from another model
    "quantize-weights-of-another-model": (
        ["quantize", "{other.safetensors}", B, "--out", "{OUT}/q.safetensors"],
        "does not fit the module",
    ),
    "eval-with-another-architecture": (
        ["eval", "{good.safetensors}", f"--builder={MODULE}:other"],
        "is a Linear with {'in_features': 8, 'out_features': 32} in the model built from",
    ),
    "eval-file-naming-another-model": (["eval", "{good_wrong_source.safetensors}"], "cifar-resnet20"),
    # truncated safetensors files
    "quantize-truncated-file": (
        ["quantize", "{truncated.safetensors}", B, "--out", "{OUT}/q.safetensors"],
        "truncated.safetensors",
    ),
    "eval-truncated-file": (["eval", "{good_truncated.safetensors}", B], "truncated"),
    "inspect-truncated-file": (["inspect", "{good_truncated.safetensors}"], "truncated"),
    # NaN weights
    "quantize-nan-weights": (
        ["quantize", "{nan.safetensors}", B, "--out", "{OUT}/q.safetensors"],
        "tensor '2.weight' has 1 NaN",
    ),
    # rules
    "unknown-method": ([*Q, "--method", "nope"], "unknown quantizer 'nope'"),
    "bits-too-high": ([*Q, "--bits", "9"], "1..8"),
    "bits-zero": ([*Q, "--bits", "0"], "1..8"),
    "bits-the-rule-lacks": ([*Q, "--method", "nf4", "--bits", "3"], "nf4"),
    "bits-not-a-number": ([*Q, "--bits", "four"], "invalid int value"),
    "unknown-scale-dtype": ([*Q, "--scale-dtype", "float8"], "float8"),
    "bad-config-file": ([*Q, "--config", "{config.json}"], "bitz"),
    "bad-granularity": ([*Q, "--granularity", "group:0"], "group:0"),
    # evaluation tasks
    "quantize-unknown-task": ([*Q, "--eval", "nope"], "unknown evaluation task 'nope'"),
    "eval-unknown-task": (["eval", "{good.safetensors}", B, "--eval", "nope"], "unknown evaluation task"),
    "task-for-another-kind": ([*Q, "--eval", "stsb"], "needs a model of kind sentence-encoder"),
    "eval-limit-zero": ([*Q, "--eval", "fidelity", "--eval-limit", "0"], "--eval-limit"),
    # fails after quantizing (the fidelity check cannot feed a module with no input shape): no file either
    "task-fails-after-quantizing": ([*Q, "--eval", "fidelity"], "input shape"),
    # outputs
    "out-folder-missing": (
        ["quantize", "{tiny.safetensors}", B, "--out", "{OUT}/no/q.safetensors"],
        "/no' does not exist",
    ),
    "out-is-a-folder": (["quantize", "{tiny.safetensors}", B, "--out", "{OUT}"], "is a folder"),
    "unknown-model-name": (["quantize", "no-such-model", "--out", "{OUT}/q.safetensors"], "unknown model"),
    # devices
    "unknown-device": ([*Q, "--device", "tpu"], "--device must be one of auto, cpu, cuda or cuda:N, got 'tpu'"),
    "device-the-machine-lacks": ([*Q, "--device", "cuda:7"], "use --device cpu or auto"),
    "eval-unknown-device": (["eval", "{good.safetensors}", B, "--device", "gpu"], "--device must be one of"),
    "dfmpc-on-a-named-device": ([*Q, "--method", "dfmpc", "--device", "cuda:7"], "cuda:7"),
    # bit budgets
    "budget-zero": ([*Q, "--budget", "0"], "'budget' must be a number of bits per weight in (0, 64], got 0"),
    "budget-bits-without-budget": ([*Q, "--budget-bits", "2,3"], "give --budget too"),
    "budget-bits-not-numbers": ([*Q, "--budget", "3", "--budget-bits", "two"], "--budget-bits must be"),
    "budget-bits-out-of-range": ([*Q, "--budget", "3", "--budget-bits", "0,4"], "bit widths from 1 to 16"),
    "budget-without-synthetic-inputs": ([*Q, "--budget", "3"], "input shape"),
    "dfmpc-with-budget": ([*Q, "--method", "dfmpc", "--budget", "3"], "not --budget"),
    # balancing
    "balance-unknown-mode": ([*Q, "--balance", "always"], "argument --balance: invalid choice: 'always'"),
    "dfmpc-with-balance": ([*Q, "--method", "dfmpc", "--balance"], "not --balance"),
    # options of the --method rule
    "options-not-key-value": ([*Q, "--method", "mse", "--options", "weighting"], "--options: expected KEY=VALUE"),
    "options-unknown-key": (
        [*Q, "--method", "mse", "--options", "nope=1"],
        "quantizer 'mse' got unknown option(s) ['nope']; allowed: grid, coarse, fine, weighting",
    ),
}


def _argv(template: list[str], files: Files, out: Path) -> list[str]:
    argv = []
    for a in template:
        a = a.replace("{OUT}", str(out))
        if a.startswith("{") and a.endswith("}"):
            a = files.path(a[1:-1])
        argv.append(a)
    return argv


def _check_error(code: int, err: str, needle: str) -> None:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("dfquant: error: "), lines
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_no_file(
    case: str, files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template, needle = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(os.listdir(files.folder))
    try:
        code = main(_argv(template, files, out))
    except SystemExit as e:  # argparse usage errors
        code = int(e.code or 0)
    captured = capsys.readouterr()
    _check_error(code, captured.err, needle)
    assert os.listdir(out) == [], f"left behind: {os.listdir(out)}"
    assert sorted(os.listdir(files.folder)) == before


def test_good_input_works_end_to_end(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same inputs, used correctly, succeed: the failures above are about the input, not the setup."""
    out = tmp_path / "q.safetensors"
    argv = [
        *_argv(Q[:3], files, tmp_path),
        "--out",
        str(out),
        "--method",
        "minmax",
        "--scale-dtype",
        "float16",
    ]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # 4-bit codes plus one float16 scale per output channel: rows of 8 (16 x 8) and 16 (4 x 16) weights
    assert result["bits_per_weight"] == pytest.approx((128 * (4 + 16 / 8) + 64 * (4 + 16 / 16)) / 192)
    assert result["size_bytes"] == out.stat().st_size and sorted(os.listdir(tmp_path)) == ["q.safetensors"]
    assert main(["eval", str(out), B, "--json"]) == 2  # the tiny module has no input shape for fidelity
    assert "input shape" in capsys.readouterr().err
    assert main(["inspect", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["layers"]["0"]["terms"][0]["scale_dtype"] == "float16"


def _run(argv: list[str], files: Files) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(files.folder), *sys.path])}
    env.pop("DFQUANT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "dfquant.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("case", ["quantize-nan-weights", "task-fails-after-quantizing"])
def test_real_process_stderr(case: str, files: Files, tmp_path: Path) -> None:
    template, needle = CASES[case]
    proc = _run(_argv(template, files, tmp_path), files)
    _check_error(proc.returncode, proc.stderr, needle)
    assert os.listdir(tmp_path) == []


def test_unexpected_exceptions_are_one_line_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failure dfquant did not foresee still ends in one line (and DFQUANT_DEBUG=1 re-raises it)."""
    import dfquant.cli.inspect as cm

    def boom(args: object) -> dict:
        raise TypeError("something\nbroke")

    monkeypatch.setattr(cm, "cmd_inspect", boom)
    monkeypatch.delenv("DFQUANT_DEBUG", raising=False)
    assert main(["inspect", "x.safetensors"]) == 2
    _check_error(2, capsys.readouterr().err, "unexpected TypeError: something broke")
    monkeypatch.setenv("DFQUANT_DEBUG", "1")
    with pytest.raises(TypeError):
        main(["inspect", "x.safetensors"])


def test_warnings_are_held_back_on_failure(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import warnings

    import dfquant.cli.inspect as cm
    from dfquant.errors import ConfigError

    def warn_then(fail: bool):  # type: ignore[no-untyped-def]
        def cmd(args: object) -> dict:
            warnings.warn("a warning", UserWarning, stacklevel=1)
            if fail:
                raise ConfigError("it failed")
            return {}

        return cmd

    monkeypatch.setattr(cm, "cmd_inspect", warn_then(True))
    assert main(["inspect", "x"]) == 2
    _check_error(2, capsys.readouterr().err, "it failed")
    monkeypatch.setattr(cm, "cmd_inspect", warn_then(False))
    assert main(["inspect", "x"]) == 0
    assert capsys.readouterr().err == "dfquant: warning: a warning\n"


@pytest.mark.assets
def test_checkpoint_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real ResNet-32 checkpoint given to the ResNet-20 loader."""
    from conftest import require_asset

    ckpt = require_asset("cifar10-resnet", "resnet32-d509ac18.th")
    code = main(["quantize", "cifar-resnet20", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q.safetensors")])
    _check_error(code, capsys.readouterr().err, "holds a CIFAR ResNet-32")
    assert os.listdir(tmp_path) == []


def test_options_of_the_method_rule_reach_the_file(
    files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--options`` sets the options of the ``--method`` rule, as a config file's ``options`` would, and the
    file records them in every term."""
    from dfquant.io.manifest import read_manifest

    out = tmp_path / "q.safetensors"
    argv = ["quantize", files.path("tiny.safetensors"), B, "--method", "lloyd-optimal", "--bits", "3"]
    assert main([*argv, "--options", "weighting=input-variance", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    layers = read_manifest(out)["layers"]
    assert layers and all(
        t["quantizer"] == "lloyd-optimal" and t["options"] == {"weighting": "input-variance"}
        for lay in layers.values()
        for t in lay["terms"]
    )
