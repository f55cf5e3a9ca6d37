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
import os
import sys
import warnings
from collections.abc import Sequence

from dfquant._version import __version__
from dfquant.cli import eval as eval_
from dfquant.cli import inspect, qat, quantize, report, theory, tradeoff
from dfquant.cli.common import EXIT_USAGE, Parser, json_ready, one_line
from dfquant.errors import DfquantError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dfquant", description="Data-free low-bit quantization of PyTorch models.")
    parser.add_argument("--version", action="version", version=f"dfquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    for verb in (theory, quantize, eval_, inspect, tradeoff, report, qat):
        verb.add_command(sub)
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
        sys.stderr.write(f"dfquant: error: {one_line(str(e))}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("dfquant: error: interrupted\n")
        return 130
    except (OSError, MemoryError) as e:
        sys.stderr.write(f"dfquant: error: {one_line(str(e) or type(e).__name__)}\n")
        return EXIT_USAGE
    except Exception as e:
        if debug:
            raise
        detail = one_line(str(e))[:300] or "no message"
        sys.stderr.write(
            f"dfquant: error: unexpected {type(e).__name__}: {detail} (set DFQUANT_DEBUG=1 for the traceback)\n"
        )
        return EXIT_USAGE
    for w in caught:
        sys.stderr.write(f"dfquant: warning: {one_line(str(w.message))}\n")
    if args.json:
        sys.stdout.write(json.dumps(json_ready(result), allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
