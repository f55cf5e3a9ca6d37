"""DF-MPC on CIFAR-10 ResNet-20 and ResNet-32: mixed precision with and without compensation, against plain W4.

For each model: float; MP2/6 (ternary low layers, minmax 6-bit elsewhere) without compensation and with it
under each BatchNorm-statistics rule and both coefficient rules (``c=none``: the re-derived statistics alone,
the default; ``c=loss``: the paper's closed-form coefficients), bias correction on and off; the same with
4-level 2-bit low rules (``mse`` on the mid-rise grid; ``lloyd-optimal``, the exact 4-level per-channel
codebook, plain and with each weight's error weighted by its input channel's variance from the previous
BatchNorm, ``+iv``); MP3/6 (``mse`` and ``dorefa`` 3-bit low layers) likewise; plain W4 per channel
(``minmax`` and ``mse``) at a similar size; the ``+rot`` rows rotate every layer, low and high
(``rotate=hadamard:64``: :mod:`dfquant.methods.rotate`). Columns: top-1 on the 1017 exact test images, top-1
agreement with the float model on the 10,000-image JPEG copy (for the float model, the no-compensation rows and the
``projection`` / ``projection-noise`` rows with ``c=none`` of MP2/6 ternary, MP2/6 lloyd-optimal+iv and MP3/6
mse, and W4 minmax: a 10,000-image pass costs about a minute on one thread), the file size in bytes and the
bits per quantized weight.

Layers outside a pair (the stem ``conv1`` and the final ``linear``; the option-A shortcuts have no weights)
get the high rule (6 bits): they are not followed by a layer that could compensate them, and the stem reads
the image directly.

Usage:
    python benchmarks/dfmpc_table.py [--models 20,32] [--lows "MP2/6 ternary,MP3/6 mse"] [--no-agreement]
        [--out benchmarks/results]

Writes ``dfmpc_table.json`` (with its command, versions, machine and date) and ``dfmpc_table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench_common import RESULTS, provenance, write_result
from dfquant.config import LayerRule, QuantConfig
from dfquant.eval.cifar10 import EXACT_FILE, JPEG_FILE, load_cifar10, predict
from dfquant.graph.pairs import find_compensation_pairs
from dfquant.io.save import save_quantized
from dfquant.pipeline.compensate import compensate_model, dfmpc_config
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import load_model

HIGH = LayerRule("minmax", 6)
ROT = "hadamard:64"
LOWS = {
    "MP2/6 ternary": LayerRule("ternary", 2),
    "MP2/6 mse-4lvl": LayerRule("mse", 2),
    "MP2/6 lloyd-optimal": LayerRule("lloyd-optimal", 2),
    "MP2/6 lloyd-optimal+iv": LayerRule("lloyd-optimal", 2, options={"weighting": "input-variance"}),
    "MP3/6 mse": LayerRule("mse", 3),
    "MP3/6 dorefa": LayerRule("dorefa", 3),
    # every layer rotated (rotate=hadamard:64, low and high rules alike)
    "MP2/6 ternary+rot": LayerRule("ternary", 2, rotate=ROT),
    "MP2/6 lloyd-optimal+iv+rot": LayerRule("lloyd-optimal", 2, options={"weighting": "input-variance"}, rotate=ROT),
    "MP3/6 mse+rot": LayerRule("mse", 3, rotate=ROT),
}
PLAIN = {"W4 minmax": LayerRule("minmax", 4), "W4 mse": LayerRule("mse", 4)}
STATS = ("float", "projection", "projection-noise", "moments")
#: ``none``: c = 1, the re-derived statistics alone (the default); ``loss``: the paper's closed-form c.
COEFFICIENTS = ("none", "loss")


def _row(
    name: str, model: torch.nn.Module, loaded: Any, data: dict[str, Any], report: Any = None, agree: bool = False
) -> dict[str, Any]:
    x, y = data["exact"]
    top1 = 100.0 * float((predict(model, x) == y).float().mean())
    row: dict[str, Any] = {"config": name, "top1": round(top1, 2)}
    if agree and data.get("jpeg") is not None:
        pj = predict(model, data["jpeg"])
        row["agreement"] = round(100.0 * float((pj == data["float_jpeg"]).float().mean()), 2)
    if report is not None:
        with tempfile.TemporaryDirectory() as d:
            path = save_quantized(model, Path(d) / "m.safetensors", source=loaded.source, report=report)
            row["file_bytes"] = path.stat().st_size
        row["bits_per_weight"] = round(report.bits_per_weight, 3)
    return row


def run(depth: int, agreement: bool, lows: dict[str, LayerRule] = LOWS) -> list[dict[str, Any]]:
    loaded = load_model(f"cifar-resnet{depth}")
    model = loaded.model.eval()
    data: dict[str, Any] = {"exact": load_cifar10(EXACT_FILE), "jpeg": None}
    if agreement:
        data["jpeg"] = load_cifar10(JPEG_FILE)[0]
        data["float_jpeg"] = predict(model, data["jpeg"])
    rows = [_row("float", model, loaded, data)]
    rows[0]["bits_per_weight"] = 32.0
    low_layers = [p.low for p in find_compensation_pairs(model)]
    for label, low in lows.items():
        high = dataclasses.replace(HIGH, rotate=low.rotate)  # a rotated low rule rotates the high layers too
        for bc in (True, False):
            tag = "BC on" if bc else "BC off"
            q, rep = quantize_model(model, dfmpc_config(low_layers, low, high, bias_correction=bc))
            key = label in ("MP2/6 ternary", "MP2/6 lloyd-optimal+iv", "MP3/6 mse") and bc
            rows.append(_row(f"{label}, no compensation, {tag}", q, loaded, data, rep, agree=key))
            for stats in STATS:
                for coef in COEFFICIENTS:
                    if stats == "float" and coef == "none":
                        continue  # float statistics and c = 1: the no-compensation row
                    q, rep, drep = compensate_model(
                        model, low=low, high=high, stats=stats, bias_correction=bc, coefficient=coef
                    )
                    agree = key and coef == "none" and stats in ("projection", "projection-noise")
                    row = _row(f"{label}, DF-MPC {stats} c={coef}, {tag}", q, loaded, data, rep, agree=agree)
                    row["c_mean"] = round(sum(p.c_mean for p in drep.pairs) / len(drep.pairs), 3)
                    row["max_dev"] = max(max(p.weight_dev, p.bias_dev) for p in drep.pairs)
                    rows.append(row)
            print(f"  resnet{depth} {label} {tag} done", flush=True)
    for label, rule in PLAIN.items():
        q, rep = quantize_model(model, QuantConfig(rule))
        rows.append(_row(f"{label} per channel, BC on", q, loaded, data, rep, agree=label == "W4 minmax"))
    return rows


def markdown(result: dict[str, Any]) -> str:
    """Every row of a result, one table per model."""
    lines = [
        f"`{result['command']}` ({result['date']}); top-1 on the 1017 exact test images, agreement with the "
        "float model on the 10,000-image JPEG copy.",
        "",
    ]
    for model, rows in result["models"].items():
        lines += [
            f"**{model}**",
            "",
            "| config | top-1 exact (%) | agreement 10k (%) | file bytes | bits/weight | mean c |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            lines.append(
                f"| {r['config']} | {r['top1']:.2f} | {r.get('agreement', '-')} | {r.get('file_bytes', '-')} | "
                f"{r.get('bits_per_weight', '-')} | {r.get('c_mean', '-')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--models", default="20,32")
    ap.add_argument("--no-agreement", action="store_true", help="skip the 10,000-image JPEG agreement")
    ap.add_argument("--lows", help=f"comma-separated low rules to run (default all: {'; '.join(LOWS)})")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, Any] = {**provenance(__file__, argv), "models": {}}
    lows = LOWS
    if args.lows:
        unknown = [k for k in args.lows.split(",") if k not in LOWS]
        if unknown:
            ap.error(f"unknown --lows {unknown}; allowed: {', '.join(LOWS)}")
        lows = {k: LOWS[k] for k in args.lows.split(",")}
    for depth in (int(d) for d in args.models.split(",")):
        t0 = time.time()
        result["models"][f"resnet{depth}"] = run(depth, not args.no_agreement, lows)
        print(f"ResNet-{depth} ({time.time() - t0:.0f} s)", flush=True)
        write_result(Path(args.out), "dfmpc_table", result, markdown)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
