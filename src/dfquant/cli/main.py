"""The ``dfquant`` command line: thin wrappers over the library.

Every command takes ``--json`` (print one JSON document on stdout instead of text) and ``--quiet`` (no
progress). Every failure ends with one line on stderr, ``dfquant: error: ...``, and exit status 2 (130 when
interrupted): dfquant's own errors, usage errors, operating-system errors and, as a last resort, any other
exception (named as unexpected; set the environment variable ``DFQUANT_DEBUG=1`` to get its traceback
instead). Python warnings raised while a command runs are held back and printed after it succeeds, one line
each (``dfquant: warning: ...``); a failing command prints only its error line.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from dfquant._version import __version__
from dfquant.errors import DfquantError

EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], dict[str, Any]]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line, with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"dfquant: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")


# ------------------------------------------------------------------------------------------------------------
# theory


def cmd_theory(args: argparse.Namespace) -> dict[str, Any]:
    from dfquant.report.analysis import theory

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
    from dfquant.io.checkpoints import load_state_dict
    from dfquant.quantizers import Granularity
    from dfquant.report.analysis import analyze_tensor, quantizer_variants, summarize, weight_tensors

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dfquant", description="Data-free low-bit quantization of PyTorch models.")
    parser.add_argument("--version", action="version", version=f"dfquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "theory",
        help="levels and expected MSE of each rule for a unit-variance source (rules the error model does not "
        "cover are listed as such)",
    )
    p.add_argument("--dist", choices=["gaussian", "laplace"], default="gaussian")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=1024, help="samples per group for sample-dependent clips")
    p.add_argument("--quantizers", help="comma-separated subset of quantizers")
    _common(p)
    p.set_defaults(func=cmd_theory)

    p = sub.add_parser("analyze", help="per-tensor fit and measured vs predicted error of each quantizer")
    p.add_argument("file", help=".safetensors file or PyTorch checkpoint (loaded with weights_only=True)")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--granularity", default="channel", help="tensor | channel | group:G")
    p.add_argument("--quantizers", help="comma-separated subset of quantizers")
    _common(p)
    p.set_defaults(func=cmd_analyze)

    from dfquant.cli.quantize import add_commands

    add_commands(sub)
    from dfquant.cli.tradeoff import add_command as add_tradeoff

    add_tradeoff(sub)
    from dfquant.report.html import add_command as add_report

    add_report(sub)
    from dfquant.cli.qat import add_command as add_qat

    add_qat(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = os.environ.get("DFQUANT_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings(record=True) as caught:
            result = args.func(args)
    except DfquantError as e:
        sys.stderr.write(f"dfquant: error: {_one_line(str(e))}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("dfquant: error: interrupted\n")
        return 130
    except (OSError, MemoryError) as e:
        sys.stderr.write(f"dfquant: error: {_one_line(str(e) or type(e).__name__)}\n")
        return EXIT_USAGE
    except Exception as e:
        if debug:
            raise
        detail = _one_line(str(e))[:300] or "no message"
        sys.stderr.write(
            f"dfquant: error: unexpected {type(e).__name__}: {detail} (set DFQUANT_DEBUG=1 for the traceback)\n"
        )
        return EXIT_USAGE
    for w in caught:
        sys.stderr.write(f"dfquant: warning: {_one_line(str(w.message))}\n")
    if args.json:
        sys.stdout.write(json.dumps(json_ready(result), allow_nan=False) + "\n")
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def json_ready(o: object) -> object:
    """``o`` as strict JSON values: tensors as lists, tuples and sets as lists, NaN and infinities as ``null``
    (JSON has no such numbers), any other object as its text."""
    import torch

    if isinstance(o, torch.Tensor):
        return json_ready(o.tolist())
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, list | tuple | set):
        return [json_ready(v) for v in o]
    if o is None or isinstance(o, bool | str):
        return o
    if isinstance(o, numbers.Integral):
        return int(o)
    if isinstance(o, numbers.Real):
        return float(o) if math.isfinite(o) else None
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
