"""``dfquant qat MODEL``: quantization-aware training from the command line (:mod:`dfquant.qat.fake`).

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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfquant.errors import ConfigError

__all__ = ["add_command", "cmd_qat"]

#: Per-task defaults: learning rate, batch, layers left float.
_DEFAULTS: dict[str, tuple[float, int, str]] = {
    "cifar10": (5e-4, 64, "conv1,linear"),
    "wikitext2": (2e-5, 2, "lm_head"),
}


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
    p.add_argument("--out", required=True, help="the converted model's .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_qat)


def cmd_qat(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``dfquant qat``; returns the JSON-ready result."""
    import torch

    from dfquant.config import LayerRule, PatternRule, QuantConfig
    from dfquant.io.save import save_quantized
    from dfquant.pipeline.quantize import quantize_model
    from dfquant.qat.fake import QATConfig, convert, parse_format, prepare_qat
    from dfquant.qat.train import train_qat
    from dfquant.zoo import load_model

    if args.data not in _DEFAULTS:
        raise ConfigError(f"--data '{args.data}' is not supported by 'qat'; allowed: {', '.join(_DEFAULTS)}")
    lr0, batch0, keep0 = _DEFAULTS[args.data]
    lr = lr0 if args.lr is None else args.lr
    batch = batch0 if args.batch is None else args.batch
    if args.steps < 1 or batch < 1 or not lr > 0:
        raise ConfigError(f"--steps and --batch must be >= 1 and --lr > 0, got {args.steps}, {batch}, {lr}")
    if args.data == "wikitext2" and (args.seq < 2 or args.eval_windows < 1):
        raise ConfigError(f"--seq must be >= 2 and --eval-windows >= 1, got {args.seq}, {args.eval_windows}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out '{out}': folder '{out.parent}' does not exist")
    torch.set_num_threads(max(1, args.threads))
    keep = tuple(k for k in (keep0 if args.keep_float is None else args.keep_float).split(",") if k)
    cfg = QATConfig(
        method=args.method,
        format=args.format,
        granularity=args.granularity,
        act_format=args.act_format,
        keep_float=keep,
        weight_rule=args.weight_rule,
    )
    loaded = load_model(args.model)
    if loaded.task != args.data:
        raise ConfigError(
            f"model '{args.model}' has task '{loaded.task}', not '{args.data}'; 'qat' trains cifar10 classifiers "
            "(--data cifar10) and causal LMs (--data wikitext2)"
        )
    metric, unit = ("top1", "%") if args.data == "cifar10" else ("ppl", "")
    loss_fn: Any = None
    evaluate: Callable[[torch.nn.Module], dict[str, Any]]
    if args.data == "cifar10":
        from dfquant.eval.cifar10 import EXACT_FILE, JPEG_FILE, load_cifar10, predict
        from dfquant.qat.train import TRAIN_FIRST, cifar_train_batches

        ex, ey = load_cifar10(EXACT_FILE)
        jx, jy = load_cifar10(JPEG_FILE)
        batches = cifar_train_batches(jx[TRAIN_FIRST:], jy[TRAIN_FIRST:], batch)

        def evaluate(m: torch.nn.Module) -> dict[str, Any]:
            return {"top1": round(100.0 * float((predict(m, ex) == ey).float().mean()), 2)}

    else:
        from dfquant.qat.lm import causal_lm_loss, lm_perplexity, lm_train_batches, wikitext2_ids

        if loaded.tokenizer is None:
            raise ConfigError(f"--data wikitext2 needs the model's tokenizer; '{args.model}' has none")
        batches = lm_train_batches(wikitext2_ids(loaded.tokenizer, "valid"), args.seq, batch)
        test_ids = wikitext2_ids(loaded.tokenizer, "test")
        loss_fn = causal_lm_loss

        def evaluate(m: torch.nn.Module) -> dict[str, Any]:
            r = lm_perplexity(m, test_ids, args.eval_windows)
            return {"ppl": round(r["ppl"], 4), "windows": r["windows"], "tokens": r["tokens"]}

    say = (lambda s: None) if args.quiet else (lambda s: sys.stderr.write(s))
    t0 = time.time()

    def on_step(step: int, loss: float) -> None:
        done = step / args.steps
        bar = "#" * int(30 * done)
        say(f"\r[{bar:<30}] {step}/{args.steps} loss {loss:.3f} {time.time() - t0:.0f}s")

    def on_eval(step: int, res: dict[str, Any]) -> None:
        say(f"\nstep {step}: {metric} {res[metric]:.2f} {unit}\n")

    qat = prepare_qat(loaded.model, cfg)
    ckpt = args.checkpoint or f"{out}.ckpt"
    state = train_qat(
        qat,
        batches,
        steps=args.steps,
        lr=lr,
        evaluate=evaluate,
        eval_every=args.eval_every,
        checkpoint=ckpt,
        on_step=on_step,
        on_eval=on_eval,
        loss_fn=loss_fn,
    )
    model = convert(qat)
    save_quantized(model, out, source=loaded.source)
    qat_res = evaluate(model)
    float_res = evaluate(loaded.model)
    result: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "method": args.method,
        "weight_rule": cfg.weight_rule,
        "format": cfg.format,
        "act_format": cfg.act_format,
        "keep_float": list(keep),
        "steps": state.step,
        "lr": lr,
        "batch": batch,
        "evals": state.evals,
        f"qat_{metric}": qat_res[metric],
        f"float_{metric}": float_res[metric],
        "out": str(out),
        "checkpoint": ckpt,
    }
    if args.data == "wikitext2":
        result["setup"] = {
            "train": "wikitext2/wiki.valid.tokens, random windows",
            "seq": args.seq,
            "test": "wikitext2/wiki.test.tokens",
            "eval_windows": qat_res["windows"],
            "window": 1024,
            "tokens_scored": qat_res["tokens"],
            "float_layers": "token embeddings, " + ", ".join(keep),
        }
    # PTQ at the same format leaves the same layers float (embeddings too: QAT never quantizes them)
    skip = tuple(PatternRule(k, skip=True) for k in keep) + tuple(
        PatternRule(n, skip=True) for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Embedding)
    )
    _, grid = parse_format(cfg.format)
    ptq_rule = None
    if cfg.act_format is None:
        ptq_rule = (
            LayerRule("statq", grid.bits, cfg.granularity, options={"format": grid.name})
            if grid is not None
            else LayerRule(cfg.format, 4)
        )
    if ptq_rule is not None:
        ptq, _ = quantize_model(loaded.model, QuantConfig(ptq_rule, rules=skip))
        result[f"ptq_{metric}"] = evaluate(ptq)[metric]
    if ptq_rule is not None and grid is not None and args.data == "wikitext2":
        # the rule StatQAT's weights start from (analytic scale, Gaussian fit), as a post-training baseline
        ana = LayerRule("statq", grid.bits, cfg.granularity, options={"format": grid.name, "rule": "analytic"})
        ptq, _ = quantize_model(loaded.model, QuantConfig(ana, rules=skip))
        result[f"ptq_analytic_{metric}"] = evaluate(ptq)[metric]
    if args.float_baseline:
        # the same training without quantization, then the same post-training quantization
        import copy

        say("\nfloat baseline: the same training without quantization\n")
        tuned = copy.deepcopy(loaded.model).train()
        train_qat(tuned, batches, steps=args.steps, lr=lr, on_step=on_step, loss_fn=loss_fn)
        result[f"float_finetuned_{metric}"] = evaluate(tuned)[metric]
        if ptq_rule is not None:
            ptq, _ = quantize_model(tuned, QuantConfig(ptq_rule, rules=skip))
            result[f"ptq_finetuned_{metric}"] = evaluate(ptq)[metric]
    if not args.json:
        name = "top-1" if metric == "top1" else "ppl  "
        print(f"\n{args.model} {args.method} QAT, weights {cfg.format}, inputs {cfg.act_format or 'float'}:")
        if args.data == "wikitext2":
            print(
                f"  (WikiText-2 test perplexity, {qat_res['windows']} x 1024 tokens; trained on valid, seq {args.seq};"
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
