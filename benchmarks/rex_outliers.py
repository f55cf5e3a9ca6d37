"""Outlier residual (REx outlier mode) on MiniLM (STS-B) and SmolLM2-135M (WikiText-2): W3 per channel with
and without a sparse binary residual on the largest weights.

Usage: python benchmarks/rex_outliers.py MODEL [--windows N] [--variants a,b,...] [--bits B]
    [--out benchmarks/results]

Writes ``rex_outliers_<model>.json`` (``-`` written ``_``; with the command, versions, machine and date) and
its ``.md`` table into ``--out``.

MODEL is ``minilm`` (STS-B test, 1379 pairs) or ``smollm2-135m`` (WikiText-2 test, the first N windows of 1024
tokens). Variants: ``plain`` (minmax W3 per channel), ``row`` (the outlier mode's default: each output
channel's 0.2 % largest weights out of its range, one magnitude per row and sign), ``clip-sign`` / ``clip-row``
(the tensor's 0.2 % largest weights, every row clipped at one threshold; one magnitude per sign / per row),
``plain-sign`` (bulk = plain W3, residual on the same positions), ``mse`` / ``mse-row`` / ``mse-clip-sign`` (the
same over the MSE-clipping rule), ``lloyd`` / ``lloyd-row`` / ``lloyd-clip-sign`` / ``lloyd-clip-row`` (over
``lloyd-empirical``, a per-channel 2^B-level codebook). The gap closed is
``(q_outliers - q_plain) / (float - q_plain)`` against the ``plain`` row, and for each variant ``X-clip-*``
also against its own bulk ``X`` (``gap_closed_own``); for perplexity it is also given on log-perplexity
(``gap_closed_log``), the scale on which a model that is broken by millions still counts as broken.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import dfquant.pipeline.quantize as api
from bench_common import RESULTS, provenance, write_result
from dfquant.config import LayerRule, QuantConfig
from dfquant.eval import evaluate
from dfquant.methods.outliers import split_outliers
from dfquant.zoo import load_model

#: name -> (bulk rule, fraction (0: none), base, magnitudes, selection, the variant it adds outliers to)
VARIANTS = {
    "plain": ("minmax", 0.0, "clip", "sign", "global", None),
    "row": ("minmax", 0.002, "clip", "row-sign", "row", "plain"),
    "clip-sign": ("minmax", 0.002, "clip", "sign", "global", "plain"),
    "clip-row": ("minmax", 0.002, "clip", "row", "global", "plain"),
    "clip-row-sign": ("minmax", 0.002, "clip", "row-sign", "global", "plain"),
    "plain-sign": ("minmax", 0.002, "plain", "sign", "global", "plain"),
    "mse": ("mse", 0.0, "clip", "sign", "global", None),
    "mse-row": ("mse", 0.002, "clip", "row-sign", "row", "mse"),
    "mse-clip-sign": ("mse", 0.002, "clip", "sign", "global", "mse"),
    "lloyd": ("lloyd-empirical", 0.0, "clip", "sign", "global", None),
    "lloyd-row": ("lloyd-empirical", 0.002, "clip", "row-sign", "row", "lloyd"),
    "lloyd-clip-sign": ("lloyd-empirical", 0.002, "clip", "sign", "global", "lloyd"),
    "lloyd-clip-row": ("lloyd-empirical", 0.002, "clip", "row", "global", "lloyd"),
}


def result_name(model: str) -> str:
    """The result file's name for ``model``: ``rex_outliers_<model>`` with ``-`` written ``_``."""
    return "rex_outliers_" + model.replace("-", "_")


def markdown(result: dict[str, Any]) -> str:
    """A row per variant: the metric, bits per weight, outlier count and the gap closed."""
    key = "spearman" if result["task"] == "stsb" else "ppl"
    lines = [
        f"`{result['command']}` ({result['date']}). {result['model']} on {result['task']}"
        + (f" (first {result['limit']} windows)" if result["limit"] else "")
        + f": float {key} {result['float']:.3f}; W{result['bits']} per channel.",
        "",
        f"| variant | rule | outlier fraction | {key} | bits/w | outliers | gap closed vs plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        gap = r.get("gap_closed")
        gap_s = "-" if gap is None or math.isnan(gap) else f"{gap:.2f}"
        if key == "ppl" and r.get("gap_closed_log") is not None:
            gap_s += f" (log {r['gap_closed_log']:.2f})"
        lines.append(
            f"| {r['variant']} | {r['rule']} | {r['fraction']} | {r[key]:.3f} | {r['bits_per_weight']:.3f} | "
            f"{r['outliers']} | {gap_s} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.002)
    ap.add_argument("--variants", default="plain,clip-sign")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    task = "stsb" if args.model == "minilm" else "wikitext2"
    limit = None if task == "stsb" else args.windows
    key = "spearman" if task == "stsb" else "ppl"
    t0 = time.time()
    fl = evaluate(task, loaded, loaded.model, None, limit=limit)["float"][key]
    print(f"{args.model} float {key} {fl:.3f} ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for name in args.variants.split(","):
        rule, frac, base, scale, select, _ = VARIANTS[name]
        frac = args.fraction if frac else 0.0
        api.split_outliers = functools.partial(split_outliers, base=base, scale=scale)  # type: ignore[attr-defined]
        cfg = QuantConfig(LayerRule(rule, args.bits, "channel", outliers=frac, outlier_select=select))
        t0 = time.time()
        q, rep = api.quantize_model(loaded.model, cfg)
        r = evaluate(task, loaded, None, q, limit=limit)["quantized"]
        tot = rep.totals()
        row = {
            "variant": name,
            "rule": rule,
            "fraction": frac,
            "base": base,
            "scale": scale,
            "select": select,
            key: r[key],
            "bits_per_weight": tot["bits_per_weight"],
            "outliers": sum(x.outliers for x in rep.layers),
        }
        rows.append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
    by_name = {r["variant"]: r for r in rows}

    def closed(q: float, ref: float, log: bool) -> float:
        f = (lambda v: math.log(v)) if log else (lambda v: v)
        return (f(q) - f(ref)) / (f(fl) - f(ref)) if f(fl) != f(ref) else float("nan")

    for r in rows:
        name = r["variant"]
        own = VARIANTS[name][5]
        refs = {"gap_closed": by_name.get("plain"), "gap_closed_own": by_name.get(own) if own else None}
        line = f"{name:<16} {key} {r[key]:.3f}  bits/w {r['bits_per_weight']:.3f}"
        for field, ref in refs.items():
            if ref is None:
                continue
            r[field] = closed(r[key], ref[key], log=False)
            line += f"  {field} {r[field]:.2f}"
            if key == "ppl":
                r[field + "_log"] = closed(r[key], ref[key], log=True)
                line += f" (log {r[field + '_log']:.2f})"
        print(line)
    result = {
        **provenance(__file__, argv),
        "model": args.model,
        "task": task,
        "limit": limit,
        "bits": args.bits,
        "float": fl,
        "rows": rows,
    }
    write_result(Path(args.out), result_name(args.model), result, markdown)
    return result


if __name__ == "__main__":
    main()
