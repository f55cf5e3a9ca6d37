"""Plain metrics shared by the task evaluators: accuracy, agreement, relative error, correlations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dfquant.errors import InputError

__all__ = ["agreement", "pearson", "relative_error", "spearman", "top1_accuracy"]


def top1_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of predicted classes equal to the labels.

    Args:
        pred: predicted class indices, shape (N,), or logits of shape (N, C) (argmax taken).
        labels: class indices, shape (N,).

    Raises:
        InputError: mismatched or empty inputs.
    """
    if pred.dim() == 2:
        pred = pred.argmax(-1)
    if pred.shape != labels.shape or pred.numel() == 0:
        raise InputError(
            f"top-1 needs predictions and labels of one non-empty shape, got {tuple(pred.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return 100.0 * float((pred == labels).double().mean())


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percentage of positions where two models' top-1 choices agree: ``100 * mean(argmax a == argmax b)``.

    Args:
        a: logits with classes on the last dimension, or class indices (integer dtype).
        b: the same for the other model.
    """
    pa = a if not a.is_floating_point() else a.argmax(-1)
    pb = b if not b.is_floating_point() else b.argmax(-1)
    if pa.shape != pb.shape or pa.numel() == 0:
        raise InputError(
            f"agreement needs two non-empty outputs of one shape, got {tuple(pa.shape)} and {tuple(pb.shape)}"
        )
    return 100.0 * float((pa == pb).double().mean())


def relative_error(y_q: torch.Tensor, y_f: torch.Tensor) -> float:
    """Relative output error ``||y_q - y_f||_2 / ||y_f||_2`` over all elements (accumulated in float64)."""
    if y_q.shape != y_f.shape:
        raise InputError(f"relative error needs outputs of one shape, got {tuple(y_q.shape)} and {tuple(y_f.shape)}")
    num = float(torch.linalg.vector_norm((y_q.double() - y_f.double()).flatten()))
    den = float(torch.linalg.vector_norm(y_f.double().flatten()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _as_array(x: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def pearson(x: Sequence[float] | np.ndarray | torch.Tensor, y: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """Pearson correlation of two equal-length samples (nan when either is constant)."""
    a, b = _as_array(x), _as_array(y)
    if a.shape != b.shape or a.size < 2:
        raise InputError(f"correlation needs two samples of one length >= 2, got {a.size} and {b.size}")
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else math.nan


def spearman(x: Sequence[float] | np.ndarray | torch.Tensor, y: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks (ties get their average rank)."""
    from scipy.stats import rankdata

    a, b = _as_array(x), _as_array(y)
    if a.shape != b.shape or a.size < 2:
        raise InputError(f"correlation needs two samples of one length >= 2, got {a.size} and {b.size}")
    return pearson(rankdata(a), rankdata(b))
