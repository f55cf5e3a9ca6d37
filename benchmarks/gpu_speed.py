"""Quantization speed on a GPU: dfquant's rules against HQQ on the same device, in one run.

For each rule and tensor (bfloat16 N(0, 1), seed 0: 4096x4096, 11008x4096, 4096x11008), 4 bits in groups of 64
(the block formats in their own blocks), float16 scales and offsets as HQQ keeps its meta, the tensor already on
the device:

* time: CUDA events around ``quantize`` (warm: after two untimed calls), median of ``--repeats``;
* relative MSE ``||W_hat - W||^2 / ||W||^2`` of the decoded weight, and bits per weight counted from the stored
  tensors (codes at their bit width, scales, offsets and levels at their dtype);
* where the result lives: a rule without ``runs_on_device`` fits on the CPU (its time includes the copy there).

HQQ (``hqq.core.quantize.Quantizer.quantize`` with ``hqq_base_quant_config``'s parameters: 4 bits, groups of 64
along the input dimension, ``optimize=True``, float16 meta) runs on the same device when it is installed; its
bits per weight count float16 scale and zero per group.

Usage::

    python benchmarks/gpu_speed.py [--rules minmax,mse,nf4,...] [--shapes 4096x4096,...] [--repeats 10]
        [--out benchmarks/results]

Writes ``gpu_speed.json`` (with the command, versions, machine, GPU and date) and ``gpu_speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench_common import RESULTS, provenance, write_result
from dfquant.quantizers import get_quantizer, quantizer_class

#: The rules timed: those that run on the device (``runs_on_device``) and the host rules the comparison needs
#: (their time includes the copy to the CPU and back).
RULES = ("minmax", "mse", "nf4", "mxfp4", "nvfp4", "lloyd-optimal", "lloyd-max", "statq")
SHAPES = ("4096x4096", "11008x4096", "4096x11008")
GRANULARITY = {"mxfp4": "group:32", "nvfp4": "group:16"}


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` warm calls (CUDA events on a GPU), and its last result."""
    out = fn()
    out = fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def dfquant_row(name: str, w: torch.Tensor, repeats: int) -> dict[str, Any]:
    rule = get_quantizer(name, 4)
    gran = GRANULARITY.get(name, "group:64")
    seconds, qt = _timed(lambda: rule.quantize(w, gran, scale_dtype=torch.float16), repeats)
    return {
        "library": "dfquant",
        "method": name,
        "granularity": gran,
        "on_device": bool(quantizer_class(name).runs_on_device),
        "result_device": qt.codes.device.type,
        "seconds": seconds,
        "rel_mse": qt.rel_mse(w),
        "bits_per_weight": qt.bits_per_weight(),  # codes at their width, scales, offsets, levels as stored
    }


def hqq_row(w: torch.Tensor, repeats: int) -> dict[str, Any] | None:
    try:
        from hqq.core.quantize import Quantizer as HQQQuantizer
    except ImportError:
        return None
    m = w.to(torch.float16)

    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        return HQQQuantizer.quantize(
            m, nbits=4, channel_wise=True, group_size=64, optimize=True, round_zero=True, axis=1,
            compute_dtype=torch.float16, device=str(w.device),
        )  # fmt: skip

    seconds, (wq, meta) = _timed(run, repeats)
    deq = HQQQuantizer.dequantize(wq, meta).to(torch.float32).reshape(w.shape)
    ref = w.to(torch.float32)
    groups = w.numel() // 64
    stored = wq.numel() * wq.element_size() * 8 + 2 * groups * 16  # packed codes, float16 scale and zero
    return {
        "library": "hqq",
        "method": "hqq",
        "granularity": "group:64",
        "on_device": True,
        "result_device": wq.device.type,
        "seconds": seconds,
        "rel_mse": float(((deq - ref) ** 2).sum() / (ref * ref).sum()),
        "bits_per_weight": stored / w.numel(),
    }


def markdown(result: dict[str, Any]) -> str:
    """A table per tensor shape: time, relative MSE and bits per weight of every rule and of HQQ."""
    lines = [
        f"`{result['command']}` ({result['date']}). GPU: {result['gpu']}; torch {result['versions']['torch']}; "
        f"bfloat16 N(0, 1) tensors, 4 bits, median of {result['repeats']} warm calls (CUDA events).",
        "",
    ]
    for shape, rows in result["shapes"].items():
        lines += [
            f"**{shape}**",
            "",
            "| method | granularity | runs on | ms | rel MSE | bits/w |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for r in rows:
            where = r["result_device"] if r["on_device"] else f"{r['result_device']} (fits on the host)"
            lines.append(
                f"| {r['method']} | {r['granularity']} | {where} | {1000 * r['seconds']:.2f} | {r['rel_mse']:.3e} | "
                f"{r['bits_per_weight']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("no CUDA device: this benchmark measures quantization on a GPU")
    dev = torch.device("cuda")
    result: dict[str, Any] = {
        **provenance(__file__, argv),
        "gpu": torch.cuda.get_device_name(0),
        "repeats": args.repeats,
        "shapes": {},
    }
    for shape in args.shapes.split(","):
        rows_n, cols_n = (int(v) for v in shape.split("x"))
        w = torch.randn(rows_n, cols_n, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(dev)
        rows = [dfquant_row(name, w, args.repeats) for name in args.rules.split(",")]
        h = hqq_row(w, args.repeats)
        if h is not None:
            rows.append(h)
        for r in rows:
            print(shape, r, flush=True)
        result["shapes"][shape] = rows
        write_result(Path(args.out), "gpu_speed", result, markdown)
    return result


if __name__ == "__main__":
    main()
