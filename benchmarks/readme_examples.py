"""The figures the top-level README quotes beside its example commands, each from running that very command.

Each example is a ``dfquant`` command line from the README's "Methods" section, run as a user would
(``python -m dfquant.cli ... --json`` in a subprocess) on the real models and data of the assets folder. The
figures the README cites (top-1, perplexity, bits per weight) are read from the command's JSON document:

* ``rex-w2-k2-mse``: REx order 2 over minmax W2 with ``mse`` residuals, and the two rows it is compared with
  (``minmax`` residuals; plain W4 per channel);
* ``outliers-smollm2``: SmolLM2-135M at W4 per channel, without and with each output channel's 0.2 % largest
  weights in a binary outlier residual (WikiText-2 perplexity, all test windows);
* ``dfmpc-w2-lloyd-optimal``: DF-MPC, 2-bit low layers with the per-channel 4-level codebook weighted by input
  variance, ``projection-noise`` statistics, 6-bit high layers;
* ``qat-smollm2-int4`` (only with ``--with-qat-lm``: about 15 minutes on 2 cores): QAT of SmolLM2-135M at INT4
  with the iterative weight rule, PTQ and QAT perplexity on the first 2 test windows, and the float fine-tuned
  baseline.

Usage::

    python benchmarks/readme_examples.py [--only rex-w2-k2-mse,...] [--with-qat-lm] [--out benchmarks/results]

Writes ``readme_examples.json`` (each command, its figures and seconds; with the versions, machine and date) and
``readme_examples.md`` into ``--out``. ``python benchmarks/readme_tables.py`` copies the table into the README.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import RESULTS, provenance, write_result

Figures = Callable[[dict[str, Any]], dict[str, Any]]


def _cifar(doc: dict[str, Any]) -> dict[str, Any]:
    q = doc["eval"]["cifar10"]
    return {
        "float_top1": q["float"]["top1"],
        "top1": q["quantized"]["top1"],
        "agreement": q["quantized"]["agreement"],
        "bits_per_weight": round(doc["bits_per_weight"], 3),
    }


def _ppl(doc: dict[str, Any]) -> dict[str, Any]:
    q = doc["eval"]["wikitext2"]
    return {
        "float_ppl": q["float"]["ppl"],
        "ppl": q["quantized"]["ppl"],
        "windows": q["setup"].get("windows"),
        "bits_per_weight": round(doc["bits_per_weight"], 3),
    }


def _qat(doc: dict[str, Any]) -> dict[str, Any]:
    keep = ("float_ppl", "ptq_ppl", "ptq_analytic_ppl", "qat_ppl", "float_finetuned_ppl", "ptq_finetuned_ppl")
    return {k: doc[k] for k in keep if k in doc}


#: name -> (what the README says it shows, the command after ``dfquant``, how to read its figures).
EXAMPLES: dict[str, list[tuple[str, str, Figures]]] = {
    "rex-w2-k2-mse": [
        (
            "REx K=2 over minmax W2, mse residuals",
            "quantize cifar-resnet20 --method minmax --bits 2 --expand 2 --residual-method mse --eval cifar10",
            _cifar,
        ),
        (
            "REx K=2 over minmax W2, minmax residuals",
            "quantize cifar-resnet20 --method minmax --bits 2 --expand 2 --eval cifar10",
            _cifar,
        ),
        ("plain W4 per channel", "quantize cifar-resnet20 --method minmax --bits 4 --eval cifar10", _cifar),
    ],
    "outliers-smollm2": [
        ("W4 per channel", "quantize smollm2-135m --method minmax --bits 4 --eval wikitext2", _ppl),
        (
            "W4 per channel + 0.2 % outliers per row",
            "quantize smollm2-135m --method minmax --bits 4 --outliers 0.002 --outlier-select row --eval wikitext2",
            _ppl,
        ),
    ],
    "dfmpc-w2-lloyd-optimal": [
        (
            "DF-MPC 2/6, lloyd-optimal+iv low layers, projection-noise",
            "quantize cifar-resnet20 --method dfmpc --low-bits 2 --high-bits 6 --low-quantizer lloyd-optimal "
            "--low-options weighting=input-variance --bn-stats projection-noise --eval cifar10",
            _cifar,
        ),
    ],
    "qat-smollm2-int4": [
        (
            "QAT INT4, iterative weight rule, 150 steps",
            "qat smollm2-135m --format int4 --weight-rule iterative --data wikitext2 --steps 150 --seq 128 --batch 2 "
            "--lr 1e-5 --eval-windows 2 --eval-every 50 --float-baseline --out {tmp}/smollm2-int4-qat.safetensors",
            _qat,
        ),
    ],
}
OPTIONAL = ("qat-smollm2-int4",)


def run_example(command: str, figures: Figures, tmp: str) -> dict[str, Any]:
    """Run ``dfquant COMMAND --json`` and read its figures."""
    argv = shlex.split(command.format(tmp=tmp))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dfquant.cli", *argv, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dfquant {command}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout)
    return {"figures": figures(doc), "seconds": round(time.perf_counter() - t0, 1)}


def markdown(result: dict[str, Any]) -> str:
    """A row per command: the example it belongs to, the command and its figures."""
    lines = [
        f"`{result['command']}` ({result['date']}). Machine: {result['machine']['cpu']}, "
        f"{result['machine']['cpu_count']} CPUs.",
        "",
        "| example | row | command | figures |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in result["examples"].items():
        for r in rows:
            figs = ", ".join(f"{k} {v}" for k, v in r["figures"].items())
            lines.append(f"| {name} | {r['label']} | `dfquant {r['command']}` | {figs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated examples among {', '.join(EXAMPLES)}")
    ap.add_argument("--with-qat-lm", action="store_true", help="also run the SmolLM2 QAT example (~15 min)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    names = [n for n in EXAMPLES if n not in OPTIONAL or args.with_qat_lm]
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in EXAMPLES]
        if unknown:
            ap.error(f"unknown examples {unknown}; known: {', '.join(EXAMPLES)}")
    result: dict[str, Any] = {**provenance(__file__, argv), "examples": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows = []
            for label, command, figures in EXAMPLES[name]:
                rows.append({"label": label, "command": command, **run_example(command, figures, tmp)})
                print(f"{name}: {label}: {rows[-1]['figures']} ({rows[-1]['seconds']:.0f} s)", flush=True)
            result["examples"][name] = rows
            write_result(Path(args.out), "readme_examples", result, markdown)
    return result


if __name__ == "__main__":
    main()
