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
from pathlib import Path
from typing import Any

from dfquant.cli.common import add_common, check_tasks, load_model_arg, parse_tasks
from dfquant.errors import ConfigError
from dfquant.quantizers import quantizer_class
from dfquant.report.tradeoff import table_markdown, tradeoff_sweep, write_tradeoff


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


def cmd_tradeoff(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the grid; write the table and plot; return the points."""

    tasks = parse_tasks(args.eval)
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
    loaded = load_model_arg(args)
    check_tasks(tasks, loaded)

    def say(p: dict[str, Any]) -> None:
        if not args.json and not args.quiet:
            print(
                f"{p['kind']:<5} W{p['bits']} K={p['order']} sparsity {p['sparsity']:.2f}: BOPs {p['bops']:.4g}, "
                f"{p['metric']} {p['value']:.4g}"
            )

    result = tradeoff_sweep(
        loaded,
        task,
        method=method,
        bits=args.bits,
        orders=orders,
        sparsities=sparsities,
        plain_bits=plain_bits,
        plain_method=args.plain_method,
        residual_method=args.residual_method,
        granularity=args.granularity,
        act_bits=args.act_bits,
        bias_correction=not args.no_bias_correction,
        eval_limit=args.eval_limit,
        on_point=say,
    )
    files = write_tradeoff(out_dir, result, plot=not args.no_plot) if out_dir is not None else []
    if not args.json:
        print(table_markdown(result["points"], result["verdict"], result["title"]))
    return {**result, "files": files}


def add_command(sub: Any) -> None:
    """Register ``tradeoff`` on the ``dfquant`` subcommand parser."""

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
    add_common(p)
    p.set_defaults(func=cmd_tradeoff)
