"""Streaming quantization of a synthetic sharded checkpoint: peak memory and parameters per second.

    python benchmarks/bench_streaming.py --dir /tmp/dfq-stream-bench --size-gb 8 --shards 4

Generates the checkpoint (benchmarks/make_synthetic_checkpoint.py) unless it is there, then runs
``dfquant quantize CKPT --out OUT --json`` once per mode (1 worker, 2 workers, a local Ray cluster of 2
workers) under ``/usr/bin/time -v``, and reports: parameters per second, the peak resident memory of the
driver and of the busiest worker (from the run's summary, ``getrusage``), the largest process's maximum
resident set size as ``/usr/bin/time`` reports it, and the load average before and after each run (the
machine may be shared). The outputs of all modes are compared byte for byte. Everything under ``--dir`` is
deleted at the end unless ``--keep``.
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
import time
from pathlib import Path


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/dfq-stream-bench")
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--granularity", default="group:128")
    ap.add_argument("--modes", default="1,2,ray")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
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
    print(json.dumps({"identical_outputs": same, "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.iterdir())}))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
