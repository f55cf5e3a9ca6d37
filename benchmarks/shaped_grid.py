"""The rotated analytic grid at equal stored bits: the Gaussian Lloyd-Max table with a searched per-group scale
(``mse`` with ``grid=lloyd-gaussian``) against the integer grid, ``statq`` and the peers, on every model.

After a Hadamard rotation (``rotate=hadamard:64``) each weight group is close to Gaussian, so the Lloyd-Max table
of N(0, 1) is the right *shape*; ``mse`` searches each group's scale for the least squared error on the group's
own values, and stores no offset. Every row counts its bits from the stored tensors (codes, scales, offsets).

* ``cifar-resnet20``: per channel, float32 scales, BatchNorm folding and bias correction; CIFAR-10 top-1 on the
  exact 1017 test images.
* ``minilm``: linear layers in groups of 64, float16 scales, embeddings float; pooled relative weight MSE and the
  data-free fidelity check's embedding cosine; HQQ at 2, 3 and 4 bits in groups of 64 on the same layers.
* ``smollm2-135m``: groups of 64, float16 scales, embeddings and the tied head float; WikiText-2 perplexity on
  ``--windows`` windows of 1024 tokens; HQQ 4-bit and 3-bit and bitsandbytes NF4 in groups of 64 on the same
  layers (their dequantized weights; :mod:`peers`). Its float weights come from a 4-bit GGUF.

Usage::

    python benchmarks/shaped_grid.py [--models cifar-resnet20,minilm,smollm2-135m] [--windows 32]
        [--out benchmarks/results]

Writes ``shaped_grid.json`` (command, versions, machine, date) and ``shaped_grid.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, pooled_rel_mse, provenance, write_result
from budget_table import peers_names
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.eval.cifar10 import EXACT_FILE, load_cifar10, predict
from dfquant.eval.metrics import top1_accuracy
from dfquant.eval.registry import evaluate
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import load_model

#: label -> (quantizer, options)
RULES: dict[str, tuple[str, dict[str, Any]]] = {
    "mse int-mr": ("mse", {}),
    "statq": ("statq", {}),
    "statq uint": ("statq", {"format": "uint"}),
    "mse lloyd-gaussian": ("mse", {"grid": "lloyd-gaussian"}),
}
#: model -> (granularity, scale dtype, skipped patterns, bits, [(rule label, rotate)], peers [(label, fn, args)])
MODELS: dict[str, tuple[str, str, tuple[str, ...], tuple[int, ...], list[tuple[str, str]], list[Any]]] = {
    "cifar-resnet20": (
        "channel",
        "float32",
        (),
        (2, 3, 4),
        [
            ("statq", "hadamard:64"),
            ("mse int-mr", "hadamard:64"),
            ("mse lloyd-gaussian", "none"),
            ("mse lloyd-gaussian", "hadamard:64"),
        ],
        [],
    ),
    "minilm": (
        "group:64",
        "float16",
        ("*embeddings*",),
        (2, 3, 4),
        [
            ("mse int-mr", "hadamard:64"),
            ("statq uint", "hadamard:64"),
            ("mse lloyd-gaussian", "none"),
            ("mse lloyd-gaussian", "hadamard:64"),
        ],
        [(f"HQQ {b}-bit g64", "hqq_fn", (b, "group:64")) for b in (2, 3, 4)],
    ),
    "smollm2-135m": (
        "group:64",
        "float16",
        ("*embed*", "lm_head"),
        (3, 4),
        [("statq", "hadamard:64"), ("mse lloyd-gaussian", "hadamard:64")],
        [(f"HQQ {b}-bit g64", "hqq_fn", (b, "group:64")) for b in (3, 4)]
        + [("bitsandbytes NF4 g64", "bnb4_fn", ("nf4", 64, False))],
    ),
}


def _config(model: str, label: str, rotate: str, bits: int) -> QuantConfig:
    gran, sdtype, skip, *_ = MODELS[model]
    rule, opts = RULES[label]
    return QuantConfig(
        LayerRule(rule, bits, gran, options=opts, rotate=rotate, scale_dtype=sdtype),
        rules=tuple(PatternRule(p, skip=True) for p in skip),
    )


def _metrics(name: str, loaded: Any, qmodel: torch.nn.Module, names: list[str], windows: int, data: Any) -> dict:
    model = loaded.model
    if name == "cifar-resnet20":
        return {"top1": round(top1_accuracy(predict(qmodel, data[0]), data[1]), 4)}
    if name == "minilm":
        return {
            "rel_mse": pooled_rel_mse(model, qmodel, names),
            "cosine": evaluate("fidelity", loaded, model, qmodel)["quantized"]["cosine"],
        }
    return {"ppl": evaluate("wikitext2", loaded, None, qmodel, limit=windows)["quantized"]["ppl"]}


def run_model(name: str, windows: int) -> dict[str, Any]:
    import peers
    from task_quality import fake_quantize

    loaded = load_model(name)
    model = loaded.model.eval()
    gran, sdtype, _, widths, settings, peer_list = MODELS[name]
    entry: dict[str, Any] = {"granularity": gran, "scale_dtype": sdtype, "rows": []}
    data = load_cifar10(EXACT_FILE) if name == "cifar-resnet20" else None
    if name == "cifar-resnet20":
        entry["float"] = {"top1": round(top1_accuracy(predict(model, data[0]), data[1]), 4)}
    elif name == "smollm2-135m":
        entry["float"] = {"ppl": evaluate("wikitext2", loaded, model, None, limit=windows)["float"]["ppl"]}
    names: list[str] = []
    for bits in widths:
        for label, rotate in settings:
            t0 = time.perf_counter()
            qmodel, report = quantize_model(model, _config(name, label, rotate, bits))
            names = [r.name for r in report.layers]
            row = {
                "setting": label,
                "rotate": rotate,
                "bits": bits,
                "bits_per_weight": round(report.bits_per_weight, 4),
                **_metrics(name, loaded, qmodel, names, windows, data),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(name, row, flush=True)
            entry["rows"].append(row)
    for label, fn, args in peer_list:
        t0 = time.perf_counter()
        lib, method, bits = ("bitsandbytes", "bnb-nf4", 4) if fn.startswith("bnb") else ("hqq", "hqq", args[0])
        qmodel, info = fake_quantize(model, peers.Setting(lib, method, bits, "group:64", getattr(peers, fn)(*args)))
        assert set(peers_names(qmodel, model)) == set(names), f"{label} quantized other layers than dfquant"
        row = {
            "setting": label,
            "rotate": "-",
            "bits": bits,
            "bits_per_weight": round(info["bpw"], 4),
            **_metrics(name, loaded, qmodel, names, windows, data),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(name, row, flush=True)
        entry["rows"].append(row)
    return entry


def _fmt(column: str, value: float) -> str:
    return f"{value:.5f}" if column == "rel_mse" else f"{value:.4f}" if column == "cosine" else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}` ({result['date']}, {result['machine']['cpu']}).", ""]
    metric = {"cifar-resnet20": ("top1",), "minilm": ("rel_mse", "cosine"), "smollm2-135m": ("ppl",)}
    for name, m in result["models"].items():
        cols = metric[name]
        float_txt = "".join(f", float {k} {v:.4g}" for k, v in m.get("float", {}).items())
        lines += [
            f"**{name}**: {m['granularity']}, {m['scale_dtype']} scales{float_txt}.",
            "",
            "| bits | setting | rotate | bits/w | " + " | ".join(cols) + " |",
            "| ---: | --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " |",
        ]
        for r in sorted(m["rows"], key=lambda r: r["bits"]):
            vals = [_fmt(c, r[c]) for c in cols]
            lines.append(
                f"| {r['bits']} | {r['setting']} | {r['rotate']} | {r['bits_per_weight']:.3f} | {' | '.join(vals)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    result: dict[str, Any] = {**provenance(__file__, argv), "windows": args.windows, "models": {}}
    for name in args.models.split(","):
        result["models"][name] = run_model(name, args.windows)
        write_result(Path(args.out), "shaped_grid", result, markdown)
    return result


if __name__ == "__main__":
    main()
