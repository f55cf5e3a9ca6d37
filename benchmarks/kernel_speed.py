"""Matmul speed on a GPU: dfquant's fused decode-in-matmul kernel against bf16 ``F.linear``, decode-then-matmul
and torch's int4 kernel, side by side in one run.

For each weight shape (bf16 N(0, 1), seed 0; ``out x in``), batch size and code width, the weight is quantized by
``minmax`` in groups of 64 (``nf4``-like single tables at 4 bits would time the same: the kernel reads one table)
with float16 scales and offsets, and ``y = x W^T`` is timed with CUDA events (median of ``--repeats`` calls after
``--warmup``):

* ``bf16``: ``F.linear`` on the float weight;
* ``decode``: the layer's decode path, ``F.linear(x, W_hat)`` with ``W_hat`` decoded on every call;
* ``kernel``: :func:`dfquant.nn.kernel.lut_matmul` on the packed codes;
* ``int4``: ``torch.ops.aten._weight_int4pack_mm`` (tinygemm) at 4 bits, groups of 64, where torch has it.

Speedups are ``bf16 / method`` from the same run. The script needs a CUDA device and Triton.

Usage::

    python benchmarks/kernel_speed.py [--shapes 4096x4096,11008x4096,...] [--batches 1,4,16,64] [--bits 2,3,4]
        [--repeats 200] [--out benchmarks/results]

Writes ``kernel_speed.json`` (command, versions, machine, GPU, date) and ``kernel_speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench_common import RESULTS, provenance, write_result
from dfquant.nn import kernel
from dfquant.nn.terms import QuantTerm
from dfquant.quantizers import get_quantizer

SHAPES = ("4096x4096", "11008x4096", "4096x11008", "4096x14336", "14336x4096")


def cuda_time(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def int4_fn(w: torch.Tensor, x: torch.Tensor) -> Callable[[], Any] | None:
    """torch's tinygemm int4 matmul of ``w`` (groups of 64), or None where this torch lacks it."""
    try:
        n, k = w.shape
        g = w.float().reshape(n, k // 64, 64)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale
        packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm(x, packed, 64, sz)
        return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 64, sz)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def run(shape: str, batch: int, bits: int, warmup: int, repeats: int) -> dict[str, Any]:
    n, k = (int(v) for v in shape.split("x"))
    dev = torch.device("cuda")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(dev)
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(dev)
    qt = get_quantizer("minmax", bits).quantize(w, "group:64", scale_dtype=torch.float16)
    term = QuantTerm.from_qtensor(qt)
    kw = kernel.pack_for_kernel(term, dev)
    row: dict[str, Any] = {"shape": shape, "batch": batch, "bits": bits}
    row["bf16_s"] = cuda_time(lambda: F.linear(x, w), warmup, repeats)
    row["decode_s"] = cuda_time(lambda: F.linear(x, term.dequantize().to(torch.bfloat16)), warmup, repeats)
    row["kernel_s"] = cuda_time(lambda: kernel.lut_matmul(x, kw), warmup, repeats)
    ref = x.float() @ term.dequantize().T
    got = kernel.lut_matmul(x, kw).float()
    row["kernel_rel_err"] = float((got - ref).norm() / ref.norm())
    f = int4_fn(w, x) if bits == 4 else None
    row["int4_s"] = cuda_time(f, warmup, repeats) if f is not None else None
    for key in ("decode", "kernel", "int4"):
        t = row[f"{key}_s"]
        row[f"{key}_speedup"] = None if t is None else row["bf16_s"] / t
    return row


def markdown(result: dict[str, Any]) -> str:
    """One row per shape, batch and bit width: microseconds and speedups over bf16."""

    def us(t: float | None) -> str:
        return "-" if t is None else f"{1e6 * t:.1f}"

    def sp(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    lines = [
        f"`{result['command']}` ({result['date']}). GPU: {result['gpu']}; torch {result['versions']['torch']}; "
        f"bf16 activations, minmax groups of 64, median of {result['repeats']} calls (CUDA events).",
        "",
        "| weight | batch | bits | bf16 us | decode us | kernel us | kernel vs bf16 | int4 us | int4 vs bf16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['bits']} | {us(r['bf16_s'])} | {us(r['decode_s'])} | "
            f"{us(r['kernel_s'])} | {sp(r['kernel_speedup'])} | {us(r['int4_s'])} | {sp(r['int4_speedup'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not kernel.available():
        ap.error("needs a CUDA device and Triton: this benchmark measures the kernel on a GPU")
    result: dict[str, Any] = {
        **provenance(__file__, argv),
        "gpu": torch.cuda.get_device_name(0),
        "repeats": args.repeats,
        "rows": [],
    }
    for shape in args.shapes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for bits in (int(b) for b in args.bits.split(",")):
                row = run(shape, batch, bits, args.warmup, args.repeats)
                print(row, flush=True)
                result["rows"].append(row)
        write_result(Path(args.out), "kernel_speed", result, markdown)
    return result


if __name__ == "__main__":
    main()
