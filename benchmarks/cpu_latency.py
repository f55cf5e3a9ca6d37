"""Batch-1 CPU latency of a loaded 4-bit MiniLM against float, for each way a quantized layer can multiply.

MiniLM's linear layers are quantized at 4 bits in groups of 32 on the ``uint4`` grid with float16 scales and
offsets (``minmax``, ``grid=uint``: the setting torch's int4 CPU kernel takes), saved, and loaded again by
:func:`dfquant.load_quantized`. One sentence (batch 1) is embedded repeatedly; each path is timed side by side in
one run (median of ``--repeats`` calls after warm-up, ``--threads`` threads):

* ``float``: the float model;
* ``decode``: the loaded model as it comes (``cache_weight=False``: each forward unpacks and decodes its weights);
* ``cache``: ``cache_weight=True`` (each decoded weight kept after its first use: float speed, float memory more);
* ``int4``: ``matmul="int4"`` (torch's int4 CPU kernel on the packed codes; bfloat16 inputs and scales).

Memory is what each path keeps resident for the linear weights (float32 weights; packed codes, scales and
offsets; plus the cache; plus the int4 kernel's repacked codes and bfloat16 scales), as a fraction of float. The
embedding cosine of each path against the float model on the STS-B-style sentence says what the path costs in
accuracy.

Usage::

    python benchmarks/cpu_latency.py [--repeats 50] [--threads 2] [--out benchmarks/results]

Writes ``cpu_latency.json`` (command, versions, machine, date) and ``cpu_latency.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench_common import RESULTS, provenance, write_result
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.io.load import load_quantized
from dfquant.io.save import save_quantized
from dfquant.nn.base import QuantModule, set_matmul
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import load_model

SENTENCE = "A man is playing a guitar on the stage while the crowd sings along."


def timed(fn: Any, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes the linear layers keep for their weights (:meth:`QuantModule.resident_bytes`: terms, cache, kernel
    copies; a float layer's weight)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantModule):
            total += m.resident_bytes()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"`{result['command']}` ({result['date']}, {result['machine'].get('cpu', 'CPU')}, {result['threads']} "
        f"threads). MiniLM, one sentence of {result['tokens']} tokens, median of {result['repeats']} calls; "
        "linear weights 4-bit uint4, groups of 32, float16 scales and offsets.",
        "",
        "| path | ms | x float | weight memory vs float | cosine vs float |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['path']} | {1000 * r['seconds']:.2f} | {r['vs_float']:.2f} | {100 * r['memory_vs_float']:.1f} % | "
            f"{r['cosine']:.5f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model("minilm")
    float_model = loaded.model.eval()
    cfg = QuantConfig(
        LayerRule("minmax", 4, "group:32", options={"grid": "uint"}, scale_dtype="float16"),
        rules=(PatternRule("*embeddings*", skip=True),),
    )
    q, report = quantize_model(float_model, cfg)
    enc = loaded.tokenizer([SENTENCE], return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    with tempfile.TemporaryDirectory() as tmp:
        path = save_quantized(q, Path(tmp) / "q.safetensors", source=loaded.source, report=report)
        model, _ = load_quantized(path)
    with torch.no_grad():
        ref = float_model(*inputs)
        float_s = timed(lambda: float_model(*inputs), args.repeats)
        float_mem = resident_bytes(float_model)
        rows = [{"path": "float", "seconds": float_s, "vs_float": 1.0, "memory_vs_float": 1.0, "cosine": 1.0}]
        for label, mode, cache in (("decode", "decode", False), ("cache", "decode", True), ("int4", "int4", False)):
            set_matmul(model, mode)
            for m in model.modules():
                if isinstance(m, QuantModule):
                    m.cache_weight = cache
                    m.clear_cache()
            out = model(*inputs)
            seconds = timed(lambda: model(*inputs), args.repeats)
            rows.append(
                {
                    "path": label,
                    "seconds": seconds,
                    "vs_float": seconds / float_s,
                    "memory_vs_float": resident_bytes(model) / float_mem,
                    "cosine": float(F.cosine_similarity(out.double(), ref.double(), dim=-1).mean()),
                }
            )
            print(rows[-1], flush=True)
    result = {
        **provenance(__file__, argv),
        "threads": args.threads,
        "repeats": args.repeats,
        "tokens": int(inputs[0].shape[1]),
        "rows": rows,
    }
    write_result(Path(args.out), "cpu_latency", result, markdown)
    return result


if __name__ == "__main__":
    main()
