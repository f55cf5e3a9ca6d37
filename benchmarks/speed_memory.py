"""Quantization speed and peak memory: dfquant's rules beside the peers, each in a fresh process.

For every method and target (a 4096 x 4096 float32 N(0, 1) tensor; whole models: every linear and conv weight
of the zoo model, embeddings left out) a new Python process loads the target, quantizes it ``--repeats`` times
and reports the median wall time, parameters per second, the relative weight MSE, and its peak resident set
size (``ru_maxrss``) together with the RSS measured just before quantizing: the difference is the working
memory the quantizer needed on top of the input. All methods run with one thread (``torch.set_num_threads(1)``,
``OMP_NUM_THREADS=1``) so they compare on equal terms; the 1/5/15-minute load averages are recorded beside
every figure (a loaded machine slows every method alike, but noisily: re-run on a quiet machine for the final
figures).

Writes ``speed_memory.json`` (the raw result, with its command, versions, machine and date) and ``speed_memory.md``
into ``--out`` (default ``benchmarks/results``, whose JSON is committed).

Usage:
    python benchmarks/speed_memory.py [--out benchmarks/results] [--repeats 3] [--models cifar-resnet20,minilm]
        [--methods lloyd-max-g64,hqq-4-g64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, load_average, provenance, quantizable_weights, write_result

#: Method key -> (library, setting factory in :mod:`peers`, arguments).
METHODS: dict[str, tuple[str, str, tuple[Any, ...], dict[str, Any]]] = {
    "dfquant minmax w4 g64": ("dfquant", "dfquant_fn", ("minmax", 4, "group:64"), {}),
    "dfquant nf4 w4 g64": ("dfquant", "dfquant_fn", ("nf4", 4, "group:64"), {}),
    "dfquant lloyd-max w4 g64": ("dfquant", "dfquant_fn", ("lloyd-max", 4, "group:64"), {}),
    "dfquant lloyd-max w4 channel": ("dfquant", "dfquant_fn", ("lloyd-max", 4, "channel"), {}),
    "dfquant lloyd-max w4 g64 gauss refine2": (
        "dfquant",
        "dfquant_fn",
        ("lloyd-max", 4, "group:64"),
        {"dist": "gaussian", "refine": 2},
    ),
    "dfquant lloyd-max w4 g64 gauss refine2 no-fallback": (
        "dfquant",
        "dfquant_fn",
        ("lloyd-max", 4, "group:64"),
        {"dist": "gaussian", "refine": 2, "fallback_ks": "off"},
    ),
    "dfquant statq-uint w4 g64": ("dfquant", "dfquant_fn", ("statq", 4, "group:64"), {"format": "uint4"}),
    "hqq w4 g64": ("hqq", "hqq_fn", (4, "group:64"), {}),
    "bnb nf4 g64 +dq": ("bitsandbytes", "bnb4_fn", ("nf4", 64, True), {}),
    "bnb nf4 g64": ("bitsandbytes", "bnb4_fn", ("nf4", 64, False), {}),
    "quanto int4 g128": ("quanto", "quanto_fn", ("qint4", "group:128"), {}),
    "torchao intx4 g32": ("torchao", "torchao_intx_fn", (4, "group:32"), {}),
}


def _rss_mib() -> float:
    """Current resident set size (MiB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(method: str, target: str, repeats: int) -> dict[str, Any]:
    """Run in a fresh process: load ``target``, quantize it ``repeats`` times with ``method``."""
    import peers

    torch.set_num_threads(1)
    _, factory, fargs, fkw = METHODS[method]
    fn = getattr(peers, factory)(*fargs, **fkw)
    if target == "tensor4096":
        weights = {"w": torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))}
    else:
        from dfquant.zoo import load_model

        weights = {k: v.clone() for k, v in quantizable_weights(load_model(target).model).items()}
        import gc

        gc.collect()
    n = sum(w.numel() for w in weights.values())
    fn(torch.randn(64, 256))  # first-call imports and kernel set-up, outside the timing
    rss_before = _rss_mib()
    times = []
    err = ref = 0.0
    bits = counted = 0
    failed: dict[str, str] = {}
    for i in range(repeats):
        t0 = time.perf_counter()
        results = {}
        for k, w in weights.items():
            try:
                results[k] = fn(w)
            except peers.UnsupportedError as e:
                failed[k] = str(e)
        times.append(time.perf_counter() - t0)
        if i == 0:
            for k, r in results.items():
                wf = weights[k].to(torch.float32)
                err += float(((r.dequantized - wf) ** 2).sum(dtype=torch.float64))
                ref += float((wf * wf).sum(dtype=torch.float64))
                bits += r.bits
                counted += r.numel
        del results
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = statistics.median(times)
    return {
        "params": n,
        "seconds": times,
        "median_s": med,
        "params_per_s": n / med,
        "rel_mse": err / ref if ref else None,
        "bits_per_weight": bits / counted if counted else None,
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak, 1),
        "working_mib": round(peak - rss_before, 1),
        "tensors_unsupported": len(failed),
        "unsupported_example": next(iter(failed.items()), None),
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"`{result['command']}` ({result['date']}). Machine: {m['cpu']}, {m['cpu_count']} CPUs, "
        f"{m['memory_gib']} GiB, torch {m['torch']}; one thread per "
        f"method, median of {result['repeats']} runs, each method in a fresh process.",
        "",
    ]
    for target, rows in result["targets"].items():
        lines += [
            f"**{target}**",
            "",
            "| method | M params/s | median s | rel MSE | bits/w | peak RSS MiB | working MiB | load avg |",
        ]
        lines.append("|" + " --- |" * 8)
        for method, r in rows.items():
            if "error" in r:
                lines.append(f"| {method} | error: {r['error'][:100]} | | | | | | |")
                continue
            rel = "-" if r["rel_mse"] is None else f"{r['rel_mse']:.3e}"
            if r.get("tensors_unsupported"):
                rel += f" ({r['tensors_unsupported']} tensors unsupported)"
            bpw = "-" if r.get("bits_per_weight") is None else f"{r['bits_per_weight']:.3f}"
            lines.append(
                f"| {method} | {r['params_per_s'] / 1e6:.2f} | {r['median_s']:.3f} | {rel} | {bpw} | "
                f"{r['peak_rss_mib']:.0f} | "
                f"{r['working_mib']:.0f} | {' '.join(str(x) for x in r['load_average'])} |"
            )
        lines.append("")
    if result.get("targets_check"):
        lines += ["Targets:", ""] + [f"- {t}" for t in result["targets_check"]]
    return "\n".join(lines) + "\n"


