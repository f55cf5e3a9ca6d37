"""Accuracy against bit operations over a grid of residual expansions (REx) and plain reference points.

:func:`tradeoff_sweep` quantizes a model with every expansion order ``K`` and group sparsity (orders ``k >= 2``
only) and with plain one-term quantization at the reference bit widths, evaluates each on one task, and returns
the points; :func:`pareto_verdict` says, for each expansion point, whether plain quantization at the same BOPs
(interpolated between its neighbours) does better (like Figure 2 of Yvinec et al., "REx: Data-Free Residual
Quantization Error Expansion", NeurIPS 2023). BOPs per input are ``MACs x weight bits x activation bits``
summed over terms (:mod:`dfquant.report.cost`). :func:`write_tradeoff` writes the CSV, markdown and PNG.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dfquant.config import LayerRule, QuantConfig
from dfquant.errors import ConfigError
from dfquant.eval import evaluate
from dfquant.io.atomic import write_atomic
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers.granularity import Granularity
from dfquant.report.cost import model_cost

#: The headline figure of each task in the quantized model's results and whether higher is better.
HEADLINES: dict[str, tuple[str, bool]] = {
    "cifar10": ("top1", True),
    "stsb": ("spearman", True),
    "wikitext2": ("ppl", False),
    "fidelity": ("agreement", True),
    "pairs": ("spearman", True),
}


#: Tasks whose quantized figures need the float model evaluated on the same inputs.
PAIRED_TASKS = ("cifar10", "fidelity")


def headline(task: str, result: dict[str, Any]) -> tuple[str, float, bool]:
    """``(metric name, value, higher is better)`` of a quantized model's evaluation result."""
    name, higher = HEADLINES.get(task, ("agreement", True))
    q = result.get("quantized", {})
    if name not in q:
        name = next((k for k, v in q.items() if isinstance(v, int | float)), name)
    return name, float(q.get(name, float("nan"))), higher


