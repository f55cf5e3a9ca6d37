"""Outlier residual (REx outlier mode) on MiniLM (STS-B) and SmolLM2-135M (WikiText-2): W3 per channel with
and without a sparse binary residual on the largest weights.

Usage: python benchmarks/rex_outliers.py MODEL [--windows N] [--variants a,b,...] [--bits B] [--json OUT]

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

import torch

import dfquant.api as api
from bench_common import write_json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.002)
    ap.add_argument("--variants", default="plain,clip-sign")
    ap.add_argument("--json")
    args = ap.parse_args()
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
    if args.json:
        write_json(Path(args.json), {"model": args.model, "task": task, "limit": limit, "float": fl, "rows": rows})


if __name__ == "__main__":
    main()
