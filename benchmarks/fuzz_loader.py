"""A long fuzzing campaign against the loader: ``tests/property/test_fuzz_loader.py`` with many more examples.

Runs the fuzz properties in a pytest subprocess with ``DFQUANT_FUZZ_EXAMPLES`` examples per property (four
properties, plus the regression cases) and prints the number of cases run, the outcome counts per kind of
mutation (``loaded``: the mutation left a loadable file, ``refused``: a FileFormatError) and the slowest case.
Every case must end in one of those two outcomes, within the time, memory and no-code-execution guards of the
test module; any other outcome fails the run (exit status 1).

Usage::

    python benchmarks/fuzz_loader.py --examples 2500 [--out benchmarks/results]

Writes ``fuzz_loader.json`` (the counts, with the command, versions, machine and date) and ``fuzz_loader.md``
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import RESULTS, provenance, write_result

ROOT = Path(__file__).resolve().parents[1]


def markdown(result: dict[str, Any]) -> str:
    """The counts per kind of mutation and the run's totals."""
    s = result["stats"]
    kinds = sorted({k.split(":")[0] for k in s if ":" in k})
    lines = [
        f"`{result['command']}` ({result['date']}): {s.get('cases', 0)} cases, {s['examples_per_property']} "
        f"examples per property, {s['seconds']:.0f} s, slowest case {s.get('max_ms')} ms, pytest exit "
        f"{s['pytest_exit']}.",
        "",
        "| mutation | loaded | refused |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} | {s.get(k + ':loaded', 0)} | {s.get(k + ':refused', 0)} |" for k in kinds]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2500, help="Hypothesis examples per fuzz property")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {
            **os.environ,
            "DFQUANT_FUZZ_EXAMPLES": str(args.examples),
            "DFQUANT_FUZZ_REPORT": str(report),
            "OMP_NUM_THREADS": "1",
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/property/test_fuzz_loader.py"],
            cwd=ROOT,
            env=env,
            check=False,
        )
        seconds = time.perf_counter() - t0
        stats = json.loads(report.read_text()) if report.exists() else {}
    stats["examples_per_property"] = args.examples
    stats["seconds"] = round(seconds, 1)
    stats["pytest_exit"] = proc.returncode
    kinds = sorted({k.split(":")[0] for k in stats if ":" in k})
    cases, slowest = stats.get("cases", 0), stats.get("max_ms")
    print(f"\n{cases} cases in {seconds:.0f} s, slowest {slowest} ms, pytest exit {proc.returncode}")
    for kind in kinds:
        print(f"  {kind:<28} loaded {stats.get(kind + ':loaded', 0):>6}  refused {stats.get(kind + ':refused', 0):>6}")
    write_result(Path(args.out), "fuzz_loader", {**provenance(__file__, argv), "stats": stats}, markdown)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