def check_targets(result: dict[str, Any]) -> list[str]:
    """The speed targets: lloyd-max >= 5x HQQ at equal or lower MSE, and >= bitsandbytes NF4 (and where the
    dfquant setting that reaches HQQ's MSE at its bits, statq on a uint grid, stands)."""
    out = []
    for target, rows in result["targets"].items():
        hqq = rows.get("hqq w4 g64", {})
        bnb = rows.get("bnb nf4 g64", {})
        for lm in (
            "dfquant lloyd-max w4 g64",
            "dfquant lloyd-max w4 channel",
            "dfquant lloyd-max w4 g64 gauss refine2",
            "dfquant lloyd-max w4 g64 gauss refine2 no-fallback",
            "dfquant statq-uint w4 g64",
        ):
            r = rows.get(lm, {})
            if "params_per_s" not in r:
                continue
            if "params_per_s" in hqq:
                sp = r["params_per_s"] / hqq["params_per_s"]
                mse = "lower" if (r["rel_mse"] or 0) <= (hqq["rel_mse"] or 0) else "higher"
                line = (
                    f"{target}: {lm} is {sp:.2f}x HQQ's speed (target >= 5x) at {mse} MSE "
                    f"({r['rel_mse']:.3e} vs {hqq['rel_mse']:.3e})"
                )
                if r.get("bits_per_weight") and hqq.get("bits_per_weight"):
                    line += f", {r['bits_per_weight']:.3f} vs {hqq['bits_per_weight']:.3f} bits per weight"
                out.append(line)
            if "params_per_s" in bnb:
                sp = r["params_per_s"] / bnb["params_per_s"]
                out.append(f"{target}: {lm} is {sp:.2f}x bitsandbytes NF4's speed (target >= 1x)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="cifar-resnet20,minilm")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--target", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.target, args.repeats)))
        return {}
    out = Path(args.out)
    targets = ["tensor4096", *[m for m in args.models.split(",") if m]]
    # every row of a result comes from this run (no rows merged from an earlier file)
    result: dict[str, Any] = {**provenance(__file__, argv), "repeats": args.repeats, "targets": {}}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for target in targets:
        rows: dict[str, Any] = result["targets"].get(target, {})
        for method in args.methods.split(","):
            load = load_average()
            cmd = [sys.executable, __file__, "--worker", method, "--target", target, "--repeats", str(args.repeats)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                rows[method] = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1], "load_average": load}
            else:
                rows[method] = {**json.loads(p.stdout.strip().splitlines()[-1]), "load_average": load}
                r = rows[method]
                print(
                    f"{target:>12} {method:<30} {r['params_per_s'] / 1e6:8.2f} M/s peak {r['peak_rss_mib']:.0f} MiB "
                    f"load {load}",
                    flush=True,
                )
            result["targets"][target] = rows
            result["targets_check"] = check_targets(result)
            write_result(out, "speed_memory", result, markdown)
    return result


if __name__ == "__main__":
    main()
