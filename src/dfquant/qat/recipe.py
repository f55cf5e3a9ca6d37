"""The QAT recipe behind ``dfquant qat``: train a zoo model with quantization in the loop, convert, save, and
compare with post-training quantization.

An image classifier of the zoo (the CIFAR-10 ResNets, ``data="cifar10"``) trains on the JPEG copy's images
1017..9999 and is evaluated by top-1 on the exact test images 0..1016, which are never trained on; a causal
language model of the zoo (``smollm2-135m``, ``data="wikitext2"``) trains on random ``seq``-token windows of
WikiText-2 valid and is evaluated by perplexity on the first ``eval_windows`` 1024-token windows of WikiText-2 test
(:mod:`dfquant.qat.lm`; Linear layers are fake-quantized, token embeddings and, by default, the tied output head
``lm_head`` stay float). A resumable checkpoint is kept (``checkpoint``, default ``OUT.ckpt``, rewritten
atomically; a rerun with the same file continues from it); the converted model is written to ``out`` (the
post-training file format), and the result compares the trained model with post-training quantization
(``statq``, same format, same float layers) of the same model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfquant.config import LayerRule, PatternRule, QuantConfig, parse_device
from dfquant.errors import ConfigError
from dfquant.eval.cifar10 import EXACT_FILE, JPEG_FILE, load_cifar10, predict
from dfquant.io.save import save_quantized
from dfquant.pipeline.quantize import quantize_model
from dfquant.qat.fake import QATConfig, convert, parse_format, prepare_qat
from dfquant.qat.lm import causal_lm_loss, lm_perplexity, lm_train_batches, wikitext2_ids
from dfquant.qat.train import TRAIN_FIRST, cifar_train_batches, train_qat
from dfquant.quantizers.granularity import Granularity
from dfquant.zoo import load_model

#: Per-task defaults: learning rate, batch, layers left float.
DEFAULTS: dict[str, tuple[float, int, str]] = {
    "cifar10": (5e-4, 64, "conv1,linear"),
    "wikitext2": (2e-5, 2, "lm_head"),
}


@dataclass
class QATRun:
    """One QAT run's settings (the ``dfquant qat`` flags). ``lr``, ``batch`` and ``keep_float`` default per task
    (:data:`DEFAULTS`) when None."""

    model: str
    format: str
    steps: int
    out: str
    data: str = "cifar10"
    method: str = "statq"
    weight_rule: str = "analytic"
    act_format: str | None = None
    granularity: str = "channel"
    lr: float | None = None
    batch: int | None = None
    seq: int = 256
    eval_windows: int = 4
    keep_float: str | None = None
    eval_every: int = 0
    checkpoint: str | None = None
    float_baseline: bool = False
    threads: int = 2
    #: Where the model trains and is evaluated: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"


def run_qat(run: QATRun, progress: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Train, convert, save and compare; return the JSON-ready result.

    Args:
        run: the settings.
        progress: called with progress text (a training bar, evaluations); None: silent.

    Returns:
        The settings used, the evaluations during training, ``qat_<metric>`` and ``float_<metric>`` (``top1`` or
        ``ppl``), ``ptq_<metric>`` (and more baselines where they apply), ``out`` and ``checkpoint``.

    Raises:
        ConfigError: a setting out of range, a model whose task is not ``data``, an output folder that does not
            exist.
    """

    if run.data not in DEFAULTS:
        raise ConfigError(f"--data '{run.data}' is not supported by 'qat'; allowed: {', '.join(DEFAULTS)}")
    lr0, batch0, keep0 = DEFAULTS[run.data]
    lr = lr0 if run.lr is None else run.lr
    batch = batch0 if run.batch is None else run.batch
    if run.steps < 1 or batch < 1 or not lr > 0:
        raise ConfigError(f"--steps and --batch must be >= 1 and --lr > 0, got {run.steps}, {batch}, {lr}")
    if run.data == "wikitext2" and (run.seq < 2 or run.eval_windows < 1):
        raise ConfigError(f"--seq must be >= 2 and --eval-windows >= 1, got {run.seq}, {run.eval_windows}")
    out = Path(run.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out '{out}': folder '{out.parent}' does not exist")
    torch.set_num_threads(max(1, run.threads))
    keep = tuple(k for k in (keep0 if run.keep_float is None else run.keep_float).split(",") if k)
    cfg = QATConfig(
        method=run.method,
        format=run.format,
        granularity=run.granularity,
        act_format=run.act_format,
        keep_float=keep,
        weight_rule=run.weight_rule,
    )
    dev = parse_device(run.device, "--device")
    loaded = load_model(run.model)
    loaded.model.to(dev)
    if loaded.task != run.data:
        raise ConfigError(
            f"model '{run.model}' has task '{loaded.task}', not '{run.data}'; 'qat' trains cifar10 classifiers "
            "(--data cifar10) and causal LMs (--data wikitext2)"
        )
    metric, unit = ("top1", "%") if run.data == "cifar10" else ("ppl", "")
    loss_fn: Any = None
    evaluate: Callable[[torch.nn.Module], dict[str, Any]]
    if run.data == "cifar10":
        ex, ey = load_cifar10(EXACT_FILE)
        jx, jy = load_cifar10(JPEG_FILE)
        batches = cifar_train_batches(jx[TRAIN_FIRST:], jy[TRAIN_FIRST:], batch)

        def evaluate(m: torch.nn.Module) -> dict[str, Any]:
            return {"top1": round(100.0 * float((predict(m, ex) == ey).float().mean()), 2)}

    else:
        if loaded.tokenizer is None:
            raise ConfigError(f"--data wikitext2 needs the model's tokenizer; '{run.model}' has none")
        batches = lm_train_batches(wikitext2_ids(loaded.tokenizer, "valid"), run.seq, batch)
        test_ids = wikitext2_ids(loaded.tokenizer, "test")
        loss_fn = causal_lm_loss

        def evaluate(m: torch.nn.Module) -> dict[str, Any]:
            r = lm_perplexity(m, test_ids, run.eval_windows)
            return {"ppl": round(r["ppl"], 4), "windows": r["windows"], "tokens": r["tokens"]}

    say = progress or (lambda text: None)
    t0 = time.time()

    def on_step(step: int, loss: float) -> None:
        done = step / run.steps
        bar = "#" * int(30 * done)
        say(f"\r[{bar:<30}] {step}/{run.steps} loss {loss:.3f} {time.time() - t0:.0f}s")

    def on_eval(step: int, res: dict[str, Any]) -> None:
        say(f"\nstep {step}: {metric} {res[metric]:.2f} {unit}\n")

    qat = prepare_qat(loaded.model, cfg)
    ckpt = run.checkpoint or f"{out}.ckpt"
    state = train_qat(
        qat,
        batches,
        steps=run.steps,
        lr=lr,
        evaluate=evaluate,
        eval_every=run.eval_every,
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
        "model": run.model,
        "device": str(dev),
        "data": run.data,
        "method": run.method,
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
    if run.data == "wikitext2":
        result["setup"] = {
            "train": "wikitext2/wiki.valid.tokens, random windows",
            "seq": run.seq,
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
            LayerRule("statq", grid.bits, Granularity.parse(cfg.granularity), options={"format": grid.name})
            if grid is not None
            else LayerRule(cfg.format, 4)
        )
    if ptq_rule is not None:
        ptq, _ = quantize_model(loaded.model, QuantConfig(ptq_rule, rules=skip))
        result[f"ptq_{metric}"] = evaluate(ptq)[metric]
    if ptq_rule is not None and grid is not None and run.data == "wikitext2":
        # the rule StatQAT's weights start from (analytic scale, Gaussian fit), as a post-training baseline
        ana = LayerRule(
            "statq", grid.bits, Granularity.parse(cfg.granularity), options={"format": grid.name, "rule": "analytic"}
        )
        ptq, _ = quantize_model(loaded.model, QuantConfig(ana, rules=skip))
        result[f"ptq_analytic_{metric}"] = evaluate(ptq)[metric]
    if run.float_baseline:
        # the same training without quantization, then the same post-training quantization
        say("\nfloat baseline: the same training without quantization\n")
        tuned = copy.deepcopy(loaded.model).train()
        train_qat(tuned, batches, steps=run.steps, lr=lr, on_step=on_step, loss_fn=loss_fn)
        result[f"float_finetuned_{metric}"] = evaluate(tuned)[metric]
        if ptq_rule is not None:
            ptq, _ = quantize_model(tuned, QuantConfig(ptq_rule, rules=skip))
            result[f"ptq_finetuned_{metric}"] = evaluate(ptq)[metric]
    return result
