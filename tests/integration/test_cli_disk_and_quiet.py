"""The command line under a full disk, and ``--quiet``.

* Disk full while writing ``--out`` (the write, the flush to disk or the final rename fails with ENOSPC) is one
  line on stderr, exit status 2, and no output file, complete or partial, nor a temporary file, is left.
* Long commands show progress on a terminal, and ``--quiet`` silences it (checked in a real process whose stderr
  is a pseudo-terminal, since progress is only drawn on terminals).
"""

from __future__ import annotations

import errno
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dfquant.cli.main import main
from shared_models import mlp

BUILDER = """
import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
"""
MODULE = "dfquant_cli_disk_builders"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("disk")
    (folder / f"{MODULE}.py").write_text(BUILDER)
    torch.manual_seed(0)
    model = mlp(16, 32, 32, 8)
    save_file(model.state_dict(), str(folder / "mlp.safetensors"))
    return folder


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_enospc(tensors: object, filename: str, metadata: object = None) -> None:
    Path(filename).write_bytes(b"\0" * 100)  # a partial file on disk, then the disk is full
    _enospc()


@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
def test_disk_full_during_quantize_out(
    where: str, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(inputs))
    out = tmp_path / "out"
    out.mkdir()
    target = {
        "write": "dfquant.io.save.save_file",
        "fsync": "dfquant.io.atomic.os.fsync",
        "rename": "dfquant.io.atomic.os.replace",
    }
    monkeypatch.setattr(target[where], _half_then_enospc if where == "write" else _enospc)
    argv = ["quantize", str(inputs / "mlp.safetensors"), f"--builder={MODULE}:mlp", "--method", "minmax"]
    code = main([*argv, "--out", str(out / "q.safetensors"), "--quiet"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dfquant: error: cannot write") and "No space left on device" in err[0]
    assert os.listdir(out) == []
    monkeypatch.undo()


def test_disk_full_during_report_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = Path(__file__).resolve().parents[1] / "data" / "format_v2_compat.safetensors"
    monkeypatch.setattr("dfquant.report.html.os.replace", _enospc)
    assert main(["report", str(data), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert os.listdir(tmp_path) == []


def _run_on_a_terminal(argv: list[str], cwd: Path, extra_path: Path) -> tuple[int, str]:
    """Run ``dfquant ARGV`` with stderr on a pseudo-terminal; return the exit status and what the terminal got."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(extra_path), *sys.path]), "OMP_NUM_THREADS": "1"}
    env.pop("DFQUANT_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfquant.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 4096)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_and_quiet(inputs: Path, tmp_path: Path) -> None:
    argv = ["quantize", str(inputs / "mlp.safetensors"), f"--builder={MODULE}:mlp", "--method", "minmax"]
    code, shown = _run_on_a_terminal([*argv, "--out", str(tmp_path / "a.safetensors")], tmp_path, inputs)
    assert code == 0, shown
    assert "quantizing [" in shown and "3/3" in shown  # per-layer progress
    code, shown = _run_on_a_terminal([*argv, "--out", str(tmp_path / "b.safetensors"), "--quiet"], tmp_path, inputs)
    assert code == 0, shown
    assert "quantizing" not in shown and "\r" not in shown
    code, shown = _run_on_a_terminal(["analyze", str(inputs / "mlp.safetensors"), "--bits", "4"], tmp_path, inputs)
    assert code == 0 and "[3/3]" in shown
    code, shown = _run_on_a_terminal(
        ["analyze", str(inputs / "mlp.safetensors"), "--bits", "4", "--quiet"], tmp_path, inputs
    )
    assert code == 0 and "[1/3]" not in shown and "\r" not in shown
