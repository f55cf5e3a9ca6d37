"""The training loop of quantization-aware training: batches, Adam with a cosine schedule, periodic evaluation and
a resumable checkpoint written atomically.

CIFAR-10 data: the JPEG copy's images ``1017..9999`` train (random crop with 4 pixels of zero padding and a
horizontal flip, Krizhevsky-style), the exact images ``0..1016`` evaluate; the two sets never overlap.

Example:
    >>> import torch
    >>> from dfquant.qat.fake import QATConfig, prepare_qat
    >>> net = prepare_qat(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), QATConfig())
    >>> x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    >>> state = train_qat(net, lambda step: (x, y), steps=3, lr=0.01)
    >>> state.step
    3
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.eval.cifar10 import preprocess
from dfquant.graph.modules import model_device
from dfquant.io.atomic import replace_atomic

__all__ = ["TRAIN_FIRST", "TrainState", "cifar_train_batches", "train_qat"]

#: The first JPEG-copy image used for training (images before it are the exact evaluation images).
TRAIN_FIRST = 1017

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainState:
    """Where training stands: the step reached and the evaluation lines so far."""

    step: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def cifar_train_batches(images: torch.Tensor, labels: torch.Tensor, batch: int, seed: int = 0) -> Batches:
    """``batches(step) -> (x, y)``: preprocessed, augmented CIFAR batches drawn from ``images`` (uint8 N x 3 x 32 x
    32), a new shuffle every epoch; the same step always gives the same batch (so a resumed run sees the same
    data)."""

    n = images.shape[0]
    per_epoch = max(n // batch, 1)

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        idx = torch.randperm(n, generator=gen)[i * batch : (i + 1) * batch]
        gen_b = torch.Generator().manual_seed(seed * 7_919 + step)
        x = preprocess(images[idx])
        x = F.pad(x, (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2, len(idx)), generator=gen_b)
        flip = torch.rand(len(idx), generator=gen_b) < 0.5
        out = torch.empty(len(idx), 3, 32, 32)
        for k in range(len(idx)):
            crop = x[k, :, int(dy[k]) : int(dy[k]) + 32, int(dx[k]) : int(dx[k]) + 32]
            out[k] = crop.flip(-1) if bool(flip[k]) else crop
        return out, labels[idx]

    return get


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    replace_atomic(path, lambda tmp: torch.save(obj, tmp), what="checkpoint ")


def _iter_steps(start: int, steps: int) -> Iterator[int]:
    return iter(range(start, steps))


def train_qat(
    model: nn.Module,
    batches: Batches,
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    eval_every: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, dict[str, Any]], None] | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainState:
    """Train a :func:`~dfquant.qat.fake.prepare_qat` model with Adam and a cosine learning rate
    ``lr * (1 + cos(pi t / steps)) / 2``, cross-entropy on ``batches(step)``.

    Args:
        model: the QAT model (trained in place; left in eval mode).
        batches: ``batches(step) -> (inputs, labels)``.
        steps: total optimizer steps.
        lr: peak learning rate.
        evaluate: ``evaluate(model) -> dict`` (called in eval mode) every ``eval_every`` steps and at the end.
        checkpoint: a file to resume from when it exists, rewritten atomically every ``checkpoint_every`` steps
            (model, optimizer, step, evaluations).
        on_step / on_eval: callbacks after each step ``(step, loss)`` / each evaluation ``(step, result)``.
        loss_fn: ``loss_fn(model, inputs, labels) -> scalar``; default cross-entropy of ``model(inputs)``
            (a causal LM uses :func:`dfquant.qat.lm.causal_lm_loss`).

    Returns:
        The :class:`TrainState` at the end.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    state = TrainState()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = TrainState(int(saved["step"]), list(saved["evals"]), list(saved["losses"]))

    def save() -> None:
        if ckpt is not None:
            _save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": state.step,
                    "evals": state.evals,
                    "losses": state.losses,
                },
                ckpt,
            )

    def run_eval() -> None:
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad():
            res = {"step": state.step, **evaluate(model)}
        state.evals.append(res)
        if on_eval is not None:
            on_eval(state.step, res)

    for step in _iter_steps(state.step, steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, y = batches(step)
        dev = model_device(model)
        x, y = x.to(dev), y.to(dev)
        loss = F.cross_entropy(model(x), y) if loss_fn is None else loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.step = step + 1
        value = float(loss.detach())
        state.losses.append(value)
        if on_step is not None:
            on_step(state.step, value)
        if eval_every and state.step % eval_every == 0 and state.step < steps:
            run_eval()
        if checkpoint_every and state.step % checkpoint_every == 0:
            save()
    if not state.evals or state.evals[-1]["step"] != state.step:
        run_eval()
    save()
    model.eval()
    return state
