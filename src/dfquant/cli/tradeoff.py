"""``dfquant tradeoff``: accuracy against bit operations over a grid of residual expansions (REx).

``dfquant tradeoff MODEL --bits B --orders 1,2,3,4 --sparsity 0,25,50,75 --eval TASK`` quantizes ``MODEL`` with
every expansion order ``K`` and group sparsity (orders ``k >= 2`` only, so ``K = 1`` is evaluated once),
evaluates each on ``TASK`` and adds plain one-term quantization at 2..8 bits as reference points (like Figure 2
of Yvinec et al., "REx: Data-Free Residual Quantization Error Expansion", NeurIPS 2023). BOPs per input are
``MACs x weight bits x activation bits`` summed over terms (:mod:`dfquant.report.cost`).

With ``--out DIR`` it writes ``DIR/tradeoff.csv``, ``DIR/tradeoff.md`` and ``DIR/tradeoff.png`` (the plot needs
matplotlib: the ``plots`` extra); every file is written atomically. ``--json`` prints
``{"points": [{"bits", "order", "sparsity", "bops", "bits_per_weight", "eval": {...}, ...}], ...}``.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
from pathlib import Path
from typing import Any

from dfquant.errors import ConfigError
from dfquant.io.atomic import write_atomic

__all__ = ["add_command", "cmd_tradeoff", "headline", "pareto_verdict"]

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


def _int_list(text: str, what: str, lo: int, hi: int) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers, got '{text}'") from None
    if not vals or any(not lo <= v <= hi for v in vals):
        raise ConfigError(f"--{what} values must lie in {lo}..{hi}, got '{text}'")
    return sorted(set(vals))


def _sparsities(text: str) -> list[float]:
    out = []
    for v in text.split(","):
        v = v.strip()
        if not v:
            continue
        try:
            x = float(v)
        except ValueError:
            raise ConfigError(f"--sparsity must be comma-separated percentages (0..99), got '{text}'") from None
        if not 0 <= x < 100:
            raise ConfigError(f"--sparsity values are percentages in [0, 100), got {v}")
        out.append(x / 100.0)
    if not out:
        raise ConfigError("--sparsity needs at least one value")
    return sorted(set(out))


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


def _table_csv(points: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_COLUMNS)
    for p in points:
        w.writerow([p[c] for c in _COLUMNS])
    return buf.getvalue()


def _table_md(points: list[dict[str, Any]], verdict: list[dict[str, Any]], title: str) -> str:
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


def _plot(points: list[dict[str, Any]], title: str) -> bytes:
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


def cmd_tradeoff(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the grid; write the table and plot; return the points."""
    from dfquant.cli.quantize import _check_tasks, _cost, _load, _parse_tasks
    from dfquant.config import LayerRule, QuantConfig
    from dfquant.eval import evaluate
    from dfquant.pipeline.quantize import quantize_model
    from dfquant.quantizers import quantizer_class

    tasks = _parse_tasks(args.eval)
    if len(tasks) != 1:
        raise ConfigError(f"--eval takes one task, got '{args.eval}'")
    task = tasks[0]
    orders = _int_list(args.orders, "orders", 1, 16)
    sparsities = _sparsities(args.sparsity)
    plain_bits = _int_list(args.plain_bits, "plain-bits", 1, 8) if args.plain_bits else []
    method = args.method
    quantizer_class(method)
    if args.residual_method:
        quantizer_class(args.residual_method)
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ConfigError(f"--eval-limit must be a positive integer, got {args.eval_limit}")
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None and not out_dir.is_dir():
        raise ConfigError(f"output folder '{out_dir}' does not exist")
    if out_dir is not None and not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("the plot needs matplotlib: install the 'plots' extra, or pass --no-plot") from None
    loaded = _load(args)
    _check_tasks(tasks, loaded)

    grid: list[tuple[str, int, int, float]] = []
    for K in orders:
        for s in sparsities if K > 1 else [0.0]:
            grid.append(("rex", args.bits, K, s))
    for b in plain_bits:
        grid.append(("plain", b, 1, 0.0))

    both = task in PAIRED_TASKS  # figures computed against the float model on the same inputs
    float_eval = {} if both else evaluate(task, loaded, loaded.model, None, limit=args.eval_limit)
    points: list[dict[str, Any]] = []
    for kind, bits, K, s in grid:
        rule = LayerRule(
            quantizer=method if kind == "rex" else args.plain_method or method,
            bits=bits,
            granularity=args.granularity,
            expand=K,
            sparsity=s,
            act_bits=args.act_bits,
            residual_quantizer=args.residual_method if kind == "rex" and K > 1 else None,
        )
        cfg = QuantConfig(rule, bias_correction=not args.no_bias_correction)
        qmodel, report = quantize_model(loaded.model, cfg)
        res = evaluate(task, loaded, loaded.model if both else None, qmodel, limit=args.eval_limit)
        float_eval = float_eval or res
        cost = _cost(loaded, report)
        metric, value, higher = headline(task, res)
        points.append(
            {
                "kind": kind,
                "bits": bits,
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
        if not args.json and not args.quiet:
            print(f"{kind:<5} W{bits} K={K} sparsity {s:.2f}: BOPs {points[-1]['bops']:.4g}, {metric} {value:.4g}")
    verdict = pareto_verdict(points)
    title = f"{loaded.name}: {method} W{args.bits} expansions vs plain, {task}"
    files: list[str] = []
    if out_dir is not None:
        write_atomic(out_dir / "tradeoff.csv", _table_csv(points).encode())
        write_atomic(out_dir / "tradeoff.md", _table_md(points, verdict, title).encode())
        files += [str(out_dir / "tradeoff.csv"), str(out_dir / "tradeoff.md")]
        if not args.no_plot:
            write_atomic(out_dir / "tradeoff.png", _plot(points, title))
            files.append(str(out_dir / "tradeoff.png"))
    if not args.json:
        print(_table_md(points, verdict, title))
    return {
        "model": loaded.name,
        "task": task,
        "method": method,
        "residual_method": args.residual_method,
        "act_bits": args.act_bits,
        "float": float_eval.get("float", {}),
        "setup": float_eval.get("setup", {}),
        "points": points,
        "verdict": verdict,
        "files": files,
    }


def add_command(sub: Any) -> None:
    """Register ``tradeoff`` on the ``dfquant`` subcommand parser."""
    from dfquant.cli.main import _common

    p = sub.add_parser("tradeoff", help="accuracy against BOPs over residual expansion orders and sparsities")
    p.add_argument("model", help="zoo name (cifar-resnet20, minilm, ...) or a local path")
    p.add_argument("--bits", type=int, required=True, help="bits of every expansion order")
    p.add_argument("--orders", default="1,2,3,4", help="expansion orders K (default 1,2,3,4)")
    p.add_argument("--sparsity", default="0", help="percentages of channels dropped from orders >= 2 (default 0)")
    p.add_argument("--eval", required=True, help="one task: cifar10, stsb, wikitext2, fidelity, pairs")
    p.add_argument("--eval-limit", type=int, help="evaluate on fewer items (windows, pairs, images)")
    p.add_argument("--method", default="minmax", help="quantizer of the first order (default minmax)")
    p.add_argument("--residual-method", help="quantizer of orders >= 2 (default: --method)")
    p.add_argument("--plain-method", help="quantizer of the plain reference points (default: --method)")
    p.add_argument("--plain-bits", default="2,3,4,5,6,7,8", help="bits of the plain reference points ('' for none)")
    p.add_argument("--granularity", default="channel", help="tensor | channel | group:G (default channel)")
    p.add_argument("--act-bits", type=int, help="quantize and expand every layer's input to A bits (default float)")
    p.add_argument("--no-bias-correction", action="store_true", help="skip data-free bias correction")
    p.add_argument("--checkpoint", help="weights file for zoo models that take one (cifar-resnet*)")
    p.add_argument("--builder", help="module:callable building the architecture of a .safetensors state dict")
    p.add_argument("--out", help="folder for tradeoff.csv, tradeoff.md and tradeoff.png")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (no matplotlib needed)")
    _common(p)
    p.set_defaults(func=cmd_tradeoff)
