"""Inference cost of a saved quantized model against the float model on CPU: resident weight memory and latency.

For MiniLM and SmolLM2-135M, the model is quantized by :func:`dfquant.quantize_model` (``lloyd-max``
4-bit in groups of 64, float16 scales and offsets; every linear layer and the embeddings, as ``dfquant
quantize`` does by default), saved with :func:`dfquant.io.save.save_quantized` and, in a fresh process per
configuration, loaded back with :func:`dfquant.io.load.load_quantized`:

* ``float``: the float32 model from the zoo;
* ``quantized, cache_weight=True``: each layer keeps its dequantized float weight after the first forward;
* ``quantized, cache_weight=False`` (``load_quantized``'s default): each forward unpacks and decodes the weight
  (an embedding only the rows it looks up), only packed codes stay.

Reported per configuration: the bytes of every tensor the model holds (parameters, buffers and the layers'
cached dequantized weights) after loading and after the forwards, the process RSS at the same points, and the
median forward latency at batch 1 and batch 32 (``--seq`` tokens per sequence). Target: at 4 bits the
quantized model's resident weight memory is at most 35 % of the float model's.

Writes ``inference_cost.json`` and ``inference_cost.md`` into ``--out``.

Usage:
    python benchmarks/inference_cost.py --out results/bench [--models minilm,smollm2-135m] [--seq 64]
        [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, load_average, provenance, write_result

CONFIGS = ("float", "quantized-cache", "quantized-nocache")
RULE = {"quantizer": "lloyd-max", "bits": 4, "granularity": "group:64", "scale_dtype": "float16"}
TARGET_RATIO = 0.35


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters, buffers and cached dequantized weights (shared storage counted once)."""
    seen: set[int] = set()
    out = {"parameters": 0, "buffers": 0, "cached_weights": 0}

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return
        seen.add(key)
        out[kind] += t.untyped_storage().nbytes()

    for p in model.parameters():
        add("parameters", p)
    for b in model.buffers():
        add("buffers", b)
    for m in model.modules():
        add("cached_weights", getattr(m, "_cached", None))
    out["total"] = out["parameters"] + out["buffers"] + out["cached_weights"]
    return out


