"""PyTorch checkpoints whose pickle would run code are refused (``weights_only=True``, no unsafe fallback), by
the library and by the command line, and the code never runs.

The hostile checkpoint holds a real CIFAR ResNet-20 state dict plus an object whose ``__reduce__`` makes
unpickling write a marker file. An unsafe ``torch.load(weights_only=False)`` of the same file does write the
marker (so the file really is hostile); every dfquant entry point refuses it and the marker never appears.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfquant.cli.main import main
from dfquant.errors import FileFormatError
from dfquant.io.checkpoints import load_state_dict
from dfquant.zoo.cifar_resnet import load_cifar_resnet


class _WritesMarker:
    """Unpickling this object runs ``exec`` on code that writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _resnet20_state() -> dict[str, torch.Tensor]:
    from dfquant.zoo import build_architecture

    return build_architecture({"zoo": "cifar-resnet20"}).state_dict()


@pytest.fixture(params=["zip", "legacy"])
def evil(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "marker.txt"
    path = tmp_path / f"evil-{request.param}.th"
    payload = {"state_dict": _resnet20_state(), "epoch": 200, "hook": _WritesMarker(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=request.param == "zip")
    # the file is really hostile: an unsafe load runs the code
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()
    return path, marker


def test_library_refuses_code_in_a_pickle(evil: tuple[Path, Path]) -> None:
    path, marker = evil
    with pytest.raises(FileFormatError, match=r"refused: it is not a plain tensor checkpoint"):
        load_state_dict(path)
    with pytest.raises(FileFormatError, match="refused"):
        load_cifar_resnet(20, path)
    assert not marker.exists()


def test_cli_refuses_code_in_a_pickle(
    evil: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = evil
    out = tmp_path / "out"
    out.mkdir()
    for argv in (
        ["quantize", "cifar-resnet20", "--checkpoint", str(path), "--out", str(out / "q.safetensors")],
        ["analyze", str(path), "--bits", "4"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("dfquant: error: ") and "refused" in err[0], err
        assert not marker.exists()
    assert os.listdir(out) == []


def test_real_process_refuses_code_in_a_pickle(evil: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = evil
    proc = subprocess.run(
        [sys.executable, "-m", "dfquant.cli", "quantize", "cifar-resnet20", "--checkpoint", str(path), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "DFQUANT_DEBUG"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_the_same_checkpoint_without_the_hook_loads(tmp_path: Path) -> None:
    """The refusal is about the code, not the format: the plain checkpoint loads and quantizes."""
    path = tmp_path / "plain.th"
    torch.save({"state_dict": _resnet20_state(), "epoch": 200}, path)
    loaded = load_cifar_resnet(20, path)
    assert sum(p.numel() for p in loaded.model.parameters()) == 269_722
