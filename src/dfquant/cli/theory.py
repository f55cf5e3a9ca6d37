"""``dfquant theory`` (levels and expected MSE of each rule for a unit-variance source) and ``dfquant analyze``
(per-tensor fit and measured against predicted error of each rule).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from dfquant.cli.common import add_common
from dfquant.errors import DfquantError
from dfquant.io.checkpoints import load_state_dict
from dfquant.quantizers import Granularity
from dfquant.report.analysis import analyze_tensor, quantizer_variants, summarize, theory, weight_tensors

# ------------------------------------------------------------------------------------------------------------
# theory


def cmd_theory(args: argparse.Namespace) -> dict[str, Any]:

    names = args.quantizers.split(",") if args.quantizers else None
    result = theory(args.dist, args.bits, group_size=args.group_size, names=names)
    if not args.json:
        print(
            f"unit-variance {args.dist} source, {args.bits} bits (sample-dependent clips: groups of {args.group_size})"
        )
        print(f"{'quantizer':<18} {'grid':<18} {'MSE':>11} {'SQNR dB':>8}  clip / levels")
        for name, row in result.items():
            if not row["covered"]:
                print(f"{name:<18} {row['grid']:<18} {'-':>11} {'-':>8}  not covered: {row['reason']}")
                continue
            lv = row.get("levels")
            shown = ""
            if lv is not None:
                shown = f"{row['clip']:.4f}"
                if len(lv) <= 16:
                    shown += "  [" + ", ".join(f"{v:.4f}" for v in lv) + "]"
            sqnr = "inf" if row["sqnr_db"] is None else f"{row['sqnr_db']:.2f}"
            print(f"{name:<18} {row['grid']:<18} {row['mse']:>11.6g} {sqnr:>8}  {shown}")
    return result


# ------------------------------------------------------------------------------------------------------------
# analyze


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:

    Granularity.parse(args.granularity)
    state = load_state_dict(args.file)
    weights = weight_tensors(state)
    if not weights:
        raise DfquantError(f"'{args.file}' holds no weight tensors (floating tensors with 2 or more dimensions)")
    names = args.quantizers.split(",") if args.quantizers else None
    rules = quantizer_variants(args.bits, names)
    layers = []
    items = list(weights.items())
    for i, (name, w) in enumerate(items):
        if not args.quiet and not args.json:
            sys.stderr.write(f"\r[{i + 1}/{len(items)}] {name:<60}")
            sys.stderr.flush()
        layers.append(analyze_tensor(w, args.bits, args.granularity, rules, name=name))
    if not args.quiet and not args.json:
        sys.stderr.write("\r" + " " * 72 + "\r")
    summary = summarize(layers)
    if not args.json:
        _print_analysis(layers, summary, args)
    return {
        "file": str(args.file),
        "bits": args.bits,
        "granularity": args.granularity,
        "layers": [lay.to_dict() for lay in layers],
        "summary": summary,
    }


def _print_analysis(layers: list[Any], summary: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    names = list(summary)
    print(f"{args.file}: {len(layers)} weight tensors, {args.bits} bits, granularity {args.granularity}")
    print("relative MSE measured (predicted); * marks the best rule of each layer")
    head = f"{'layer':<28} {'shape':<16} {'dist':<8} {'KS g/l':<11}"
    print(head + "".join(f" {n:>21}" for n in names))
    for lay in layers:
        best = min(lay.methods, key=lambda m: lay.methods[m]["rel_mse"])
        cells = ""
        for n in names:
            m = lay.methods[n]
            pred = "" if math.isnan(m["pred_rel_mse"]) else f"({m['pred_rel_mse']:.2e})"
            mark = "*" if n == best else " "
            cells += f" {m['rel_mse']:>9.2e}{pred:>11}{mark}"
        shape = "x".join(str(s) for s in lay.shape)
        print(f"{lay.name[-28:]:<28} {shape:<16} {lay.dist:<8} {lay.ks_gaussian:.3f}/{lay.ks_laplace:.3f}{cells}")
    row = f"{'TOTAL':<28} {'':<16} {'':<8} {'':<11}"
    for n in names:
        s = summary[n]
        pred = "" if math.isnan(s["pred_rel_mse"]) else f"({s['pred_rel_mse']:.2e})"
        row += f" {s['rel_mse']:>9.2e}{pred:>11} "
    print(row)
    print("best on layers: " + ", ".join(f"{n} {int(summary[n]['best_on_layers'])}" for n in names))


# ------------------------------------------------------------------------------------------------------------


def add_command(sub: Any) -> None:
    """Register ``theory`` and ``analyze`` on the ``dfquant`` subparsers."""
    p = sub.add_parser(
        "theory",
        help="levels and expected MSE of each rule for a unit-variance source (rules the error model does not "
        "cover are listed as such)",
    )
    p.add_argument("--dist", choices=["gaussian", "laplace"], default="gaussian")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=1024, help="samples per group for sample-dependent clips")
    p.add_argument("--quantizers", help="comma-separated subset of quantizers")
    add_common(p)
    p.set_defaults(func=cmd_theory)

    p = sub.add_parser("analyze", help="per-tensor fit and measured vs predicted error of each quantizer")
    p.add_argument("file", help=".safetensors file or PyTorch checkpoint (loaded with weights_only=True)")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--granularity", default="channel", help="tensor | channel | group:G")
    p.add_argument("--quantizers", help="comma-separated subset of quantizers")
    add_common(p)
    p.set_defaults(func=cmd_analyze)
