"""`dfquant report` reads the points that `dfquant tradeoff --json` writes."""

from __future__ import annotations

import json
from pathlib import Path

from dfquant.report.html import build_page, render_report


def test_tradeoff_points_become_the_bops_plot(tmp_path: Path) -> None:
    points = [
        {"kind": "plain", "bits": 4, "order": 1, "sparsity": 0.0, "bops": 5.2e9, "bits_per_weight": 4.08,
         "metric": "top1", "value": 91.45, "higher_is_better": True, "eval": {"top1": 91.45}},
        {"kind": "rex", "bits": 2, "order": 2, "sparsity": 0.5, "bops": 3.9e9, "bits_per_weight": 3.1,
         "metric": "top1", "value": 78.47, "higher_is_better": True, "eval": {"top1": 78.47}},
    ]  # fmt: skip
    f = tmp_path / "tradeoff.json"
    f.write_text(json.dumps({"model": "cifar-resnet20", "task": "cifar10", "points": points}))
    page = build_page(f)
    assert [(x, y, label, xk, yk) for x, y, label, xk, yk in page["points"]] == [
        (5.2e9, 91.45, "plain W4", "bops", "top1"),
        (3.9e9, 78.47, "rex W2 K=2 s=0.5", "bops", "top1"),
    ]
    html, counts = render_report(f)
    assert "rex W2 K=2 s=0.5" in html
    # no layer table and no histogram in a trade-off file: the one plot is accuracy against bit operations
    assert counts == {"rows": 0, "histograms": 0, "plots": 1}
    assert html.count("<svg") == 1 and "Accuracy against bit operations" in html
