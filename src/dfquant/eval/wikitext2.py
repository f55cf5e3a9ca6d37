"""WikiText-2 perplexity of a causal language model.

Protocol (stated in every result): ``wikitext2/wiki.test.tokens`` read as one string and tokenized at once;
the token stream is cut into non-overlapping windows of 1024 tokens; each window is scored on its 1023
next-token predictions; perplexity = exp(total negative log-likelihood / scored tokens) over the first 32
windows (32,736 tokens). SmolLM2-135M-Instruct (dequantized from its Q4_1 file) gives 21.16.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.eval.metrics import agreement
from dfquant.eval.registry import Progress, models_to_run, no_grad_eval, register_evaluator
from dfquant.graph.modules import model_device
from dfquant.zoo.assets import asset_path, missing_reason
from dfquant.zoo.registry import LoadedModel

__all__ = ["WINDOW", "WINDOWS", "lm_logits", "perplexity", "tokenize_text"]

DATA_DIR = "wikitext2"
TEST_FILE = "wiki.test.tokens"
WINDOW = 1024
WINDOWS = 32


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``(B, T, V)`` of a causal LM for token ids ``(B, T)``.

    Works with a ``transformers`` model (its output's ``logits``; the KV cache is switched off) or with any
    module returning the logits tensor (or a tuple whose first item is it).
    """
    config = getattr(model, "config", None)
    ids = ids.to(model_device(model))
    out = model(ids, use_cache=False) if hasattr(config, "use_cache") else model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise InputError(f"a causal LM must return logits of shape (batch, tokens, vocab), got {type(out).__name__}")
    return out


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    window: int = WINDOW,
    windows: int | None = WINDOWS,
    what: str = "windows",
    progress: Progress | None = None,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Perplexity over non-overlapping windows: ``exp(sum of -log p(t_{i+1} | t_0..t_i) / scored tokens)``.

    Args:
        model: a causal LM (see :func:`lm_logits`).
        ids: the token stream, shape (N,).
        window: tokens per window; each window scores ``window - 1`` predictions.
        windows: the number of windows from the start (None: every whole window).
        what: label for ``progress``.
        progress: optional ``progress(what, done, total)``.
        keep_predictions: also return the argmax predictions (for agreement between two models).

    Returns:
        ``{"ppl", "nll" (mean per token), "tokens" (scored), "windows"}`` and, when asked, ``"predictions"``.

    Raises:
        InputError: a window below 2 tokens or a stream shorter than one window.
    """
    if window < 2:
        raise InputError(f"perplexity window must be >= 2 tokens, got {window}")
    ids = ids.flatten().long()
    n_all = ids.numel() // window
    n = n_all if windows is None else min(windows, n_all)
    if n < 1:
        raise InputError(f"the token stream has {ids.numel()} tokens, fewer than one window of {window}")
    total = 0.0
    preds = []
    with no_grad_eval(model):
        for w in range(n):
            seg = ids[w * window : (w + 1) * window].unsqueeze(0)
            logits = lm_logits(model, seg)[0, :-1].float().cpu()
            total += float(F.cross_entropy(logits, seg[0, 1:], reduction="sum").double())
            if keep_predictions:
                preds.append(logits.argmax(-1))
            if progress is not None:
                progress(what, w + 1, n)
    tokens = n * (window - 1)
    out: dict[str, Any] = {
        "ppl": math.exp(total / tokens),
        "nll": total / tokens,
        "tokens": tokens,
        "windows": n,
    }
    if keep_predictions:
        out["predictions"] = torch.cat(preds)
    return out


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` tokenized as one string (with the tokenizer's own special-token rule)."""
    enc = tokenizer(text, return_attention_mask=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


@register_evaluator("wikitext2", kinds=("causal-lm",), description="WikiText-2 test perplexity, 32 x 1024 tokens")
def evaluate_wikitext2(
    loaded: LoadedModel,
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Perplexity on WikiText-2 test: the first 32 windows of 1024 tokens (or the first ``limit`` windows).

    Returns:
        ``float`` / ``quantized``: ``ppl`` and ``nll``; the quantized entry adds ``agreement`` (% of scored
        positions where both models predict the same next token) when both models are given; ``setup`` states
        the file, window, window count and token counts.
    """
    if loaded.tokenizer is None:
        raise ConfigError(f"task 'wikitext2' needs the model's tokenizer; '{loaded.name}' has none")
    p = asset_path(DATA_DIR, TEST_FILE)
    if p is None:
        raise ConfigError(f"task 'wikitext2' needs its data: {missing_reason(DATA_DIR, TEST_FILE)}")
    ids = tokenize_text(loaded.tokenizer, Path(p).read_text(encoding="utf-8"))
    windows = limit if limit is not None else WINDOWS
    out: dict[str, Any] = {
        "task": "wikitext2",
        "setup": {"data": f"{DATA_DIR}/{TEST_FILE}", "window": WINDOW, "tokens_in_file": int(ids.numel())},
    }
    preds: dict[str, torch.Tensor] = {}
    both = float_model is not None and quant_model is not None
    for key, model in models_to_run(float_model, quant_model):
        r = perplexity(model, ids, windows=windows, what=f"{key} wikitext2", progress=progress, keep_predictions=both)
        if both:
            preds[key] = r.pop("predictions")
        out["setup"].update(windows=r.pop("windows"), tokens_scored=r.pop("tokens"))
        out[key] = {"ppl": round(r["ppl"], 4), "nll": round(r["nll"], 6)}
    if both:
        out["quantized"]["agreement"] = round(agreement(preds["quantized"], preds["float"]), 4)
    return out
