"""Quantization speed of dfquant's rules on a large weight matrix, beside a plain ``torch.round`` floor.

Measures parameters per second (median of several runs) for each rule per channel and per group of 64 on a
4096 x 4096 float32 Gaussian tensor (16.8 M parameters), and the relative MSE it reaches. The floor is min-max
fake quantization written directly with ``torch.round`` (scale, divide, round, clamp, multiply): what any rule
costs at least. Writes ``speed.json`` and ``speed.md`` into ``--out``.

Usage:
    python benchmarks/bench_quantizers.py --out results/bench [--size 4096] [--repeats 3] [--bits 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dfquant.io import write_atomic
from dfquant.quantizers import available, get_quantizer


def torch_round_floor(x: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric min-max fake quantization with ``torch.round``: the cheapest possible rule."""
    rows = x.reshape(-1, group) if group else x
    qmax = 2 ** (bits - 1) - 1
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.round(rows / scale).clamp(-qmax - 1, qmax) * scale).reshape(x.shape)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--methods", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    n = x.numel()
    methods = [m for m in (args.methods.split(",") if args.methods else available())]
    rows = []
    for gran, group in (("channel", None), ("group:64", 64)):
        t, y = timed(lambda group=group: torch_round_floor(x, args.bits, group), args.repeats)
        rel = float(((y - x) ** 2).sum() / (x * x).sum())  # type: ignore[operator]
        rows.append(
            {"method": "torch.round floor", "granularity": gran, "seconds": t, "params_per_s": n / t, "rel_mse": rel}
        )
        for m in methods:
            try:
                q = get_quantizer(m, args.bits)
            except Exception as e:  # a rule that does not support these bits
                rows.append({"method": m, "granularity": gran, "error": str(e)})
                continue
            t, qt = timed(lambda q=q, gran=gran: q.quantize(x, gran), args.repeats)
            rows.append(
                {
                    "method": m,
                    "granularity": gran,
                    "seconds": t,
                    "params_per_s": n / t,
                    "rel_mse": qt.rel_mse(x),
                    "bits_per_weight": qt.bits_per_weight(),
                }
            )  # type: ignore[union-attr]
            print(f"{m:>16} {gran:>9}: {n / t / 1e6:8.2f} M params/s  rel MSE {rows[-1]['rel_mse']:.3e}", flush=True)
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor(),
    }
    result = {
        "tensor": [args.size, args.size],
        "bits": args.bits,
        "repeats": args.repeats,
        "machine": machine,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "speed.json", json.dumps(result, indent=2).encode())
    lines = [
        f"Quantization speed, {args.size}x{args.size} float32 Gaussian, {args.bits} bits, median of "
        f"{args.repeats} ({machine['cpu_count']} CPU threads, torch {torch.__version__})",
        "",
        "| method | granularity | M params/s | seconds | rel. MSE |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['granularity']} | n/a | n/a | {r['error']} |")
        else:
            lines.append(
                f"| {r['method']} | {r['granularity']} | {r['params_per_s'] / 1e6:.2f} | "
                f"{r['seconds']:.3f} | {r['rel_mse']:.3e} |"
            )
    write_atomic(out / "speed.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
