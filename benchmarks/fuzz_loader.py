"""A long fuzzing campaign against the loader: ``tests/property/test_fuzz_loader.py`` with many more examples.

Runs the fuzz properties in a pytest subprocess with ``DFQUANT_FUZZ_EXAMPLES`` examples per property (four
properties, plus the regression cases) and prints the number of cases run, the outcome counts per kind of
mutation (``loaded``: the mutation left a loadable file, ``refused``: a FileFormatError) and the slowest case.
Every case must end in one of those two outcomes, within the time, memory and no-code-execution guards of the
test module; any other outcome fails the run (exit status 1).

Usage::

    python benchmarks/fuzz_loader.py --examples 2500 [--out results/fuzz_loader.json]
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

from bench_common import write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2500, help="Hypothesis examples per fuzz property")
    ap.add_argument("--out", help="also write the counts to this JSON file")
    args = ap.parse_args()
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
    if args.out:
        write_json(Path(args.out), stats)  # atomic; creates the folder
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
