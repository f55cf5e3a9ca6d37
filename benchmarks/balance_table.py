"""Row/column balancing (``balance``) against and together with the Hadamard rotation, at the bits each
setting stores.

Every model is quantized by :func:`dfquant.quantize_model` once per rule, width and variant (:data:`VARIANTS`).
ResNet-20: per channel, float32 scales, the command line's defaults (BatchNorm folding, bias correction), top-1 on
the exact 1017 CIFAR-10 test images; its variants separate where the column scale goes
(:mod:`dfquant.pipeline.absorb`): ``stored`` (every layer stores it), ``absorbed`` (only the layers that are the
sole reader of a BatchNorm-ReLU output are balanced, their scale moved into that BatchNorm: no bits), ``balance``
(``balance=true``: absorbed where possible, stored elsewhere), each also after the rotation. MiniLM: the linear
layers in groups of 64 with float16 scales (embeddings float), pooled relative weight MSE and the data-free
fidelity cosine; it has no BatchNorm, so its scales are stored. A stored column scale costs 16 bits per fan-in
column, counted in the bits per weight.

Usage::

    python benchmarks/balance_table.py [--out benchmarks/results]

Writes ``balance_table.json`` (command, versions, machine, date) and ``balance_table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, pooled_rel_mse, provenance, write_result
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.eval.cifar10 import EXACT_FILE, load_cifar10, predict
from dfquant.eval.metrics import top1_accuracy
from dfquant.eval.registry import evaluate
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import load_model

ROT = "hadamard:64"
#: model -> variant -> (balance, rotate)
VARIANTS: dict[str, dict[str, tuple[bool | str, str]]] = {
    "cifar-resnet20": {
        "plain": (False, "none"),
        "stored": ("stored", "none"),
        "absorbed": ("absorbed", "none"),
        "balance": (True, "none"),
        "rotate": (False, ROT),
        "rotate+absorbed": ("absorbed", ROT),
        "rotate+balance": (True, ROT),
    },
    "minilm": {"plain": (False, "none"), "balance": (True, "none"), "rotate": (False, ROT), "both": (True, ROT)},
}
#: model -> (granularity, scale dtype, [(label, rule, options, bits)])
SETTINGS: dict[str, tuple[str, str, list[tuple[str, str, dict[str, Any], int]]]] = {
    "cifar-resnet20": (
        "channel",
        "float32",
        [("statq", "statq", {}, b) for b in (2, 3, 4)] + [("minmax", "minmax", {}, 3)],
    ),
    "minilm": (
        "group:64",
        "float16",
        [("mse", "mse", {}, b) for b in (3, 4)] + [("statq-uint", "statq", {"format": "uint"}, b) for b in (3, 4)],
    ),
}


def run_model(name: str) -> dict[str, Any]:
    loaded = load_model(name)
    model = loaded.model.eval()
    gran, sdtype, settings = SETTINGS[name]
    entry: dict[str, Any] = {"granularity": gran, "scale_dtype": sdtype, "rows": []}
    data = load_cifar10(EXACT_FILE) if name == "cifar-resnet20" else None
    if data is not None:
        entry["float_top1"] = round(top1_accuracy(predict(model, data[0]), data[1]), 4)
    skip = (PatternRule("*embeddings*", skip=True),) if name == "minilm" else ()
    for label, rule, opts, bits in settings:
        row: dict[str, Any] = {"rule": label, "bits": bits}
        for variant, (bal, rot) in VARIANTS[name].items():
            t0 = time.perf_counter()
            cfg = QuantConfig(
                LayerRule(rule, bits, gran, options=opts, scale_dtype=sdtype, balance=bal, rotate=rot), rules=skip
            )
            qmodel, report = quantize_model(model, cfg)
            cell: dict[str, Any] = {"bits_per_weight": round(report.bits_per_weight, 4)}
            cell["absorbed"] = sum(1 for r in report.layers if r.balance_absorbed)
            cell["stored"] = sum(1 for r in report.layers if r.balance)
            if data is not None:
                cell["top1"] = round(top1_accuracy(predict(qmodel, data[0]), data[1]), 4)
            else:
                cell["rel_mse"] = pooled_rel_mse(model, qmodel, [r.name for r in report.layers])
                cell["cosine"] = evaluate("fidelity", loaded, model, qmodel)["quantized"]["cosine"]
            cell["seconds"] = round(time.perf_counter() - t0, 1)
            row[variant] = cell
        print(name, row, flush=True)
        entry["rows"].append(row)
    return entry


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}` ({result['date']}, {result['machine']['cpu']}).", ""]
    for name, m in result["models"].items():
        top1 = "float_top1" in m
        what = "top-1 %" if top1 else "rel. weight MSE / fidelity cosine"
        head = f"**{name}** ({m['granularity']}, {m['scale_dtype']} scales; {what} (bits per weight))"
        lines += [head + (f", float {m['float_top1']:.2f}" if top1 else "") + ".", ""]
        variants = VARIANTS[name]
        lines += ["| rule | bits | " + " | ".join(variants) + " |", "| --- | ---: |" + " ---: |" * len(variants)]
        for r in m["rows"]:
            cells = []
            for v in variants:
                c = r[v]
                val = f"{c['top1']:.2f}" if top1 else f"{c['rel_mse']:.5f} / {c['cosine']:.4f}"
                cells.append(f"{val} ({c['bits_per_weight']:.3f})")
            lines.append(f"| {r['rule']} | {r['bits']} | " + " | ".join(cells) + " |")
        first = m["rows"][0]
        counts = ", ".join(
            f"{v} {first[v]['absorbed']} absorbed / {first[v]['stored']} stored"
            for v in variants
            if first[v]["absorbed"] or first[v]["stored"]
        )
        lines += ["", f"Column scales per variant (layers): {counts}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SETTINGS))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    result: dict[str, Any] = {**provenance(__file__, argv), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = run_model(name)
        write_result(Path(args.out), "balance_table", result, markdown)
    return result


if __name__ == "__main__":
    main()
