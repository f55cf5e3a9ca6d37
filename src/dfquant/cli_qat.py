"""``dfquant qat MODEL``: quantization-aware training from the command line (:mod:`dfquant.qat`).

Trains an image classifier of the zoo (the CIFAR-10 ResNets) on the JPEG copy's images 1017..9999 and evaluates
top-1 on the exact test images 0..1016, which are never trained on. Prints a progress line on stderr, an
evaluation line every ``--eval-every`` steps, keeps a resumable checkpoint (``--checkpoint``, default
``OUT.ckpt``, rewritten atomically; a rerun with the same file continues from it), writes the converted model
to ``--out`` (the post-training file format) and ends with a report comparing the trained model with
post-training quantization (``statq``, same format, same float layers) of the same model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["add_command", "cmd_qat"]


def add_command(sub: Any) -> None:
    """Register ``qat`` on the ``dfquant`` sub-command parser."""
    p = sub.add_parser("qat", help="quantization-aware training (StatQAT, min-max or LSQ) of a zoo model")
    p.add_argument("model", help="zoo name, e.g. cifar-resnet20")
    p.add_argument("--format", required=True, help="weight format: int2, int4, fp4, nf4, mxfp4, nvfp4, grid names")
    p.add_argument("--act-format", help="input format of every quantized layer (default: inputs stay float)")
    p.add_argument("--method", default="statq", choices=["statq", "minmax", "lsq"])
    p.add_argument("--data", default="cifar10", help="training task (cifar10)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=5e-4, help="peak Adam learning rate (cosine schedule)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--granularity", default="channel", help="weight scales: channel | group:G")
    p.add_argument("--keep-float", default="conv1,linear", help="comma-separated globs of layers left float")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--checkpoint", help="resumable checkpoint file (default OUT.ckpt)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="the converted model's .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_qat)


def cmd_qat(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``dfquant qat``; returns the JSON-ready result."""
    import torch

    from .api import quantize_model
    from .config import LayerRule, PatternRule, QuantConfig
    from .eval.cifar10 import EXACT_FILE, JPEG_FILE, load_cifar10, predict
    from .io import save_quantized
    from .qat import QATConfig, convert, parse_format, prepare_qat
    from .qat_train import TRAIN_FIRST, cifar_train_batches, train_qat
    from .zoo import load_model

    if args.data != "cifar10":
        raise ConfigError(f"--data '{args.data}' is not supported by 'qat'; allowed: cifar10")
    if args.steps < 1 or args.batch < 1 or not args.lr > 0:
        raise ConfigError(f"--steps and --batch must be >= 1 and --lr > 0, got {args.steps}, {args.batch}, {args.lr}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out '{out}': folder '{out.parent}' does not exist")
    torch.set_num_threads(max(1, args.threads))
    keep = tuple(k for k in args.keep_float.split(",") if k)
    cfg = QATConfig(
        method=args.method,
        format=args.format,
        granularity=args.granularity,
        act_format=args.act_format,
        keep_float=keep,
    )
    loaded = load_model(args.model)
    if loaded.task != "cifar10":
        raise ConfigError(f"model '{args.model}' has task '{loaded.task}'; 'qat' trains cifar10 classifiers only")
    ex, ey = load_cifar10(EXACT_FILE)
    jx, jy = load_cifar10(JPEG_FILE)
    batches = cifar_train_batches(jx[TRAIN_FIRST:], jy[TRAIN_FIRST:], args.batch)

    def evaluate(m: torch.nn.Module) -> dict[str, Any]:
        return {"top1": round(100.0 * float((predict(m, ex) == ey).float().mean()), 2)}

    say = (lambda s: None) if args.quiet else (lambda s: sys.stderr.write(s))
    t0 = time.time()

    def on_step(step: int, loss: float) -> None:
        done = step / args.steps
        bar = "#" * int(30 * done)
        say(f"\r[{bar:<30}] {step}/{args.steps} loss {loss:.3f} {time.time() - t0:.0f}s")

    def on_eval(step: int, res: dict[str, Any]) -> None:
        say(f"\nstep {step}: top-1 {res['top1']:.2f} %\n")

    qat = prepare_qat(loaded.model, cfg)
    ckpt = args.checkpoint or f"{out}.ckpt"
    state = train_qat(
        qat,
        batches,
        steps=args.steps,
        lr=args.lr,
        evaluate=evaluate,
        eval_every=args.eval_every,
        checkpoint=ckpt,
        on_step=on_step,
        on_eval=on_eval,
    )
    model = convert(qat)
    save_quantized(model, out, source=loaded.source)
    qat_top1 = evaluate(model)["top1"]
    result: dict[str, Any] = {
        "model": args.model,
        "method": args.method,
        "format": cfg.format,
        "act_format": cfg.act_format,
        "steps": state.step,
        "evals": state.evals,
        "qat_top1": qat_top1,
        "float_top1": evaluate(loaded.model)["top1"],
        "out": str(out),
        "checkpoint": ckpt,
    }
    _, grid = parse_format(cfg.format)
    if grid is not None and cfg.act_format is None:
        rule = LayerRule("statq", grid.bits, cfg.granularity, options={"format": grid.name})
        ptq, _ = quantize_model(loaded.model, QuantConfig(rule, rules=tuple(PatternRule(k, skip=True) for k in keep)))
        result["ptq_top1"] = evaluate(ptq)["top1"]
    elif grid is None and cfg.act_format is None:
        ptq, _ = quantize_model(
            loaded.model, QuantConfig(LayerRule(cfg.format, 4), rules=tuple(PatternRule(k, skip=True) for k in keep))
        )
        result["ptq_top1"] = evaluate(ptq)["top1"]
    if not args.json:
        print(f"\n{args.model} {args.method} QAT, weights {cfg.format}, inputs {cfg.act_format or 'float'}:")
        print(f"  float        top-1 {result['float_top1']:.2f} %")
        if "ptq_top1" in result:
            print(f"  PTQ (statq)  top-1 {result['ptq_top1']:.2f} %")
        else:
            print("  PTQ          not compared (post-training quantization quantizes weights only)")
        print(f"  QAT          top-1 {qat_top1:.2f} %  -> {out}")
    return result
