"""Task quality at matched bits per weight: dfquant's best setting against each peer's recommended setting.

Models and tasks (the project's evaluators, :mod:`dfquant.eval`):

* ``cifar-resnet20``: CIFAR-10 top-1 on the exact 1017 test images and top-1 agreement with the float model on
  the first ``--cifar-limit`` images of the JPEG copy;
* ``minilm``: STS-B test Spearman x 100 (all 1379 pairs unless ``--stsb-limit``);
* ``smollm2-135m``: WikiText-2 perplexity on the first ``--windows`` windows of 1024 tokens (a reduced protocol:
  the full one has 32). Its float weights are dequantized from
  a 4-bit GGUF.

Every method quantizes the same layers: every ``nn.Linear`` and convolution, embeddings and the tied output
head kept float. Each weight is replaced by its dequantized value (what the quantized layer computes with), so
the comparison isolates the weight format; BatchNorm is not folded for anyone. Peer libraries whose layers do
not cover convolutions (HQQ, bitsandbytes, torchao's ``quantize_``) get their convolution weights through their
tensor-level function; the table says so, and a layer a setting cannot quantize at all stays float and is
counted.

Peers use their recommended 4-bit setting (:func:`peers.recommended_peer_settings`). dfquant's setting for a
peer is the one with the lowest weight MSE in that model's rate-distortion results (``rate_distortion.json`` in
``--out``) among those costing no more bits per weight than the peer does on that model's quantized layers
(torchao at its nominal, packed cost);
``lloyd-optimal`` is left out for the language models (too slow for a whole model here: about 0.03 M
weights/s). The rate-distortion results of every model run are required (run ``rate_distortion.py`` first); a
peer whose cost on a model is unknown (its setting failed) gets no matched dfquant row, and the result says so.

Writes ``task_quality.json`` (with the command, versions, machine and date) and ``task_quality.md`` into
``--out``.

Usage:
    python benchmarks/task_quality.py [--out benchmarks/results] [--models cifar-resnet20,minilm,smollm2-135m]
        [--windows 4] [--cifar-limit 2000]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, provenance, quantizable_weights, write_result
from peers import (
    DFQUANT_CURVES,
    PEER_LIBRARIES,
    Setting,
    UnsupportedError,
    dfquant_settings,
    library_status,
    recommended_peer_settings,
)

TASKS = {"cifar-resnet20": "cifar10", "minilm": "stsb", "smollm2-135m": "wikitext2"}
CONV_SUPPORT = {
    "dfquant": "library layer",
    "quanto": "library layer (QConv2d)",
    "hqq": "tensor API only (no conv layer)",
    "bitsandbytes": "tensor API only (no conv layer)",
    "torchao": "tensor API only (quantize_ targets nn.Linear)",
}
SLOW_FOR_LM = ("lloyd-optimal",)


def fake_quantize(model: nn.Module, setting: Setting) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` whose linear/conv weights are replaced by ``setting``'s dequantized weights."""
    q = copy.deepcopy(model)
    weights = quantizable_weights(q)
    modules = dict(q.named_modules())
    bits = nominal = numel = 0
    kept: dict[str, str] = {}
    convs = 0
    t0 = time.perf_counter()
    for name, w in weights.items():
        try:
            r = setting.fn(w)
        except UnsupportedError as e:
            kept[name] = str(e)
            continue
        with torch.no_grad():
            modules[name].weight.copy_(r.dequantized.to(w.dtype))
        bits += r.bits
        nominal += r.nominal_bits
        numel += r.numel
        convs += w.dim() > 2
    info = {
        "bpw": bits / numel if numel else None,
        "nominal_bpw": nominal / numel if numel else None,
        "layers": len(weights),
        "layers_kept_float": len(kept),
        "kept_float_example": next(iter(kept.items()), None),
        "conv_layers_quantized": convs,
        "quantize_seconds": round(time.perf_counter() - t0, 2),
    }
    return q, info


def dfquant_for_budget(rd_rows: list[dict[str, Any]], budget: float, lm: bool) -> Setting | None:
    """dfquant's lowest-MSE setting costing at most ``budget`` bits per weight in the rate-distortion rows, or
    None when none is that cheap."""
    ok = [
        r
        for r in rd_rows
        if r["library"] == "dfquant"
        and "rel_mse" in r
        and r["bpw"] <= budget + 1e-9
        and not (lm and DFQUANT_CURVES[r["method"]][0] in SLOW_FOR_LM)
    ]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["rel_mse"])
    for s in dfquant_settings([best["method"]]):
        if s.bits == best["bits"] and s.granularity == best["granularity"]:
            return s
    raise KeyError(f"no dfquant setting {best['method']} w{best['bits']} {best['granularity']}")


