"""Outlier residual (REx outlier mode) on MiniLM (STS-B) and SmolLM2-135M (WikiText-2): W3 per channel with
and without a sparse binary residual on the largest weights.

Usage: python benchmarks/rex_outliers.py MODEL [--windows N] [--variants a,b,...] [--bits B] [--json OUT]

MODEL is ``minilm`` (STS-B test, 1379 pairs) or ``smollm2-135m`` (WikiText-2 test, the first N windows of 1024
tokens). Variants: ``plain`` (minmax W3 per channel), ``clip-sign`` (the outlier mode: bulk fitted with the
0.2 % largest weights clipped, one magnitude per sign), ``clip-row`` (one magnitude per output channel),
``plain-sign`` (bulk = plain W3, residual on the same positions), ``mse`` (plain with the MSE-clipping rule),
``mse-clip-sign`` (the outlier mode over the mse rule). The gap closed is
``(q_outliers - q_plain) / (float - q_plain)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

import dfquant.api as api
from dfquant.config import LayerRule, QuantConfig
from dfquant.eval import evaluate
from dfquant.methods.outliers import split_outliers
from dfquant.zoo import load_model

VARIANTS = {
    "plain": ("minmax", 0.0, "clip", "sign"),
    "clip-sign": ("minmax", 0.002, "clip", "sign"),
    "clip-row": ("minmax", 0.002, "clip", "row"),
    "plain-sign": ("minmax", 0.002, "plain", "sign"),
    "mse": ("mse", 0.0, "clip", "sign"),
    "mse-clip-sign": ("mse", 0.002, "clip", "sign"),
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
        rule, frac, base, scale = VARIANTS[name]
        frac = args.fraction if frac else 0.0
        api.split_outliers = functools.partial(split_outliers, base=base, scale=scale)  # type: ignore[attr-defined]
        cfg = QuantConfig(LayerRule(rule, args.bits, "channel", outliers=frac))
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
            key: r[key],
            "bits_per_weight": tot["bits_per_weight"],
            "outliers": sum(x.outliers for x in rep.layers),
        }
        rows.append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
    plain = next((r[key] for r in rows if r["variant"] == "plain"), None)
    if plain is not None:
        for r in rows:
            r["gap_closed"] = (r[key] - plain) / (fl - plain) if fl != plain else float("nan")
            bpw, gap = r["bits_per_weight"], r["gap_closed"]
            print(f"{r['variant']:<14} {key} {r[key]:.3f}  bits/w {bpw:.3f}  gap closed {gap:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "task": task, "limit": limit, "float": fl, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
