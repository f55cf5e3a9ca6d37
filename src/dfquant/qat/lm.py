"""Quantization-aware training of a causal language model on WikiText-2: batches, loss and evaluation.

Data (the two splits never mix): ``wikitext2/wiki.valid.tokens`` trains, ``wikitext2/wiki.test.tokens``
evaluates. Each file is read as one string and tokenized at once (:func:`dfquant.eval.wikitext2.tokenize_text`).

* Training batches: ``batch`` windows of ``seq`` consecutive tokens of the valid stream, at offsets drawn
  uniformly at random, a fresh draw each step and the same draw for the same step (a resumed run sees the same
  data).
* Loss: the causal-LM loss that ``transformers`` computes with ``labels=inputs``, the mean over the batch of
  ``-log p(x_{t+1} | x_0..x_t)`` for ``t = 0..seq-2`` (labels shifted left by one).
* Evaluation: perplexity on the test stream with the WikiText-2 evaluator's protocol
  (:func:`dfquant.eval.wikitext2.perplexity`: non-overlapping windows of 1024 tokens from the start, each scoring
  1023 predictions), over the first ``windows`` windows (the full protocol uses 32).

Layers: :func:`dfquant.qat.fake.prepare_qat` fake-quantizes Linear layers only, so token embeddings (``nn.Embedding``)
stay float. :data:`LM_KEEP_FLOAT` also keeps the output head float: in tied models (SmolLM2) it shares its
weight with the token embedding, and keeping it float keeps that tie intact through training, conversion and
the saved file.

Example:
    >>> import torch
    >>> ids = torch.arange(100)
    >>> x, y = lm_train_batches(ids, seq=8, batch=2)(0)
    >>> x.shape, bool(torch.equal(x, y)), bool(torch.equal(x[0, 1:] - x[0, :-1], torch.ones(7, dtype=torch.long)))
    (torch.Size([2, 8]), True, True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.eval.wikitext2 import DATA_DIR, TEST_FILE, WINDOW, lm_logits, perplexity, tokenize_text
from dfquant.qat.train import Batches
from dfquant.zoo.assets import asset_path, missing_reason

__all__ = [
    "LM_KEEP_FLOAT",
    "VALID_FILE",
    "causal_lm_loss",
    "lm_perplexity",
    "lm_train_batches",
    "wikitext2_ids",
]

VALID_FILE = "wiki.valid.tokens"
#: Layers a language model keeps float by default in QAT (the output head, tied to the embedding in SmolLM2).
LM_KEEP_FLOAT = ("lm_head",)


def wikitext2_ids(tokenizer: Any, split: str) -> torch.Tensor:
    """The token stream of WikiText-2 ``split`` (``valid`` or ``test``), the file tokenized as one string.

    Raises:
        ConfigError: an unknown split or a missing file.
    """
    files = {"valid": VALID_FILE, "test": TEST_FILE}
    if split not in files:
        raise ConfigError(f"WikiText-2 split must be 'valid' or 'test', got '{split}'")
    p = asset_path(DATA_DIR, files[split])
    if p is None:
        raise ConfigError(f"WikiText-2 {split} is needed: {missing_reason(DATA_DIR, files[split])}")
    return tokenize_text(tokenizer, Path(p).read_text(encoding="utf-8"))


def lm_train_batches(ids: torch.Tensor, seq: int, batch: int, seed: int = 0) -> Batches:
    """``batches(step) -> (x, x)``: ``batch`` windows of ``seq`` tokens of ``ids`` at random offsets (uniform
    over ``0..N-seq``, drawn from a generator seeded by ``seed`` and ``step``); the labels are the inputs, the
    shift happens in :func:`causal_lm_loss`.

    Raises:
        InputError: ``seq < 2``, ``batch < 1`` or a stream shorter than one window.
    """
    ids = ids.flatten().long()
    if seq < 2 or batch < 1:
        raise InputError(f"LM batches need seq >= 2 and batch >= 1, got seq {seq}, batch {batch}")
    if ids.numel() < seq:
        raise InputError(f"the training stream has {ids.numel()} tokens, fewer than one window of {seq}")
    span = ids.numel() - seq + 1
    offsets = torch.arange(seq)

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, span, (batch,), generator=gen)
        x = ids[starts[:, None] + offsets[None, :]]
        return x, x

    return get


def causal_lm_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy ``-1/(B (T-1)) sum_{b,t<T-1} log p(labels[b, t+1] | x[b, :t+1])``, the loss
    a ``transformers`` causal LM returns for ``labels=`` (labels shifted inside)."""
    logits = lm_logits(model, x)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def lm_perplexity(model: nn.Module, test_ids: torch.Tensor, windows: int, window: int = WINDOW) -> dict[str, Any]:
    """Perplexity on the first ``windows`` non-overlapping windows of ``test_ids``
    (:func:`dfquant.eval.wikitext2.perplexity`): ``{"ppl", "nll", "tokens", "windows", "window"}``."""
    r = perplexity(model, test_ids, window=window, windows=windows)
    return {**r, "window": window}
