"""Data-free bit allocation (``--budget``) against uniform bits at equal stored bits, on every model.

For each model one rule is fixed (quantizer, granularity, scale dtype, ``rotate=hadamard:64``); the allocation
(:mod:`dfquant.methods.allocate`) chooses each layer's bits (from ``BUDGET_BITS``) and the rotation on or off,
from the sensitivities it measures on the fidelity check's synthetic inputs, within the budget. The uniform rows
quantize every layer at one width with the same rule (rotated). Bits per weight are counted from the stored
tensors (codes, scales, offsets), as the report counts them.

* ``cifar-resnet20``: ``statq`` per channel, float32 scales, BatchNorm folding and bias correction (the CLI's
  defaults); CIFAR-10 top-1 on the exact 1017 test images.
* ``minilm``: ``statq`` ``format=uint`` in groups of 64, float16 scales and offsets, embeddings float; the data-free
  fidelity check's embedding cosine, STS-B test Spearman x 100 and the pooled relative weight MSE.
* ``smollm2-135m``: ``mse`` with ``grid=lloyd-gaussian`` (the Gaussian Lloyd-Max table with a searched scale per
  group, no offset) in groups of 64, float16 scales, embeddings and the tied head float, bits from ``2,3,4,5``
  only (each candidate is a whole quantization of the layer); WikiText-2 perplexity on ``--windows`` windows of
  1024 tokens, next to HQQ 4-bit and 3-bit and bitsandbytes NF4 in groups of 64 on the same layers (their
  dequantized weights; :mod:`peers`). Its float weights come from a 4-bit GGUF.

Usage::

    python benchmarks/budget_table.py [--models cifar-resnet20,minilm,smollm2-135m] [--windows 32]
        [--out benchmarks/results]

Writes ``budget_table.json`` (command, versions, machine, date) and ``budget_table.md`` into ``--out``. A run of
some of the models keeps the other models' entries of an existing ``budget_table.json``, each with the command and
date of the run that produced it (``run``; the table names it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, pooled_rel_mse, provenance, write_result
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.eval.cifar10 import EXACT_FILE, load_cifar10, predict
from dfquant.eval.fidelity import fidelity_probe
from dfquant.eval.metrics import top1_accuracy
from dfquant.eval.registry import evaluate
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import load_model

ROTATE = "hadamard:64"
#: model -> (rule, options, granularity, scale dtype, skipped patterns)
RULES: dict[str, tuple[str, dict[str, Any], str, str, tuple[str, ...]]] = {
    "cifar-resnet20": ("statq", {}, "channel", "float32", ()),
    "minilm": ("statq", {"format": "uint"}, "group:64", "float16", ("*embeddings*",)),
    "smollm2-135m": ("mse", {"grid": "lloyd-gaussian"}, "group:64", "float16", ("*embed*", "lm_head")),
}
BUDGETS = {
    "cifar-resnet20": (2.25, 3.0, 3.25, 4.25),
    "minilm": (3.0, 3.5, 4.25, 4.5),
    "smollm2-135m": (3.25, 4.25),
}
BUDGET_BITS = {"cifar-resnet20": (2, 3, 4, 5, 6, 8), "minilm": (2, 3, 4, 5, 6, 8), "smollm2-135m": (2, 3, 4, 5)}
UNIFORM = {"cifar-resnet20": (2, 3, 4), "minilm": (2, 3, 4), "smollm2-135m": (3, 4)}
#: SmolLM2's peers, each on the layers dfquant quantizes: (label, library function name, arguments)
PEERS = (("HQQ 4-bit g64", "hqq_fn", (4, "group:64")), ("HQQ 3-bit g64", "hqq_fn", (3, "group:64")))


def _config(model: str, bits: int, budget: float | None) -> QuantConfig:
    rule, opts, gran, sdtype, skip = RULES[model]
    return QuantConfig(
        LayerRule(rule, bits, gran, options=opts, rotate=ROTATE, scale_dtype=sdtype),
        rules=tuple(PatternRule(p, skip=True) for p in skip),
        budget=budget,
        budget_bits=BUDGET_BITS[model],
    )


def _measure(name: str, loaded: Any, qmodel: torch.nn.Module, report: Any, windows: int, data: Any) -> dict[str, Any]:
    model = loaded.model
    row: dict[str, Any] = {"bits_per_weight": round(report.bits_per_weight, 4)}
    if name == "cifar-resnet20":
        x, y = data
        row["top1"] = round(top1_accuracy(predict(qmodel, x), y), 4)
    elif name == "minilm":
        row["rel_mse"] = pooled_rel_mse(model, qmodel, [r.name for r in report.layers])
        row["cosine"] = evaluate("fidelity", loaded, model, qmodel)["quantized"]["cosine"]
        row["stsb"] = evaluate("stsb", loaded, model, qmodel)["quantized"]["spearman"]
    else:
        row["ppl"] = evaluate("wikitext2", loaded, None, qmodel, limit=windows)["quantized"]["ppl"]
    return row


def _peer_rows(loaded: Any, windows: int, names: list[str]) -> list[dict[str, Any]]:
    import peers
    from task_quality import fake_quantize

    rows = []
    settings = [peers.Setting("hqq", "hqq", a[0], a[1], getattr(peers, fn)(*a), "") for _, fn, a in PEERS]
    settings.append(peers.Setting("bitsandbytes", "bnb-nf4", 4, "group:64", peers.bnb4_fn("nf4", 64, False), ""))
    labels = [p[0] for p in PEERS] + ["bitsandbytes NF4 g64"]
    for label, s in zip(labels, settings, strict=True):
        t0 = time.perf_counter()
        qmodel, info = fake_quantize(loaded.model, s)
        quantized = set(peers_names(qmodel, loaded.model))
        assert quantized == set(names), f"{label} quantized other layers than dfquant"
        ppl = evaluate("wikitext2", loaded, None, qmodel, limit=windows)["quantized"]["ppl"]
        row = {"setting": label, "bits_per_weight": round(info["bpw"], 4), "ppl": ppl}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(row, flush=True)
        rows.append(row)
    return rows


def peers_names(qmodel: torch.nn.Module, model: torch.nn.Module) -> list[str]:
    """The layers whose weight a peer changed."""
    ref = dict(model.named_modules())
    out = []
    for n, m in qmodel.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and n in ref and not torch.equal(w, ref[n].weight):
            out.append(n)
    return out


def run_model(name: str, windows: int) -> dict[str, Any]:
    loaded = load_model(name)
    model = loaded.model.eval()
    rule, opts, gran, sdtype, _ = RULES[name]
    entry: dict[str, Any] = {
        "rule": rule,
        "options": opts,
        "granularity": gran,
        "scale_dtype": sdtype,
        "rotate": ROTATE,
        "rows": [],
    }
    data = load_cifar10(EXACT_FILE) if name == "cifar-resnet20" else None
    if name == "cifar-resnet20":
        entry["float"] = {"top1": round(top1_accuracy(predict(model, data[0]), data[1]), 4)}
    elif name == "smollm2-135m":
        entry["float"] = {"ppl": evaluate("wikitext2", loaded, model, None, limit=windows)["float"]["ppl"]}
    probe = fidelity_probe(loaded)
    names: list[str] = []
    for bits in UNIFORM[name]:
        t0 = time.perf_counter()
        qmodel, report = quantize_model(model, _config(name, bits, None))
        names = [r.name for r in report.layers]
        row = {"setting": f"uniform {bits}-bit", **_measure(name, loaded, qmodel, report, windows, data)}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, row, flush=True)
        entry["rows"].append(row)
    for budget in BUDGETS[name]:
        t0 = time.perf_counter()
        qmodel, report = quantize_model(model, _config(name, 4, budget), probe=probe)
        plan = report.allocation
        assert plan is not None
        row = {"setting": f"budget {budget}", **_measure(name, loaded, qmodel, report, windows, data)}
        row["plan"] = {
            "bits": {
                str(b): sum(1 for u in plan["layers"] if u["bits"] == b)
                for b in sorted({u["bits"] for u in plan["layers"]})
            },
            "rotated": sum(1 for u in plan["layers"] if u["rotate"] != "none"),
            "layers": len(plan["layers"]),
            "predicted_error": plan["predicted_error"],
        }
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, row, flush=True)
        entry["rows"].append(row)
    if name == "smollm2-135m":
        entry["peers"] = _peer_rows(loaded, windows, names)
    return entry


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}` ({result['date']}, {result['machine']['cpu']}).", ""]
    metric = {"cifar-resnet20": ("top1",), "minilm": ("cosine", "stsb", "rel_mse"), "smollm2-135m": ("ppl",)}
    for name, m in result["models"].items():
        cols = metric[name]
        opts = "".join(f" {k}={v}" for k, v in m["options"].items())
        float_txt = "".join(f", float {k} {v:.4g}" for k, v in m.get("float", {}).items())
        run = m.get("run", {})
        ran = f" Run: `{run['command']}` ({run['date']})." if run and run.get("date") != result["date"] else ""
        lines += [
            f"**{name}**: `{m['rule']}`{opts}, {m['granularity']}, {m['scale_dtype']} scales, rotate {m['rotate']}"
            f"{float_txt}.{ran}",
            "",
            "| setting | bits/w | " + " | ".join(cols) + " | plan (layers per bits; rotated) |",
            "| --- | ---: | " + " | ".join("---:" for _ in cols) + " | --- |",
        ]
        for r in m["rows"] + m.get("peers", []):
            vals = [
                f"{r[c]:.5f}" if c == "rel_mse" else f"{r[c]:.4f}" if c == "cosine" else f"{r[c]:.2f}" for c in cols
            ]
            plan = r.get("plan")
            ptxt = (
                "-"
                if plan is None
                else (
                    ", ".join(f"{k}b x{v}" for k, v in plan["bits"].items()) + f"; {plan['rotated']}/{plan['layers']}"
                )
            )
            lines.append(f"| {r['setting']} | {r['bits_per_weight']:.3f} | {' | '.join(vals)} | {ptxt} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(RULES))
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = provenance(__file__, argv)
    result: dict[str, Any] = {**run, "windows": args.windows, "models": {}}
    kept = Path(args.out) / "budget_table.json"
    names = args.models.split(",")
    if kept.exists() and set(names) != set(RULES):  # a partial run keeps the other models' rows, and their runs
        old = json.loads(kept.read_text())
        for name, entry in old.get("models", {}).items():
            if name not in names and name in RULES:
                entry.setdefault("run", {k: old[k] for k in ("command", "date") if k in old})
                entry["run"].setdefault("windows", old.get("windows"))
                result["models"][name] = entry
    for name in names:
        entry = run_model(name, args.windows)
        entry["run"] = {"command": run["command"], "date": run["date"], "windows": args.windows}
        result["models"][name] = entry
        result["models"] = {n: result["models"][n] for n in RULES if n in result["models"]}
        write_result(Path(args.out), "budget_table", result, markdown)
    return result


if __name__ == "__main__":
    main()
