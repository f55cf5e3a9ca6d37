"""``dfquant report``: the HTML page renders in headless Chromium with its plots and sortable table and no
console errors. The screenshots are kept as test artifacts under ``results/report-screenshots/`` (git-ignored).

Chromium is Debian's ``chromium`` package, installed by ``make setup`` / ``make test``
(``scripts/ensure_chromium.sh``). When it is missing the test fails with a message saying how to install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dfquant.cli.main import main
from dfquant.errors import FileFormatError
from dfquant.report.html import render_report, write_atomic
from shared_models import mlp

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
ARTIFACTS = ROOT / "results" / "report-screenshots"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "headless Chromium is needed to check the HTML report and is not installed: run `make setup` "
        "(scripts/ensure_chromium.sh) or `apt-get install -y chromium`",
        pytrace=False,
    )


def _browse(page: Path, shot: Path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and the console lines Chromium logged; writes a screenshot."""
    exe = _chromium()
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    base += ["--disable-extensions", "--disable-background-networking", f"--user-data-dir={shot.parent / '.profile'}"]
    env = {**os.environ, "HOME": str(shot.parent)}
    dom = subprocess.run(
        [*base, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    snap = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert snap.returncode == 0 and shot.is_file(), snap.stderr[-2000:]
    return dom.stdout, console


def _check_rendered(dom: str, console: list[str], rows: int, plots: int) -> None:
    assert console == [], f"console messages: {console}"
    assert re.search(r'<body[^>]*data-ready="1"', dom), "the page's script did not finish"
    errors = re.findall(r"__reportErrors", dom)
    assert errors, "the error trap is missing"
    table = re.search(r"<table id=\"layers\">(.*?)</table>", dom, re.S)
    assert table is not None
    assert len(re.findall(r"<tr>", table.group(1))) == rows + 1  # header + one per layer
    assert len(re.findall(r'<svg class="plot"', dom)) == plots
    assert "http://" not in dom and "https://" not in dom  # self-contained: nothing to fetch


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def test_report_of_a_saved_file_renders_in_chromium(artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "file-report.html"
    assert main(["report", str(DATA / "format_v2_compat.safetensors"), "--out", str(out), "--quiet"]) == 0
    text = out.read_text()
    dom, console = _browse(out, artifacts / "report-file.png")
    # 7 layers; 4 histograms (the first 4 layers) + predicted against measured
    _check_rendered(dom, console, rows=7, plots=5)
    assert dom.count('class="level"') == 16 + 16 + 8 + 8  # the levels of emb, conv (4-bit), mix, lloyd (3-bit)
    assert _png_size(artifacts / "report-file.png") == (1200, 2400)
    assert (artifacts / "report-file.png").stat().st_size > 20_000  # a page with plots, not a blank image
    assert "<script src" not in text and "<link" not in text


def test_report_of_a_json_result_with_points_renders(artifacts: Path, tmp_path: Path) -> None:
    from dfquant.config import LayerRule, PatternRule, QuantConfig
    from dfquant.pipeline.quantize import quantize_model

    torch.manual_seed(0)
    model = mlp(32, 64, 64, 10)
    cfg = QuantConfig(LayerRule("lloyd-max", 3, "group:16"), rules=(PatternRule("4", quantizer="minmax", bits=4),))
    _, report = quantize_model(model, cfg)
    result = {
        "model": "mlp",
        "method": "lloyd-max",
        "bits": 3,
        "bits_per_weight": report.bits_per_weight,
        "layers": report.to_dict()["layers"],
        "report": report.to_dict(),
        "eval": {"cifar10": {"float": {"top1": 0.91}, "quantized": {"top1": 0.88}}},
        "points": [
            {"label": "W2", "bops": 1.1e9, "accuracy": 0.52},
            {"label": "W3", "bops": 1.6e9, "accuracy": 0.86},
            {"label": "W4", "bops": 2.2e9, "accuracy": 0.90},
            {"label": "W3 REx K=2", "bops": 3.2e9, "accuracy": 0.905},
        ],
    }
    src = tmp_path / "result.json"
    src.write_text(json.dumps(result))
    html, counts = render_report(src, ["0", "2"])
    assert counts == {"rows": 3, "histograms": 2, "plots": 4}
    page = tmp_path / "json-report.html"
    page.write_text(html)
    dom, console = _browse(page, artifacts / "report-json.png")
    _check_rendered(dom, console, rows=3, plots=4)
    assert dom.count('class="pt"') == 3 + 4  # predicted/measured per layer + the trade-off points
    assert "cifar10 top1" in dom and "0.91 -&gt; 0.88" in dom


def test_sortable_table_sorts_in_the_browser(tmp_path: Path, artifacts: Path) -> None:
    """A page whose script sorts the table by rel_mse on load (through the page's own sort function): the DOM
    Chromium returns lists the layers in increasing measured error."""
    html, _ = render_report(DATA / "format_v2_compat.safetensors")
    cols = re.search(r"<thead><tr>(.*?)</tr></thead>", html).group(1)  # type: ignore[union-attr]
    col = re.findall(r"<th>(.*?)</th>", cols).index("rel_mse")
    page = tmp_path / "sorted.html"
    page.write_text(html.replace("</body>", f"<script>dfquantSortBy({col}, false);</script></body>"))
    dom, console = _browse(page, artifacts / "report-sorted.png")
    assert console == []
    body = re.search(r'<table id="layers">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)  # type: ignore[union-attr]
    values = [float(re.findall(r'data-v="([^"]*)"', row)[col]) for row in re.findall(r"<tr>(.*?)</tr>", body)]
    assert len(values) == 7 and values == sorted(values)
    assert 'class="sorted-asc"' in dom


def test_console_errors_are_caught(tmp_path: Path, artifacts: Path) -> None:
    """The checks above would see a broken page: an error in a script shows on the console."""
    html, _ = render_report(DATA / "format_v2_compat.safetensors")
    page = tmp_path / "broken.html"
    page.write_text(html.replace("</body>", "<script>noSuchFunction();</script></body>"))
    _, console = _browse(page, artifacts / "report-broken.png")
    assert any("noSuchFunction" in line for line in console)


def test_report_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes((DATA / "format_v2_compat.safetensors").read_bytes()[:500])
    for argv, needle in (
        (["report", str(bad)], "not valid JSON"),
        (["report", str(truncated)], "t.safetensors"),
        (["report", str(DATA / "format_v2_compat.safetensors"), "--layers", "nope"], "no layer 'nope'"),
        (["report", str(tmp_path / "missing.json")], "cannot read"),
        (["report", str(DATA / "format_v2_compat.safetensors"), "--out", str(tmp_path / "no" / "r.html")], "does not"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("dfquant: error: ") and needle in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "t.safetensors"]


def test_report_write_is_atomic_on_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "r.html"
    dest.write_text("previous")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FileFormatError, match="No space left on device"):
        write_atomic(dest, b"<html>" * 1000)
    assert dest.read_text() == "previous" and os.listdir(tmp_path) == ["r.html"]