def make_input(loaded: Any, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    vocab = int(loaded.vocab_size or 30000)
    ids = torch.randint(100, min(vocab, 30000), (batch, seq), generator=g)
    return (ids,) if loaded.kind == "causal-lm" else (ids, torch.ones_like(ids))


def forward(model: nn.Module, loaded: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if loaded.kind == "causal-lm":
        from dfquant.eval.wikitext2 import lm_logits

        return lm_logits(model, inputs[0])
    return model(*inputs)


def worker(model_name: str, config: str, path: str, seq: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    from dfquant.io.load import load_quantized
    from dfquant.zoo import load_model

    rss0 = _rss_mib()
    loaded = load_model(model_name)
    if config != "float":
        del loaded.model
        import gc

        gc.collect()
        model, _ = load_quantized(path, cache_weight=config == "quantized-cache")
    else:
        model = loaded.model
    model.eval()
    after_load = {"tensor_bytes": tensor_bytes(model), "rss_mib": round(_rss_mib(), 1)}
    latency = {}
    with torch.inference_mode():
        for batch in (1, 32):
            inputs = make_input(loaded, batch, seq)
            forward(model, loaded, inputs)  # warm-up (fills the cache where enabled)
            times = []
            for _ in range(repeats if batch == 1 else max(1, repeats // 2)):
                t0 = time.perf_counter()
                forward(model, loaded, inputs)
                times.append(time.perf_counter() - t0)
            latency[f"batch{batch}"] = {"median_s": statistics.median(times), "runs": times}
    after_fwd = {"tensor_bytes": tensor_bytes(model), "rss_mib": round(_rss_mib(), 1)}
    return {"rss_start_mib": round(rss0, 1), "after_load": after_load, "after_forward": after_fwd, "latency": latency}


def quantize_and_save(model_name: str, path: Path) -> dict[str, Any]:
    from dfquant.config import LayerRule, QuantConfig
    from dfquant.io.save import save_quantized
    from dfquant.pipeline.quantize import quantize_model
    from dfquant.zoo import load_model

    loaded = load_model(model_name)
    t0 = time.perf_counter()
    qmodel, report = quantize_model(loaded.model, QuantConfig(default=LayerRule(**RULE)))  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    save_quantized(qmodel, path, source=loaded.source, report=report)
    return {"quantize_seconds": round(seconds, 1), "file_bytes": path.stat().st_size}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"`{result['command']}` ({result['date']}). Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch "
        f"{m['torch']}, one thread; rule `{json.dumps(result['rule'])}` on "
        f"every linear layer and embedding; {result['seq']} tokens per sequence; median latency.",
        "",
    ]
    for name, entry in result["models"].items():
        f = entry["configs"].get("float", {})
        fb = f.get("after_forward", {}).get("tensor_bytes", {}).get("total")
        lines += [f"**{name}**", "", f"File: {entry['saved']['file_bytes'] / 2**20:.1f} MiB.", ""]
        lines += [
            "| config | weights MiB after load | weights MiB after forward | % of float | RSS MiB after forward "
            "| batch 1 s | batch 32 s | load avg |",
            "|" + " --- |" * 8,
        ]
        for cfg, r in entry["configs"].items():
            if "error" in r:
                lines.append(f"| {cfg} | error: {r['error'][:100]} | | | | | | |")
                continue
            a = r["after_load"]["tensor_bytes"]["total"]
            b = r["after_forward"]["tensor_bytes"]["total"]
            pct = f"{100 * b / fb:.1f} %" if fb else "-"
            lines.append(
                f"| {cfg} | {a / 2**20:.1f} | {b / 2**20:.1f} | {pct} | {r['after_forward']['rss_mib']:.0f} | "
                f"{r['latency']['batch1']['median_s']:.3f} | {r['latency']['batch32']['median_s']:.3f} | "
                f"{' '.join(str(x) for x in r['load_average'])} |"
            )
        lines.append("")
    lines += ["Target (quantized <= 35 % of float resident weight memory at 4 bits):", ""]
    lines += [f"- {t}" for t in result.get("verdict", [])]
    return "\n".join(lines) + "\n"


def verdict(result: dict[str, Any]) -> list[str]:
    out = []
    for name, entry in result["models"].items():
        cf = entry["configs"]
        if "after_forward" not in cf.get("float", {}):
            continue
        fb = cf["float"]["after_forward"]["tensor_bytes"]["total"]
        for cfg in ("quantized-cache", "quantized-nocache"):
            if "after_forward" not in cf.get(cfg, {}):
                continue
            ratio = cf[cfg]["after_forward"]["tensor_bytes"]["total"] / fb
            ok = "meets" if ratio <= TARGET_RATIO else "misses"
            out.append(f"{name} {cfg}: {100 * ratio:.1f} % of float after forward ({ok} the 35 % target)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--models", default="minilm,smollm2-135m")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.config, args.path, args.seq, args.repeats)))
        return {}
    torch.set_num_threads(1)
    out = Path(args.out)
    result: dict[str, Any] = {**provenance(__file__, argv), "seq": args.seq, "rule": RULE, "models": {}}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = Path(tmp) / f"{name}.safetensors"
            entry: dict[str, Any] = {"saved": quantize_and_save(name, path), "configs": {}}
            result["models"][name] = entry
            for cfg in CONFIGS:
                load = load_average()
                cmd = [sys.executable, __file__, "--worker", name, "--config", cfg, "--path", str(path)]
                cmd += ["--seq", str(args.seq), "--repeats", str(args.repeats)]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    entry["configs"][cfg] = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
                else:
                    entry["configs"][cfg] = {**json.loads(p.stdout.strip().splitlines()[-1]), "load_average": load}
                print(f"{name} {cfg}: {json.dumps(entry['configs'][cfg])[:300]}", flush=True)
                result["verdict"] = verdict(result)
                write_result(out, "inference_cost", result, markdown)
    return result


if __name__ == "__main__":
    main()
