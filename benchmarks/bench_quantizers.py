"""Quantization speed of dfquant's rules on a large weight matrix, beside a plain ``torch.round`` floor.

Measures parameters per second (median of several runs) for each rule per channel and per group of 64 on a
4096 x 4096 float32 Gaussian tensor (16.8 M parameters), and the relative MSE it reaches. The floor is min-max
fake quantization written directly with ``torch.round`` (scale, divide, round, clamp, multiply): what any rule
costs at least. Writes ``bench_quantizers.json`` (with its command, versions, machine and date) and
``bench_quantizers.md`` into ``--out`` (default ``benchmarks/results``, whose JSON is committed).

Usage:
    python benchmarks/bench_quantizers.py [--out benchmarks/results] [--size 4096] [--repeats 3] [--bits 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench_common import RESULTS, provenance, write_result
from dfquant.errors import ConfigError
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


def markdown(result: dict[str, Any]) -> str:
    """The table of a result: one row per rule and granularity."""
    m = result["machine"]
    size = "x".join(str(d) for d in result["tensor"])
    lines = [
        f"`{result['command']}` ({result['date']}): a {size} float32 N(0, 1) tensor, {result['bits']} bits, median "
        f"of {result['repeats']} runs, {m['torch_threads']} torch threads on {m['cpu']} ({m['cpu_count']} CPUs), "
        f"load average {' '.join(str(x) for x in m['load_average'])}.",
        "",
        "| method | granularity | M params/s | seconds | rel. MSE | bits/w |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['granularity']} | n/a | n/a | {r['error']} | |")
        else:
            bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "-"
            lines.append(
                f"| {r['method']} | {r['granularity']} | {r['params_per_s'] / 1e6:.2f} | "
                f"{r['seconds']:.3f} | {r['rel_mse']:.3e} | {bpw} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--methods", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    n = x.numel()
    methods = [m for m in (args.methods.split(",") if args.methods else available())]
    result: dict[str, Any] = {
        **provenance(__file__, argv),
        "tensor": [args.size, args.size],
        "bits": args.bits,
        "repeats": args.repeats,
        "rows": [],
    }
    rows = result["rows"]
    for gran, group in (("channel", None), ("group:64", 64)):
        t, y = timed(lambda group=group: torch_round_floor(x, args.bits, group), args.repeats)
        rel = float(((y - x) ** 2).sum() / (x * x).sum())  # type: ignore[operator]
        rows.append(
            {"method": "torch.round floor", "granularity": gran, "seconds": t, "params_per_s": n / t, "rel_mse": rel}
        )
        for m in methods:
            try:
                q = get_quantizer(m, args.bits)
                t, qt = timed(lambda q=q, gran=gran: q.quantize(x, gran), args.repeats)
            except ConfigError as e:  # a rule that does not take these bits or this granularity: said in the row
                rows.append({"method": m, "granularity": gran, "error": str(e)})
                continue
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
    write_result(Path(args.out), "bench_quantizers", result, markdown)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
