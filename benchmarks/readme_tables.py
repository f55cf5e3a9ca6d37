"""Write the results tables of ``benchmarks/README.md`` and ``README.md`` from the committed raw results
(``benchmarks/results/*.json``).

Each benchmark renders its own table from its JSON (the script's ``markdown`` function); a README holds each
table verbatim between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` (each NAME in one README). Run
this after a benchmark writes a new result; ``--check`` only compares and exits 1 on a difference (the test
suite runs the check).

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
#: The pages that hold results blocks: the benchmarks page and the project's README (its example figures).
READMES = (README, HERE.parent / "README.md")

#: ``NAME`` (the result file ``results/NAME.json``) -> the script module that renders its table.
TABLES = {
    "speed_memory": "speed_memory",
    "inference_cost": "inference_cost",
    "dfmpc_table": "dfmpc_table",
    "bench_quantizers": "bench_quantizers",
    "rate_distortion": "rate_distortion",
    "task_quality": "task_quality",
    "resnet_table": "resnet_table",
    "qat_resnet20": "qat_resnet20",
    "rex_outliers_minilm": "rex_outliers",
    "rex_outliers_smollm2_135m": "rex_outliers",
    "bench_streaming": "bench_streaming",
    "fuzz_loader": "fuzz_loader",
    "readme_examples": "readme_examples",
    "rotation_table": "rotation_table",
    "rule_speed": "rule_speed",
    "gguf_llamacpp": "gguf_llamacpp",
    "cpu_latency": "cpu_latency",
    "budget_table": "budget_table",
    "balance_table": "balance_table",
    "shaped_grid": "shaped_grid",
}

BLOCK = re.compile(r"<!-- results:(?P<name>[a-z0-9_]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S)


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


def shown(pages: tuple[Path, ...] | None = None) -> dict[str, str]:
    """``{name: body}`` of every results block of every page (:data:`READMES`); a name shown twice is an error."""
    out: dict[str, str] = {}
    for page in READMES if pages is None else pages:
        for name, body in blocks(page.read_text(encoding="utf-8")).items():
            if name in out:
                raise ValueError(f"results block '{name}' appears twice (again in {page.name})")
            out[name] = body
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a table differs")
    args = ap.parse_args(argv)
    stale_pages = 0
    for page in READMES:
        text = page.read_text(encoding="utf-8")
        new = synced(text)
        if args.check:
            rendered = blocks(new)
            stale = [n for n, body in blocks(text).items() if rendered[n] != body]
            for n in stale:
                print(f"{page.name}: the '{n}' table differs from results/{n}.json", file=sys.stderr)
            stale_pages += bool(stale)
        elif new != text:
            write_atomic(page, new)
            print(f"rewrote {page.name}:", ", ".join(blocks(new)))
    return 1 if stale_pages else 0


if __name__ == "__main__":
    raise SystemExit(main())
