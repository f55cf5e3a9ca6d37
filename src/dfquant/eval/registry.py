"""The evaluator registry: task name -> function comparing a float and a quantized model.

An evaluator is ``fn(loaded, float_model, quant_model, *, progress, limit) -> dict`` and returns ``{"task":
..., "setup": {...}, "float": {...}, "quantized": {...}}``: ``setup`` states the data, its size and the
protocol; ``float`` / ``quantized`` hold the figures of each model (either may be left out by passing None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from dfquant.errors import ConfigError
from dfquant.zoo.registry import LoadedModel

__all__ = [
    "Progress",
    "available_tasks",
    "check_task",
    "evaluate",
    "models_to_run",
    "no_grad_eval",
    "register_evaluator",
]


class Progress(Protocol):
    """Progress callback: ``progress(what, done, total)`` after each batch or window."""

    def __call__(self, what: str, done: int, total: int) -> None: ...


Evaluator = Callable[..., dict[str, Any]]
E = TypeVar("E", bound=Evaluator)

_EVALUATORS: dict[str, tuple[Evaluator, tuple[str, ...], str]] = {}


def register_evaluator(task: str, *, kinds: tuple[str, ...] = (), description: str = "") -> Callable[[E], E]:
    """Decorator: register an evaluator under ``task``.

    Args:
        task: the task name (``--eval TASK``).
        kinds: the ``LoadedModel.kind`` values it accepts; empty means any.
        description: one line for listings.
    """

    def deco(fn: E) -> E:
        _EVALUATORS[task] = (fn, kinds, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def available_tasks() -> dict[str, str]:
    """Registered task names with their one-line descriptions."""
    return {k: v[2] for k, v in _EVALUATORS.items()}


def check_task(task: str, loaded: LoadedModel) -> None:
    """Check, before any work, that ``task`` exists and fits ``loaded``'s kind.

    Raises:
        ConfigError: an unknown task, or a task that does not fit the model's kind.
    """
    if task not in _EVALUATORS:
        raise ConfigError(f"unknown evaluation task '{task}'; available: {', '.join(_EVALUATORS)}")
    kinds = _EVALUATORS[task][1]
    if kinds and loaded.kind not in kinds:
        raise ConfigError(
            f"task '{task}' needs a model of kind {' or '.join(kinds)}; '{loaded.name}' is a {loaded.kind} "
            f"(its default task is '{loaded.task}')"
        )


def models_to_run(float_model: nn.Module | None, quant_model: nn.Module | None) -> list[tuple[str, nn.Module]]:
    """The ``("float", m)`` / ``("quantized", m)`` pairs that are given.

    Raises:
        ConfigError: when both are None.
    """
    out = [(k, m) for k, m in (("float", float_model), ("quantized", quant_model)) if m is not None]
    if not out:
        raise ConfigError("nothing to evaluate: both the float and the quantized model are None")
    return out


@contextmanager
def no_grad_eval(*models: nn.Module) -> Iterator[None]:
    """Run with autograd off and the models in eval mode; restore their training flags afterwards."""
    flags = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for group in flags:
            for m, was in group:
                m.train(was)


def evaluate(
    task: str,
    loaded: LoadedModel,
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Evaluate a float and a quantized model of ``loaded`` on ``task``.

    Args:
        task: ``"cifar10"``, ``"stsb"``, ``"wikitext2"``, ``"fidelity"``, ``"pairs"`` (see
            :func:`available_tasks`).
        loaded: the loaded model record (its kind, tokenizer, input shape).
        float_model: the float reference (usually ``loaded.model``), or None to skip it.
        quant_model: the quantized model with the same forward interface, or None to skip it.
        progress: optional ``progress(what, done, total)`` callback.
        limit: a smaller run for quick checks: the number of images, pairs, windows or synthetic inputs
            (stated in ``setup``); None for the task's standard protocol.

    Returns:
        ``{"task", "setup", "float", "quantized"}`` (a model passed as None has no entry).

    Raises:
        ConfigError: unknown task, a task that does not fit the model's kind, a bad ``limit``, or
            missing data.
    """
    check_task(task, loaded)
    fn = _EVALUATORS[task][0]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    models_to_run(float_model, quant_model)
    return fn(loaded, float_model, quant_model, progress=progress, limit=limit)
