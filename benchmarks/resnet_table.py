"""CIFAR-10 ResNets quantized without data: every rule x bits (2, 3, 4) x bias correction off/on.

For each model (ResNet-20 and ResNet-32 from the assets folder) and each setting, the weights of every layer
(first and last included) are quantized per output channel with BatchNorm folding, by
:func:`dfquant.quantize_model`, then evaluated as ``dfquant quantize MODEL --eval cifar10`` does: top-1 on
the exact first 1017 test images and top-1 agreement with the float model on the 10,000-image JPEG copy
(:mod:`dfquant.eval.cifar10`). "Bias correction on" is the data-free DFQ correction (Nagel et al. 2019) of
every layer whose input statistics follow from the BatchNorms, residual sums included
(:func:`dfquant.methods.bn.propagate_moments`). No image is used to quantize.

Rules: the registered per-channel rules, plus ``lloyd-optimal`` with ``weighting="input-variance"`` (the
weight error of each input channel weighted by that channel's BatchNorm-derived variance), shown as
``lloyd-optimal+iv``. ``nf4`` exists at 4 bits only. ``bits/w`` counts codes, scales, offsets and per-channel
codebooks (float32) over the weights.

Writes ``resnet_table.json`` (with the command, versions, machine and date) and ``resnet_table.md`` into
``--out`` (atomically, after every setting, so an interrupted run leaves the settings done so far) and prints the
markdown.

Usage:
    python benchmarks/resnet_table.py [--out benchmarks/results] [--models cifar-resnet20,cifar-resnet32]
        [--rules minmax,lloyd-optimal+iv] [--bits 2,3,4] [--eval-limit N] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench_common import RESULTS, provenance, write_result
from dfquant.config import LayerRule, QuantConfig
from dfquant.eval.cifar10 import EXACT_FILE, JPEG_FILE, load_cifar10, predict
from dfquant.eval.metrics import agreement, top1_accuracy
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers import quantizer_class
from dfquant.zoo import load_model

MODELS = ("cifar-resnet20", "cifar-resnet32")
#: Table label -> (registered rule, options).
RULES: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("minmax", {}),
    "mse": ("mse", {}),
    "aciq": ("aciq", {}),
    "statq": ("statq", {}),
    "apot": ("apot", {}),
    "nf4": ("nf4", {}),
    "lloyd-max": ("lloyd-max", {}),
    "lloyd-empirical": ("lloyd-empirical", {}),
    "lloyd-optimal": ("lloyd-optimal", {}),
    "lloyd-optimal+iv": ("lloyd-optimal", {"weighting": "input-variance"}),
}
#: The setting recommended for these models (marked in the table).
RECOMMENDED = "lloyd-optimal+iv"
TARGETS = {
    "cifar-resnet20": {4: (91.0, 93.0), 3: (89.0, 85.0)},
}


def _cell(entry: dict[str, Any] | None, key: str) -> str:
    return "-" if entry is None else f"{entry[key]:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """One table per model: a row per rule and bits, top-1 and agreement with bias correction off and on."""
    lines = [
        f"`{result['command']}` ({result['date']}). Per channel, all layers, BatchNorm folded, no data used to "
        f"quantize. Top-1: exact first {result['setup']['top1_images']} test images. Agreement: top-1 agreement with "
        f"the float model on {result['setup']['agreement_images']} JPEG-q75 test images. BC: data-free bias "
        "correction. bits/w: storage bits per weight (codes, scales, offsets, per-channel codebooks). "
        f"`{RECOMMENDED}` (bold) is the recommended setting.",
    ]
    for model, m in result["models"].items():
        lines += [
            "",
            f"**{model}** (float top-1 {m['float_top1']:.2f} %)",
            "",
            "| quantizer | bits | bits/w | top-1 BC off | top-1 BC on | agreement BC off | agreement BC on |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in m["rows"]:
            off, on = row.get("bc_off"), row.get("bc_on")
            bpw = (on or off or {}).get("bits_per_weight")
            name = f"**{row['rule']}**" if row["rule"] == RECOMMENDED else row["rule"]
            lines.append(
                f"| {name} | {row['bits']} | {'-' if bpw is None else f'{bpw:.2f}'} | {_cell(off, 'top1')} | "
                f"{_cell(on, 'top1')} | {_cell(off, 'agreement')} | {_cell(on, 'agreement')} |"
            )
        for bits, (t1, agr) in sorted(TARGETS.get(model, {}).items(), reverse=True):
            lines.append("")
            lines.append(f"Target W{bits}: top-1 >= {t1} %, agreement >= {agr} %.")
    return "\n".join(lines) + "\n"


def run_setting(
    model: torch.nn.Module,
    rule: str,
    options: dict[str, Any],
    bits: int,
    bias_correction: bool,
    data: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Quantize ``model`` with one setting and evaluate it against the cached float predictions."""
    t0 = time.perf_counter()
    cfg = QuantConfig(LayerRule(rule, bits, "channel", options=options), bias_correction=bias_correction)
    qmodel, report = quantize_model(model, cfg)
    t1 = time.perf_counter()
    pe = predict(qmodel, data["exact_x"])
    pj = predict(qmodel, data["jpeg_x"])
    t2 = time.perf_counter()
    return {
        "top1": round(top1_accuracy(pe, data["exact_y"]), 4),
        "correct": int((pe == data["exact_y"]).sum()),
        "agreement": round(agreement(pj, data["float_jpeg"]), 4),
        "bits_per_weight": round(report.bits_per_weight, 4),
        "bias_corrected_layers": len(report.bias_corrected),
        "quantize_s": round(t1 - t0, 2),
        "eval_s": round(t2 - t1, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rules", default=",".join(RULES), help=f"labels among {', '.join(RULES)}")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--eval-limit", type=int, help="agreement on the first N JPEG images (quick looks)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in labels if r not in RULES]
    if unknown:
        ap.error(f"unknown rule label(s) {unknown}; known: {', '.join(RULES)}")
    bit_list = [int(b) for b in args.bits.split(",")]
    out = Path(args.out)

    exact_x, exact_y = load_cifar10(EXACT_FILE)
    jpeg_x, _ = load_cifar10(JPEG_FILE)
    if args.eval_limit:
        jpeg_x = jpeg_x[: args.eval_limit]
    result: dict[str, Any] = {
        **provenance(__file__, argv),
        "setup": {
            "top1_images": int(exact_x.shape[0]),
            "agreement_images": int(jpeg_x.shape[0]),
            "granularity": "channel",
            "fold_bn": True,
            "data_used_to_quantize": "none",
            "threads": torch.get_num_threads(),
        },
        "models": {},
    }
    start = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = load_model(name).model
        float_exact = predict(model, exact_x)
        data = {
            "exact_x": exact_x,
            "exact_y": exact_y,
            "jpeg_x": jpeg_x,
            "float_jpeg": predict(model, jpeg_x),
        }
        entry: dict[str, Any] = {"float_top1": round(top1_accuracy(float_exact, exact_y), 4), "rows": []}
        result["models"][name] = entry
        for label in labels:
            rule, options = RULES[label]
            for bits in bit_list:
                if bits not in quantizer_class(rule).supported_bits:
                    continue
                row: dict[str, Any] = {"rule": label, "quantizer": rule, "options": options, "bits": bits}
                entry["rows"].append(row)
                for bc in (False, True):
                    row["bc_on" if bc else "bc_off"] = run_setting(model, rule, options, bits, bc, data)
                    result["elapsed_s"] = round(time.perf_counter() - start, 1)
                    write_result(out, "resnet_table", result, markdown)
    print(markdown(result), end="")
    return result


if __name__ == "__main__":
    main()