def pareto_verdict(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each expansion point (order >= 2), the plain reference points compared at equal or lower BOPs.

    Returns rows ``{"order", "sparsity", "bits", "bops", "metric", "value", "best_plain_bits",
    "best_plain_value", "beats_plain", "plain_at_bops", "beats_plain_curve"}``: ``best_plain`` is the best plain
    point costing no more BOPs than the expansion (None when every plain point costs more), ``beats_plain``
    whether the expansion is better; ``plain_at_bops`` is the plain curve (its points in BOPs order, linear in
    log BOPs) read at the expansion's BOPs (None outside the curve), ``beats_plain_curve`` whether the
    expansion lies on the better side of it.
    """
    plain = sorted((p for p in points if p["kind"] == "plain"), key=lambda q: q["bops"])
    rows = []
    for p in points:
        if p["kind"] != "rex" or p["order"] < 2:
            continue
        higher = p["higher_is_better"]
        cheaper = [q for q in plain if q["bops"] <= p["bops"] * (1 + 1e-9)]
        best = None
        if cheaper:
            best = max(cheaper, key=lambda q: q["value"] if higher else -q["value"])
        beats = None if best is None else (p["value"] > best["value"] if higher else p["value"] < best["value"])
        curve = _interpolate(plain, p["bops"])
        beats_curve = None if curve is None else (p["value"] > curve if higher else p["value"] < curve)
        rows.append(
            {
                "order": p["order"],
                "sparsity": p["sparsity"],
                "bits": p["bits"],
                "bops": p["bops"],
                "metric": p["metric"],
                "value": p["value"],
                "best_plain_bits": None if best is None else best["bits"],
                "best_plain_value": None if best is None else best["value"],
                "beats_plain": beats,
                "plain_at_bops": curve,
                "beats_plain_curve": beats_curve,
            }
        )
    return rows


def _interpolate(plain: list[dict[str, Any]], bops: float) -> float | None:
    """The plain curve (sorted by BOPs) at ``bops``, linear in ``log(BOPs)``; None outside its span."""
    for a, b in itertools.pairwise(plain):
        if a["bops"] <= bops <= b["bops"] and a["bops"] > 0:
            if b["bops"] == a["bops"]:
                return float(max(a["value"], b["value"]))
            t = math.log(bops / a["bops"]) / math.log(b["bops"] / a["bops"])
            return float(a["value"] + t * (b["value"] - a["value"]))
    if plain and plain[0]["bops"] == bops:
        return float(plain[0]["value"])
    return None


_COLUMNS = ("kind", "bits", "order", "sparsity", "bops", "bops_vs_float", "bits_per_weight", "metric", "value")


def table_csv(points: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_COLUMNS)
    for p in points:
        w.writerow([p[c] for c in _COLUMNS])
    return buf.getvalue()


def table_markdown(points: list[dict[str, Any]], verdict: list[dict[str, Any]], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for p in points:
        cells = [f"{p[c]:.4g}" if isinstance(p[c], float) else str(p[c]) for c in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if verdict:
        lines += ["", "REx against the best plain point at equal or lower BOPs:", ""]
        lines += [
            "| order | sparsity | BOPs | value | best plain at <= BOPs | REx better | plain curve at BOPs "
            "| REx better |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in verdict:
            plain = "-" if v["best_plain_bits"] is None else f"W{v['best_plain_bits']}: {v['best_plain_value']:.4g}"
            curve = "-" if v["plain_at_bops"] is None else f"{v['plain_at_bops']:.4g}"
            lines.append(
                f"| {v['order']} | {v['sparsity']:.2f} | {v['bops']:.4g} | {v['value']:.4g} | {plain} | "
                f"{v['beats_plain']} | {curve} | {v['beats_plain_curve']} |"
            )
    return "\n".join(lines) + "\n"


def plot_png(points: list[dict[str, Any]], title: str) -> bytes:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the plot needs matplotlib: install the 'plots' extra (pip install dfquant[plots])") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plain = [p for p in points if p["kind"] == "plain"]
    if plain:
        ax.plot([p["bops"] for p in plain], [p["value"] for p in plain], "k--o", label="plain W2..W8")
        for p in plain:
            ax.annotate(f"W{p['bits']}", (p["bops"], p["value"]), textcoords="offset points", xytext=(4, -10))
    for s in sorted({p["sparsity"] for p in points if p["kind"] == "rex"}):
        pts = sorted(
            (p for p in points if p["kind"] == "rex" and (p["sparsity"] == s or p["order"] == 1)),
            key=lambda p: p["bops"],
        )
        ax.plot([p["bops"] for p in pts], [p["value"] for p in pts], "-s", label=f"REx, {s:.0%} sparse")
    ax.set_xscale("log")
    ax.set_xlabel("BOPs per input (MACs x weight bits x activation bits, log scale)")
    ax.set_ylabel(points[0]["metric"] if points else "")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def tradeoff_sweep(
    loaded: Any,
    task: str,
    *,
    method: str,
    bits: int,
    orders: Sequence[int],
    sparsities: Sequence[float],
    plain_bits: Sequence[int] = (),
    plain_method: str | None = None,
    residual_method: str | None = None,
    granularity: str | Granularity = "channel",
    act_bits: int | None = None,
    bias_correction: bool = True,
    eval_limit: int | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Quantize ``loaded.model`` at every point of the grid and evaluate each on ``task``.

    The grid: every expansion order ``K`` of ``orders`` at ``bits`` with each sparsity of ``sparsities`` (orders
    ``K >= 2`` only; ``K = 1`` once), then plain one-term quantization at each of ``plain_bits`` with
    ``plain_method`` (default ``method``). Orders ``>= 2`` use ``residual_method`` (default ``method``).

    Args:
        loaded: a :class:`dfquant.zoo.LoadedModel`.
        task: one task of :mod:`dfquant.eval`.
        on_point: called with each point as it is measured.

    Returns:
        ``{"model", "task", "method", "residual_method", "act_bits", "float", "setup", "points", "verdict",
        "title"}``; each point has ``kind`` (``rex`` or ``plain``), ``bits``, ``order``, ``sparsity``, ``bops``,
        ``bops_vs_float``, ``bits_per_weight``, the task's headline ``metric`` and ``value``, and ``eval``.
    """
    grid: list[tuple[str, int, int, float]] = []
    for K in orders:
        for s in sparsities if K > 1 else [0.0]:
            grid.append(("rex", bits, K, s))
    for b in plain_bits:
        grid.append(("plain", b, 1, 0.0))
    both = task in PAIRED_TASKS  # figures computed against the float model on the same inputs
    float_eval = {} if both else evaluate(task, loaded, loaded.model, None, limit=eval_limit)
    points: list[dict[str, Any]] = []
    for kind, b, K, s in grid:
        rule = LayerRule(
            quantizer=method if kind == "rex" else plain_method or method,
            bits=b,
            granularity=Granularity.parse(granularity),
            expand=K,
            sparsity=s,
            act_bits=act_bits,
            residual_quantizer=residual_method if kind == "rex" and K > 1 else None,
        )
        qmodel, report = quantize_model(loaded.model, QuantConfig(rule, bias_correction=bias_correction))
        res = evaluate(task, loaded, loaded.model if both else None, qmodel, limit=eval_limit)
        float_eval = float_eval or res
        cost = model_cost(loaded, report)
        metric, value, higher = headline(task, res)
        points.append(
            {
                "kind": kind,
                "bits": b,
                "order": K,
                "sparsity": s,
                "bops": cost["totals"]["bops"],
                "bops_vs_float": cost["totals"]["bops_vs_float"],
                "bits_per_weight": report.bits_per_weight,
                "metric": metric,
                "value": value,
                "higher_is_better": higher,
                "eval": res.get("quantized", {}),
            }
        )
        if on_point is not None:
            on_point(points[-1])
    return {
        "model": loaded.name,
        "task": task,
        "method": method,
        "residual_method": residual_method,
        "act_bits": act_bits,
        "float": float_eval.get("float", {}),
        "setup": float_eval.get("setup", {}),
        "points": points,
        "verdict": pareto_verdict(points),
        "title": f"{loaded.name}: {method} W{bits} expansions vs plain, {task}",
    }


def write_tradeoff(out_dir: Path, result: dict[str, Any], plot: bool = True) -> list[str]:
    """Write ``tradeoff.csv``, ``tradeoff.md`` and (with ``plot``; needs matplotlib) ``tradeoff.png`` of a
    :func:`tradeoff_sweep` result into ``out_dir``, each atomically; return their paths."""
    points, verdict, title = result["points"], result["verdict"], result["title"]
    write_atomic(out_dir / "tradeoff.csv", table_csv(points).encode())
    write_atomic(out_dir / "tradeoff.md", table_markdown(points, verdict, title).encode())
    files = [str(out_dir / "tradeoff.csv"), str(out_dir / "tradeoff.md")]
    if plot:
        write_atomic(out_dir / "tradeoff.png", plot_png(points, title))
        files.append(str(out_dir / "tradeoff.png"))
    return files
