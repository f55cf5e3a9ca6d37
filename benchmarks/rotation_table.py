"""Random block Walsh-Hadamard rotation (``rotate=hadamard:B``) against no rotation, at equal stored bits.

For each model and setting (rule x bits x rotation), every layer is quantized by :func:`dfquant.quantize_model`
with the command line's defaults (BatchNorm folding and data-free bias correction where a model has BatchNorms),
and:

* CIFAR-10 ResNet-20: per output channel, every layer (first and last included); top-1 on the exact first 1017
  test images (the figure ``dfquant quantize cifar-resnet20 --eval cifar10`` prints).
* MiniLM (all-MiniLM-L6-v2): the linear layers in groups of 64 with float16 scales (and offsets); the pooled
  relative weight error ``sum ||W_hat - W||^2 / sum ||W||^2`` over those layers, and the data-free fidelity
  check's mean embedding cosine against the float model (:mod:`dfquant.eval.fidelity`, 64 synthetic sentences).

``bits/w`` counts what is stored: codes, scales, offsets and fitted levels over the weights; a rotation stores
only its block size and seed. No data is used to quantize.

Usage::

    python benchmarks/rotation_table.py [--models cifar-resnet20,minilm] [--rules minmax,mse,...]
        [--bits 2,3,4] [--rotations none,hadamard:64,hadamard:16] [--out benchmarks/results]

Writes ``rotation_table.json`` (command, versions, machine, date) and ``rotation_table.md`` into ``--out``, after
every model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench_common import RESULTS, pooled_rel_mse, provenance, write_result
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.eval.cifar10 import EXACT_FILE, load_cifar10, predict
from dfquant.eval.metrics import top1_accuracy
from dfquant.eval.registry import evaluate
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers import quantizer_class
from dfquant.zoo import load_model

MODELS = ("cifar-resnet20", "minilm")
#: Table label -> (registered rule, options).
RULES: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("minmax", {}),
    "mse": ("mse", {}),
    "lloyd-max": ("lloyd-max", {}),
    "statq": ("statq", {}),
    "statq-uint": ("statq", {"format": "uint"}),
    "lloyd-optimal": ("lloyd-optimal", {}),
}
ROTATIONS = ("none", "hadamard:64", "hadamard:16")
GRANULARITY = {"cifar-resnet20": "channel", "minilm": "group:64"}
#: Scales and offsets as stored: float16 per group of 64 on MiniLM, as HQQ and bitsandbytes keep theirs.
SCALE_DTYPE = {"cifar-resnet20": "float32", "minilm": "float16"}


def _config(model: str, rule: str, opts: dict[str, Any], bits: int, rotate: str) -> QuantConfig:
    base = LayerRule(rule, bits, GRANULARITY[model], options=opts, rotate=rotate, scale_dtype=SCALE_DTYPE[model])
    if model == "minilm":  # the linear layers of the encoder blocks; the embeddings stay float
        return QuantConfig(base, rules=(PatternRule("*embeddings*", skip=True),))
    return QuantConfig(base)


def run_model(name: str, rules: list[str], bits_list: list[int], rotations: list[str]) -> dict[str, Any]:
    loaded = load_model(name)
    model = loaded.model.eval()
    entry: dict[str, Any] = {"granularity": GRANULARITY[name], "rows": []}
    if name == "cifar-resnet20":
        x, y = load_cifar10(EXACT_FILE)
        entry["float_top1"] = round(top1_accuracy(predict(model, x), y), 4)
    for label in rules:
        rule, opts = RULES[label]
        for bits in bits_list:
            if bits not in quantizer_class(rule).supported_bits:
                continue
            for rotate in rotations:
                t0 = time.perf_counter()
                qmodel, report = quantize_model(model, _config(name, rule, opts, bits, rotate))
                row: dict[str, Any] = {
                    "rule": label,
                    "bits": bits,
                    "rotate": rotate,
                    "bits_per_weight": round(report.bits_per_weight, 4),
                    "quantize_s": round(time.perf_counter() - t0, 2),
                }
                if name == "cifar-resnet20":
                    row["top1"] = round(top1_accuracy(predict(qmodel, x), y), 4)
                else:
                    names = [r.name for r in report.layers]
                    row["rel_mse"] = pooled_rel_mse(model, qmodel, names)
                    fid = evaluate("fidelity", loaded, model, qmodel)
                    row["cosine"] = fid["quantized"]["cosine"]
                print(name, row, flush=True)
                entry["rows"].append(row)
    return entry


def markdown(result: dict[str, Any]) -> str:
    """One table per model: each rule and bit width with every rotation side by side."""
    lines = [f"`{result['command']}` ({result['date']}). {result['setup']}", ""]
    for name, m in result["models"].items():
        rots = result["rotations"]
        if name == "cifar-resnet20":
            lines += [f"**{name}** (per channel; float top-1 {m['float_top1']:.2f} %): top-1 % (bits/w)", ""]
        else:
            lines += [f"**{name}** ({m['granularity']}): pooled rel. weight MSE / fidelity cosine (bits/w)", ""]
        lines += [
            "| rule | bits | " + " | ".join(rots) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in rots) + " |",
        ]
        keys = sorted({(r["rule"], r["bits"]) for r in m["rows"]}, key=lambda k: (k[1], list(RULES).index(k[0])))
        for rule, bits in keys:
            cells = []
            for rot in rots:
                r = next((r for r in m["rows"] if (r["rule"], r["bits"], r["rotate"]) == (rule, bits, rot)), None)
                if r is None:
                    cells.append("")
                elif "top1" in r:
                    cells.append(f"{r['top1']:.2f} ({r['bits_per_weight']:.2f})")
                else:
                    cells.append(f"{r['rel_mse']:.5f} / {r['cosine']:.4f} ({r['bits_per_weight']:.2f})")
            lines.append(f"| {rule} | {bits} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--rotations", default=",".join(ROTATIONS))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    result: dict[str, Any] = {
        **provenance(__file__, argv),
        "setup": "BatchNorm folding and bias correction on (the command line's defaults); no data used to quantize.",
        "rotations": args.rotations.split(","),
        "models": {},
    }
    for name in args.models.split(","):
        result["models"][name] = run_model(
            name, args.rules.split(","), [int(b) for b in args.bits.split(",")], args.rotations.split(",")
        )
        write_result(Path(args.out), "rotation_table", result, markdown)
    return result


if __name__ == "__main__":
    main()
