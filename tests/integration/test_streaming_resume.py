"""A streaming run killed halfway and started again ends with the bytes of an uninterrupted run."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfquant.stream.synthetic import SyntheticSpec, make_checkpoint

pytestmark = pytest.mark.slow

ARGS = ["--method", "minmax", "--bits", "4", "--granularity", "group:32", "--json"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dfquant.cli", "quantize", *args]


def test_kill_and_resume_is_byte_identical(tmp_path: Path) -> None:
    spec = SyntheticSpec(hidden=128, intermediate=352, layers=4, vocab=512, heads=4, kv_heads=2)
    ckpt = make_checkpoint(tmp_path / "in", spec, 6)
    ref = tmp_path / "ref"
    subprocess.run(_cli(str(ckpt), "--out", str(ref), *ARGS), check=True, capture_output=True)

    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    proc = subprocess.Popen(_cli(str(ckpt), "--out", str(out), *ARGS), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (work.is_dir() and any(work.glob("*.done.json"))):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in work.glob("*.done.json"))
    assert 1 <= len(done) < 6, done  # killed halfway: some shards finished, not all
    assert not out.exists()  # nothing published

    res = subprocess.run(_cli(str(ckpt), "--out", str(out), *ARGS), check=True, capture_output=True, text=True)

    summary = json.loads(res.stdout)["streaming"]
    assert summary["resumed_shards"] >= len(done)
    assert not work.exists()
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    assert all(filecmp.cmp(ref / n, out / n, shallow=False) for n in names)
