"""``dfquant qat MODEL``: quantization-aware training from the command line (the recipe: :mod:`dfquant.qat.recipe`).

Trains an image classifier of the zoo (the CIFAR-10 ResNets, ``--data cifar10``) on the JPEG copy's images
1017..9999 and evaluates top-1 on the exact test images 0..1016, which are never trained on; or a causal language
model of the zoo (``smollm2-135m``, ``--data wikitext2``) on random ``--seq``-token windows of WikiText-2 valid and
evaluates perplexity on the first ``--eval-windows`` 1024-token windows of WikiText-2 test
(:mod:`dfquant.qat.lm`; Linear layers are fake-quantized, token embeddings and, by default, the tied output head
``lm_head`` stay float). Prints a progress line on stderr, an
evaluation line every ``--eval-every`` steps, keeps a resumable checkpoint (``--checkpoint``, default
``OUT.ckpt``, rewritten atomically; a rerun with the same file continues from it), writes the converted model
to ``--out`` (the post-training file format) and ends with a report comparing the trained model with
post-training quantization (``statq``, same format, same float layers) of the same model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from dfquant.cli.common import add_device
from dfquant.qat.recipe import QATRun, run_qat

__all__ = ["add_command", "cmd_qat"]


def add_command(sub: Any) -> None:
    """Register ``qat`` on the ``dfquant`` sub-command parser."""
    p = sub.add_parser("qat", help="quantization-aware training (StatQAT, min-max or LSQ) of a zoo model")
    p.add_argument("model", help="zoo name, e.g. cifar-resnet20")
    p.add_argument("--format", required=True, help="weight format: int2, int4, fp4, nf4, mxfp4, nvfp4, grid names")
    p.add_argument("--act-format", help="input format of every quantized layer (default: inputs stay float)")
    p.add_argument("--method", default="statq", choices=["statq", "minmax", "lsq"])
    p.add_argument(
        "--weight-rule",
        default="analytic",
        choices=["analytic", "iterative"],
        help="statq weight scales: analytic (sigma x optimal clip, each step) or iterative (from the PTQ scale, "
        "one least-squares step per training step)",
    )
    p.add_argument("--data", default="cifar10", help="training task: cifar10 or wikitext2")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, help="peak Adam learning rate, cosine schedule (cifar10 5e-4, wikitext2 2e-5)")
    p.add_argument("--batch", type=int, help="batch size (cifar10 64 images, wikitext2 2 windows)")
    p.add_argument("--seq", type=int, default=256, help="wikitext2: tokens per training window")
    p.add_argument("--eval-windows", type=int, default=4, help="wikitext2: 1024-token test windows evaluated")
    p.add_argument("--granularity", default="channel", help="weight scales: channel | group:G")
    p.add_argument(
        "--keep-float", help="comma-separated globs of layers left float (cifar10 conv1,linear; wikitext2 lm_head)"
    )
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--checkpoint", help="resumable checkpoint file (default OUT.ckpt)")
    p.add_argument(
        "--float-baseline",
        action="store_true",
        help="also fine-tune the float model the same way (data, steps, learning rate) and quantize it after "
        "training (PTQ): tells how much of QAT's gain is plain adaptation to the training data",
    )
    p.add_argument("--threads", type=int, default=2)
    add_device(p)
    p.add_argument("--out", required=True, help="the converted model's .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_qat)


def cmd_qat(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``dfquant qat``; returns the JSON-ready result."""
    run = QATRun(**{f.name: getattr(args, f.name) for f in fields(QATRun)})
    result = run_qat(run, progress=None if args.quiet else sys.stderr.write)
    metric, unit = ("top1", "%") if args.data == "cifar10" else ("ppl", "")
    out, keep = result["out"], result["keep_float"]
    if not args.json:
        name = "top-1" if metric == "top1" else "ppl  "
        print(
            f"\n{args.model} {args.method} QAT, weights {result['format']}, inputs {result['act_format'] or 'float'}:"
        )
        if args.data == "wikitext2":
            print(
                f"  (WikiText-2 test perplexity, {result['setup']['eval_windows']} x 1024 tokens; trained on valid, "
                f"seq {args.seq};"
                f" float: token embeddings, {', '.join(keep)})"
            )
        print(f"  float        {name} {result[f'float_{metric}']:.2f} {unit}")
        if f"ptq_{metric}" in result:
            print(f"  PTQ (statq)  {name} {result[f'ptq_{metric}']:.2f} {unit}")
        if f"ptq_analytic_{metric}" in result:
            print(f"  PTQ (statq, analytic rule) {name} {result[f'ptq_analytic_{metric}']:.2f} {unit}")
        else:
            print("  PTQ          not compared (post-training quantization quantizes weights only)")
        print(f"  QAT          {name} {result[f'qat_{metric}']:.2f} {unit}  -> {out}")
        if f"float_finetuned_{metric}" in result:
            print(f"  float, fine-tuned the same way           {name} {result[f'float_finetuned_{metric}']:.2f} {unit}")
        if f"ptq_finetuned_{metric}" in result:
            print(f"  PTQ (statq) of the fine-tuned float model {name} {result[f'ptq_finetuned_{metric}']:.2f} {unit}")
    return result
