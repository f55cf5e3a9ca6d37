"""Streaming quantization of a synthetic sharded checkpoint: peak memory and parameters per second.

    python benchmarks/bench_streaming.py [--dir DIR] [--size-gb 8] [--shards 4] [--modes 1,2,ray]
        [--out benchmarks/results]

Generates the checkpoint (benchmarks/make_synthetic_checkpoint.py) unless it is there, then runs
``dfquant quantize CKPT --out OUT --json`` once per mode (1 worker, 2 workers, a local Ray cluster of 2
workers) under ``/usr/bin/time -v``, and reports: parameters per second, the peak resident memory of the
driver and of the busiest worker (from the run's summary, ``getrusage``), the largest process's maximum
resident set size as ``/usr/bin/time`` reports it, and the load average before and after each run (the
machine may be shared). The outputs of all modes are compared byte for byte. Everything under ``--dir`` is
deleted at the end unless ``--keep``. Writes ``bench_streaming.json`` (with the command, versions, machine
and date) and ``bench_streaming.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import RESULTS, provenance, write_result


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(result: dict[str, Any]) -> str:
    """A row per mode: parameters per second, wall time and the peak resident memory of each process."""
    s = result["setup"]
    lines = [
        f"`{result['command']}` ({result['date']}). Machine: {result['machine']['cpu']}, "
        f"{result['machine']['cpu_count']} CPUs. A synthetic bf16 checkpoint of "
        f"{result['checkpoint_bytes'] / 2**30:.2f} GiB in {s['shards']} shards, {s['method']} W{s['bits']} "
        f"{s['granularity']}; outputs of all modes byte-identical: {'yes' if result['identical_outputs'] else 'NO'}.",
        "",
        "| mode | M params | M params/s | wall s | peak RSS driver MiB | peak RSS worker MiB | max RSS (time -v) MiB "
        "| load before | load after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in result["rows"]:
        tv = "-" if r["time_v_max_rss_MiB"] is None else f"{r['time_v_max_rss_MiB']:.0f}"
        lines.append(
            f"| {r['mode']} | {r['params'] / 1e6:.1f} | {r['params_per_second'] / 1e6:.2f} | {r['wall_s']:.1f} | "
            f"{r['peak_rss_driver_MiB']:.0f} | {r['peak_rss_worker_MiB']:.0f} | {tv} | {r['load_before']} | "
            f"{r['load_after']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="work folder for the checkpoint and outputs (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--granularity", default="group:128")
    ap.add_argument("--modes", default="1,2,ray")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dfq-stream-bench-"))
    ckpt = root / "ckpt"
    here = Path(__file__).resolve().parent
    if not (ckpt / "model.safetensors.index.json").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        cmd = [sys.executable, str(here / "make_synthetic_checkpoint.py"), str(ckpt)]
        subprocess.run([*cmd, "--size-gb", str(args.size_gb), "--shards", str(args.shards)], check=True)
    dfquant = [sys.executable, "-m", "dfquant.cli"]
    rows = []
    outs = []
    for mode in args.modes.split(","):
        out = root / f"out-{mode}"
        extra = ["--workers", "2", "--ray", "local"] if mode == "ray" else ["--workers", mode]
        cmd = [*dfquant, "quantize", str(ckpt), "--method", args.method, "--bits", str(args.bits)]
        cmd += ["--granularity", args.granularity, "--out", str(out), "--json", *extra]
        before = _load()
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(f"{mode}: failed: {proc.stderr[-2000:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])["streaming"]
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        row = {
            "mode": mode,
            "params": summary["params"],
            "seconds": summary["seconds"],
            "params_per_second": summary["params_per_second"],
            "peak_rss_driver_MiB": summary["peak_rss_driver_bytes"] / 2**20,
            "peak_rss_worker_MiB": summary["peak_rss_worker_bytes"] / 2**20,
            "time_v_max_rss_MiB": int(m.group(1)) / 1024 if m else None,
            "wall_s": wall,
            "load_before": before,
            "load_after": _load(),
            "output_bytes": summary["size_bytes"],
        }
        rows.append(row)
        outs.append(out)
        print(json.dumps(row), flush=True)
    same = all(filecmp.cmp(outs[0] / f, o / f, shallow=False) for o in outs[1:] for f in sorted(os.listdir(outs[0])))
    result = {
        **provenance(__file__, argv),
        "setup": {k: getattr(args, k) for k in ("size_gb", "shards", "method", "bits", "granularity", "modes")},
        "rows": rows,
        "identical_outputs": same,
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.iterdir()),
    }
    write_result(Path(args.out), "bench_streaming", result, markdown)
    print(markdown(result))
    if not args.keep:
        shutil.rmtree(root)
    return result


if __name__ == "__main__":
    main()
