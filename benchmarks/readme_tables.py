"""Write the tables of ``benchmarks/README.md`` from the committed raw results (``benchmarks/results/*.json``).

Each benchmark renders its own table from its JSON (the script's ``markdown`` function); the README holds each
table verbatim between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``. Run this after a benchmark
writes a new result; ``--check`` only compares and exits 1 on a difference (the test suite runs the check).

Usage::

    python benchmarks/readme_tables.py [--check]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from bench_common import RESULTS, write_atomic

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"

#: ``NAME`` (the result file ``results/NAME.json``) -> the script module that renders its table.
TABLES = {
    "speed_memory": "speed_memory",
    "inference_cost": "inference_cost",
    "dfmpc_table": "dfmpc_table",
    "bench_quantizers": "bench_quantizers",
}

BLOCK = re.compile(r"<!-- results:(?P<name>[a-z_]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S)


def load(name: str) -> dict[str, Any]:
    """The raw result of benchmark ``name``."""
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def render(name: str) -> str:
    """The table benchmark ``name`` renders from its committed result."""
    if name not in TABLES:
        raise KeyError(f"no benchmark table named '{name}'; known: {', '.join(TABLES)}")
    module = importlib.import_module(TABLES[name])
    return module.markdown(load(name))


def blocks(text: str) -> dict[str, str]:
    """``{name: body}`` of every results block of a README text."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def synced(text: str) -> str:
    """``text`` with every results block replaced by its rendered table."""
    return BLOCK.sub(lambda m: f"<!-- results:{m['name']} -->\n{render(m['name'])}<!-- /results:{m['name']} -->", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a table differs")
    args = ap.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = synced(text)
    if args.check:
        rendered = blocks(new)
        stale = [n for n, body in blocks(text).items() if rendered[n] != body]
        for n in stale:
            print(f"benchmarks/README.md: the '{n}' table differs from results/{n}.json", file=sys.stderr)
        return 1 if stale else 0
    if new != text:
        write_atomic(README, new)
        print("rewrote", ", ".join(blocks(new)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
