"""CIFAR-10 ResNet-20: post-training quantization vs quantization-aware training (StatQAT, min-max, LSQ).

All of them in one run, at the same weight format (default W2: the ``int2-mr`` grid ``{-1.5, -0.5, 0.5, 1.5}``, per
output channel; the first convolution and the classifier stay float in every column), BatchNorms folded:

* PTQ: :func:`dfquant.quantize_model` with the ``statq`` rule (iterative least-squares scale, its best
  post-training rule) and data-free bias correction; no image is used;
* QAT ``statq`` (analytic weight rule) / ``statq-iterative`` (``weight_rule="iterative"``: starts at the PTQ
  scale) / ``minmax`` / ``lsq``: :func:`dfquant.qat.fake.prepare_qat` then :func:`dfquant.qat.train.train_qat`
  with the same steps, batches (JPEG-copy images 1017..9999, random crop + flip), seed and learning rate, then
  :func:`dfquant.qat.fake.convert`.

Top-1 is measured on the exact test images 0..1016 (never trained on) with the converted (packed) model, and
the converted model's predictions are checked equal to the fake-quantized model's. Writes ``qat_resnet20.json``
(with the command, versions, machine and date) and ``qat_resnet20.md`` into ``--out`` atomically after every
column.

Usage:
    python benchmarks/qat_resnet20.py [--out benchmarks/results] [--format int2] [--act-format FMT] [--steps 50]
        [--batch 64] [--lr 5e-4] [--threads 2] [--methods statq,statq-iterative,minmax,lsq]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench_common import RESULTS, provenance, write_result
from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.eval.cifar10 import EXACT_FILE, JPEG_FILE, load_cifar10, predict
from dfquant.pipeline.quantize import quantize_model
from dfquant.qat.fake import QATConfig, convert, parse_format, prepare_qat
from dfquant.qat.train import TRAIN_FIRST, cifar_train_batches, train_qat
from dfquant.zoo.cifar_resnet import load_cifar_resnet

KEEP = ("conv1", "linear")


def markdown(res: dict[str, Any]) -> str:
    """The result as a table: a row per method, top-1, training time and whether convert kept the predictions."""
    s = res["setup"]
    lines = [
        f"`{res['command']}` ({res['date']}). ResNet-20 on CIFAR-10, PTQ vs QAT at {s['format']} weights"
        + (f", {s['act_format']} inputs" if s["act_format"] else "")
        + ". "
        f"{s['steps']} steps, batch {s['batch']}, Adam lr {s['lr']} (cosine), {s['threads']} threads; "
        f"float top-1 {res['float_top1']:.2f} %; first conv and classifier float. Machine: {res['machine']['cpu']}.",
        "",
        "| method | top-1 (%) | train time (s) | converted = fake-quant |",
        "|---|---|---|---|",
    ]
    for r in res["rows"]:
        same = "" if r["same_as_fake"] is None else ("yes" if r["same_as_fake"] else "NO")
        lines.append(f"| {r['method']} | {r['top1']:.2f} | {r['seconds']:.0f} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--format", default="int2")
    ap.add_argument("--act-format", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--methods",
        default="statq,statq-iterative,minmax,lsq",
        help="statq (analytic weight rule), statq-iterative (weight scale from the PTQ scale, one least-squares "
        "step per training step), minmax, lsq",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    fmt, grid = parse_format(args.format)

    model = load_cifar_resnet(20).model
    ex, ey = load_cifar10(EXACT_FILE)
    jx, jy = load_cifar10(JPEG_FILE)
    batches = cifar_train_batches(jx[TRAIN_FIRST:], jy[TRAIN_FIRST:], args.batch, seed=args.seed)

    def top1(m: torch.nn.Module) -> tuple[float, torch.Tensor]:
        p = predict(m, ex)
        return 100.0 * float((p == ey).float().mean()), p

    res: dict[str, Any] = {
        **provenance(__file__, argv),
        "setup": {
            "model": "cifar-resnet20",
            "format": fmt,
            "act_format": args.act_format,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "threads": args.threads,
            "seed": args.seed,
            "kept_float": list(KEEP),
            "train_data": f"{JPEG_FILE} images {TRAIN_FIRST}..{jx.shape[0] - 1}, random crop (pad 4) + flip",
            "eval_data": f"{EXACT_FILE} images 0..{ex.shape[0] - 1}",
        },
        "float_top1": top1(model)[0],
        "rows": [],
    }

    def flush() -> None:
        write_result(out, "qat_resnet20", res, markdown)

    if grid is not None and args.act_format is None:
        t0 = time.time()
        rule = LayerRule("statq", grid.bits, options={"format": grid.name})
        skip = tuple(PatternRule(k, skip=True, reason="kept float in every column") for k in KEEP)
        ptq, _ = quantize_model(model, QuantConfig(rule, rules=skip))
        acc, _ = top1(ptq)
        res["rows"].append({"method": "PTQ statq", "top1": acc, "seconds": time.time() - t0, "same_as_fake": None})
        print(f"PTQ statq: top-1 {acc:.2f} %", flush=True)
        flush()
    for method in args.methods.split(","):
        base, rule = ("statq", "iterative") if method == "statq-iterative" else (method, "analytic")
        cfg = QATConfig(method=base, format=fmt, act_format=args.act_format, keep_float=KEEP, weight_rule=rule)
        qat = prepare_qat(model, cfg)
        t0 = time.time()
        state = train_qat(
            qat,
            batches,
            steps=args.steps,
            lr=args.lr,
            on_step=lambda s, loss, m=method: (
                print(f"  {m} step {s} loss {loss:.3f}", flush=True) if s % 10 == 0 else None
            ),
        )
        secs = time.time() - t0
        conv = convert(qat)
        acc, p_conv = top1(conv)
        _, p_fake = top1(qat)
        row = {
            "method": f"QAT {method}",
            "top1": acc,
            "seconds": secs,
            "same_as_fake": bool(torch.equal(p_conv, p_fake)),
            "final_loss": sum(state.losses[-10:]) / min(10, len(state.losses)),
        }
        res["rows"].append(row)
        print(f"QAT {method}: top-1 {acc:.2f} % in {secs:.0f} s", flush=True)
        flush()
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
