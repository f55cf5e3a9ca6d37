"""Run every peer benchmark into one folder: rate-distortion, task quality, then the timings.

Order: the figures that do not depend on the machine's load first (rate-distortion, then task quality, which
reads the rate-distortion results to pick dfquant's setting at each peer's bit budget), then quantization
speed/memory and inference cost (timings; the load averages are recorded beside them). Each step writes its
JSON, markdown and plots into ``--out``; ``summary.md`` collects the markdown of the steps that ran.

Needs the ``bench`` extra (``pip install -e '.[bench,hf,plots]'``) and the assets folder.

Usage:
    python benchmarks/run_all.py --out results/bench [--skip speed,inference] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference_cost
import rate_distortion
import speed_memory
import task_quality
from bench_common import write_atomic

STEPS = ("rd", "task", "speed", "inference")
FILES = {
    "rd": "rate_distortion.md",
    "task": "task_quality.md",
    "speed": "speed_memory.md",
    "inference": "inference_cost.md",
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to skip: {', '.join(STEPS)}")
    ap.add_argument("--quick", action="store_true", help="small settings for a smoke run (not for reporting)")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STEPS)
    if unknown:
        ap.error(f"unknown step(s) {sorted(unknown)}; allowed: {', '.join(STEPS)}")
    out = ["--out", args.out]
    quick = args.quick
    t0 = time.perf_counter()
    if "rd" not in skip:
        extra = ["--models", "cifar-resnet20,gaussian", "--max-params", "50000"] if quick else []
        rate_distortion.main(out + extra)
    if "task" not in skip:
        extra = ["--models", "cifar-resnet20", "--cifar-limit", "200"] if quick else []
        task_quality.main(out + extra)
    if "speed" not in skip:
        extra = ["--repeats", "1", "--models", "cifar-resnet20"] if quick else []
        speed_memory.main(out + extra)
    if "inference" not in skip:
        extra = ["--models", "minilm", "--repeats", "2", "--seq", "16"] if quick else []
        inference_cost.main(out + extra)
    parts = []
    for step in STEPS:
        p = Path(args.out) / FILES[step]
        if p.exists():
            parts.append(p.read_text(encoding="utf-8"))
    write_atomic(Path(args.out) / "summary.md", "\n\n".join(parts))
    print(f"done in {time.perf_counter() - t0:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
