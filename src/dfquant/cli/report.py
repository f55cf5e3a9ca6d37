"""``dfquant report INPUT``: a self-contained HTML page for a JSON result or a saved file
(:func:`dfquant.report.html.render_report`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dfquant.cli.common import add_common
from dfquant.errors import InputError
from dfquant.io.atomic import write_atomic
from dfquant.report.html import MAX_HIST_LAYERS, render_report


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    src = Path(args.input)
    out = Path(args.out) if args.out else src.with_name(src.stem + ".report.html")
    if out.resolve() == src.resolve():
        raise InputError(f"--out '{out}' would overwrite the input")
    layers = [n.strip() for n in args.layers.split(",") if n.strip()] if args.layers else None
    page, counts = render_report(src, layers)
    write_atomic(out, page.encode("utf-8"))
    if not args.json and not args.quiet:
        print(f"wrote {out}: {counts['rows']} layers, {counts['plots']} plots")
    return {"out": str(out), **counts}


def add_command(sub: Any) -> None:
    """Register ``report`` on the ``dfquant`` subparsers."""
    p = sub.add_parser("report", help="render a self-contained HTML page for a JSON result or a saved file")
    p.add_argument("input", help="a JSON result (--json output of quantize, eval, analyze, ...) or a dfquant file")
    p.add_argument("--out", help="the HTML file to write (default: INPUT's name with .report.html)")
    p.add_argument("--layers", help=f"comma-separated layers to plot (default: the first {MAX_HIST_LAYERS})")
    add_common(p)
    p.set_defaults(func=cmd_report)