def evaluate_model(name: str, args: argparse.Namespace, rd: dict[str, Any] | None) -> dict[str, Any]:
    from dfquant.eval import evaluate
    from dfquant.zoo import load_model

    loaded = load_model(name)
    task = TASKS[name]
    lm = name != "cifar-resnet20"
    limit = {"cifar10": args.cifar_limit, "stsb": args.stsb_limit, "wikitext2": args.windows}[task]
    both = task != "wikitext2"  # perplexity: the float model once, agreement from its predictions
    rd_rows = (rd or {}).get("models", {}).get(name, {}).get("rows")
    if not rd_rows:
        raise SystemExit(f"no rate-distortion rows for {name}: run benchmarks/rate_distortion.py --models {name} first")
    entries: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    base = evaluate(task, loaded, loaded.model, None, limit=limit)
    entries.append({"method": "float", "library": "-", "setting": "float32", "bpw": 32.0, "result": base["float"]})
    print(f"{name}: float {base['float']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    done: set[str] = set()

    def run(s: Setting, why: str) -> dict[str, Any]:
        t1 = time.perf_counter()
        qmodel, info = fake_quantize(loaded.model, s)
        res = evaluate(task, loaded, loaded.model if both else None, qmodel, limit=limit)
        entry = {
            "method": s.method,
            "library": s.library,
            "setting": s.label,
            "why": why,
            "note": s.note,
            "convs": CONV_SUPPORT[s.library] if name == "cifar-resnet20" else "-",
            **info,
            "result": res["quantized"],
            "seconds": round(time.perf_counter() - t1, 1),
        }
        entries.append(entry)
        done.add(s.label)
        print(f"{name}: {s.label} bpw {info['bpw']} {res['quantized']} ({entry['seconds']:.0f} s)", flush=True)
        return entry

    for s in recommended_peer_settings():
        e = run(s, "recommended")
        budget = e.get("nominal_bpw")  # the peer's cost on this model (torchao: packed)
        if budget is None:
            e["matched"] = "no matched dfquant setting: the peer's cost on this model is unknown"
            continue
        d = dfquant_for_budget(rd_rows, budget, lm)
        if d is None:
            e["matched"] = f"no dfquant setting costs <= {budget:.3f} bits/w"
        elif d.label not in done:
            run(d, f"best weight MSE at <= {budget:.3f} bits/w (matched to {s.library})")
    return {"task": task, "setup": base["setup"], "limit": limit, "entries": entries}


def markdown(result: dict[str, Any]) -> str:
    keys = {"cifar10": ("top1", "agreement"), "stsb": ("spearman", "embedding_cosine"), "wikitext2": ("ppl",)}
    lines = [
        f"`{result['command']}` ({result['date']}). Machine: {result['machine']['cpu']}. "
        f"Peers: {', '.join(f'{k} {v}' for k, v in result['libraries'].items())}.",
        "",
    ]
    for name, m in result["models"].items():
        cols = keys[m["task"]]
        lines += [f"**{name}** ({m['task']}). Setup: `{json.dumps(m['setup'])}`", ""]
        head = ["method", "setting", "why", "bpw", "nominal bpw", *cols, "convs", "layers kept float"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for e in m["entries"]:
            vals = [f"{e['result'][c]:.3f}" if c in e["result"] else "-" for c in cols]
            bpw = "-" if e.get("bpw") is None else f"{e['bpw']:.3f}"
            nbpw = "-" if e.get("nominal_bpw") is None else f"{e['nominal_bpw']:.3f}"
            kept = str(e.get("layers_kept_float", 0))
            if e.get("kept_float_example"):
                kept += f" ({e['kept_float_example'][0]}: {e['kept_float_example'][1][:70]})"
            lines.append(
                f"| {e['library']} | {e['setting']} | {e.get('why', '')} | {bpw} | {nbpw} | {' | '.join(vals)} | "
                f"{e.get('convs', '-')} | {kept} |"
            )
        lines.append("")
        lines += [f"- {e['setting']}: {e['matched']}" for e in m["entries"] if e.get("matched")]
    lines += ["Layer coverage of the peers' own modules:", ""]
    lines += [f"- {k}: {v[1]}" for k, v in PEER_LIBRARIES.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--models", default=",".join(TASKS))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--cifar-limit", type=int, default=2000)
    ap.add_argument("--stsb-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rd_path = out / "rate_distortion.json"
    rd = json.loads(rd_path.read_text()) if rd_path.exists() else None
    # every model of a result comes from this run (no results merged from an earlier file)
    result: dict[str, Any] = {**provenance(__file__, argv), "libraries": library_status(), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = evaluate_model(name, args, rd)
        write_result(out, "task_quality", result, markdown)
    return result


if __name__ == "__main__":
    main()
