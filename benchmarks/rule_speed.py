"""Quantization speed of every rule on the CPU, as ratios to ``lloyd-max`` on the same tensor, in one run.

For each case (a tensor N(0, 1), seed 0, a bit width and a granularity), every rule quantizes the same tensor:
the median wall time of ``--repeats`` warm calls (after one untimed call) at torch's default thread count, the
relative MSE ``||W_hat - W||^2 / ||W||^2`` and bits per weight counted from the stored tensors. The ratio column
divides each rule's time by ``lloyd-max``'s in the same case; absolute times depend on the machine, ratios much
less.

The first case is the exact-codebook one: ``lloyd-optimal`` per output channel, 3 bits, on a 256x2304 tensor
(a 3x3 convolution with 256 input channels, flattened), where the rule solves 256 exact 1-D k-means problems of
2304 values each.

Usage::

    python benchmarks/rule_speed.py [--cases channel:3:256x2304,group:64:4:1024x4096] [--rules ...]
        [--repeats 5] [--out benchmarks/results]

Writes ``rule_speed.json`` (command, versions, machine, date) and ``rule_speed.md`` into ``--out``.
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

#: ``name[:option=value...]`` of the rules timed (``lloyd-max`` is the reference of the ratios); a rule without
#: the case's bit width is left out of that case. ``statq`` iterates its scale unless ``rule=analytic``.
RULES = (
    "lloyd-max",
    "lloyd-optimal",
    "lloyd-empirical",
    "minmax",
    "mse",
    "nf4",
    "statq",
    "statq:format=uint",
    "statq:format=uint:rule=analytic",
)
#: ``granularity:bits:ROWSxCOLS``.
CASES = ("channel:3:256x2304", "group:64:4:1024x4096")


def parse_rule(spec: str) -> tuple[str, dict[str, Any]]:
    """``"statq:format=int"`` -> ``("statq", {"format": "int"})``."""
    name, *opts = spec.split(":")
    return name, dict(o.split("=", 1) for o in opts)


def parse_case(spec: str) -> tuple[str, int, tuple[int, int]]:
    """``"group:64:4:1024x4096"`` -> ``("group:64", 4, (1024, 4096))``."""
    *gran, bits, shape = spec.split(":")
    rows, cols = (int(v) for v in shape.split("x"))
    return ":".join(gran), int(bits), (rows, cols)


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_case(spec: str, rules: list[str], repeats: int) -> list[dict[str, Any]]:
    gran, bits, shape = parse_case(spec)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for r in rules:
        name, opts = parse_rule(r)
        if bits not in quantizer_class(name).supported_bits:
            continue  # e.g. nf4 at 3 bits
        rule = get_quantizer(name, bits, **opts)
        seconds, qt = timed(lambda rule=rule: rule.quantize(w, gran), repeats)
        rows.append({"rule": r, "seconds": seconds, "rel_mse": qt.rel_mse(w), "bits_per_weight": qt.bits_per_weight()})
        print(spec, rows[-1], flush=True)
    ref = next((row["seconds"] for row in rows if row["rule"] == "lloyd-max"), None)
    for row in rows:
        row["ratio_to_lloyd_max"] = None if ref is None else row["seconds"] / ref
    return rows


def markdown(result: dict[str, Any]) -> str:
    """A table per case: time, ratio to ``lloyd-max``, relative MSE and bits per weight of every rule."""
    lines = [
        f"`{result['command']}` ({result['date']}, {result['machine'].get('cpu', 'CPU')}, "
        f"{result['threads']} threads; median of {result['repeats']} warm calls).",
        "",
    ]
    for spec, rows in result["cases"].items():
        gran, bits, (r, c) = parse_case(spec)
        lines += [
            f"**{r}x{c}, {bits} bits, {gran}**",
            "",
            "| rule | ms | x lloyd-max | rel MSE | bits/w |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for row in rows:
            ratio = "" if row["ratio_to_lloyd_max"] is None else f"{row['ratio_to_lloyd_max']:.1f}"
            lines.append(
                f"| {row['rule']} | {1000 * row['seconds']:.1f} | {ratio} | {row['rel_mse']:.3e} | "
                f"{row['bits_per_weight']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    result: dict[str, Any] = {
        **provenance(__file__, argv),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "cases": {},
    }
    for spec in args.cases.split(","):
        result["cases"][spec] = run_case(spec, args.rules.split(","), args.repeats)
    write_result(Path(args.out), "rule_speed", result, markdown)
    return result


if __name__ == "__main__":
    main()
