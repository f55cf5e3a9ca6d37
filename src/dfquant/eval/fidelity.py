"""A data-free fidelity check: the quantized model against the float model on inputs the tool generates.

No data set is read. The inputs are synthetic, drawn with a fixed seed (0): for image models Gaussian N(0, 1)
images of the model's input shape (the scale of normalized images); for text models uniformly random token ids
from the vocabulary (special and added tokens excluded when the tokenizer names them). Reported for the
quantized model:

- ``rel_error``: ``||y_q - y_f|| / ||y_f||`` over all outputs (logits, embeddings or hidden states);
- ``agreement``: top-1 agreement (%): the same argmax class for classifiers, the same next token at every
  position for causal LMs, the same nearest neighbour (by cosine, among the other synthetic inputs) for
  sentence encoders; not given for plain encoders, whose outputs have no top-1;
- ``cosine``: the mean cosine similarity between quantized and float output vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ConfigError
from dfquant.eval.metrics import agreement, relative_error
from dfquant.eval.registry import Progress, no_grad_eval, register_evaluator
from dfquant.eval.wikitext2 import lm_logits
from dfquant.graph.modules import model_device
from dfquant.zoo.registry import LoadedModel

__all__ = ["SEED", "fidelity_probe", "synthetic_inputs"]

SEED = 0
#: default number of synthetic inputs and tokens per text input, by model kind
COUNTS = {"image-classifier": 256, "sentence-encoder": 64, "causal-lm": 8, "encoder": 16, "module": 256}
SEQ_LEN = {"sentence-encoder": 32, "causal-lm": 128, "encoder": 32}
BATCH = 64


def _vocab(loaded: LoadedModel) -> tuple[int, list[int]]:
    vocab = loaded.vocab_size
    special: list[int] = []
    tok = loaded.tokenizer
    if tok is not None:
        vocab = vocab or len(tok)
        special = [int(i) for i in getattr(tok, "all_special_ids", []) or []]
        special += [int(i) for i in getattr(tok, "added_tokens_decoder", {}) or {}]
    if not vocab:
        raise ConfigError(f"the fidelity check needs the vocabulary size of '{loaded.name}'")
    return int(vocab), special


def synthetic_inputs(loaded: LoadedModel, count: int | None = None, seed: int = SEED) -> torch.Tensor:
    """The fixed synthetic inputs for ``loaded``: Gaussian images or random token ids.

    Args:
        loaded: the model record (its ``kind``, ``input_shape``, ``vocab_size`` / ``tokenizer``).
        count: how many inputs (default: per kind, see ``COUNTS``).
        seed: the generator seed.

    Raises:
        ConfigError: when neither an input shape nor a vocabulary is known.
    """
    n = count or COUNTS.get(loaded.kind, 64)
    g = torch.Generator().manual_seed(seed)
    if loaded.kind in SEQ_LEN:
        vocab, special = _vocab(loaded)
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[[i for i in special if 0 <= i < vocab]] = False
        pool = allowed.nonzero().flatten()
        return pool[torch.randint(0, pool.numel(), (n, SEQ_LEN[loaded.kind]), generator=g)]
    if loaded.input_shape is None:
        raise ConfigError(
            f"the fidelity check needs the input shape of '{loaded.name}' (a {loaded.kind}); give input_shape"
        )
    return torch.randn((n, *loaded.input_shape), generator=g)


def _outputs(model: nn.Module, kind: str, x: torch.Tensor, progress: Progress | None, what: str) -> torch.Tensor:
    outs = []
    with no_grad_eval(model):
        for i in range(0, x.shape[0], BATCH):
            xb = x[i : i + BATCH].to(model_device(model))
            if kind == "causal-lm":
                y = lm_logits(model, xb)
            elif kind == "sentence-encoder":
                y = model(xb, torch.ones_like(xb))
            else:
                y = model(xb)
                y = getattr(y, "last_hidden_state", y)
                if isinstance(y, (tuple, list)):
                    y = y[0]
            outs.append(y.float().cpu())
            if progress is not None:
                progress(what, min(i + BATCH, x.shape[0]), x.shape[0])
    return torch.cat(outs)


def fidelity_probe(loaded: LoadedModel, count: int | None = None) -> Callable[[nn.Module], torch.Tensor]:
    """``probe(model)``: a model's outputs (logits, embeddings) on the fidelity check's synthetic inputs of
    ``loaded`` (:func:`synthetic_inputs`), the data-free reference of the bit allocation
    (:func:`dfquant.pipeline.allocate.allocate_bits`).

    Raises:
        ConfigError: when the inputs cannot be generated (no input shape or vocabulary).
    """
    x = synthetic_inputs(loaded, count)
    kind = loaded.kind

    def probe(model: nn.Module) -> torch.Tensor:
        return _outputs(model, kind, x, None, "probe")

    return probe


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    e = F.normalize(emb.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(-1)


@register_evaluator("fidelity", description="data-free: quantized vs float outputs on synthetic inputs")
def evaluate_fidelity(
    loaded: LoadedModel,
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Top-1 agreement, relative output error and cosine of the quantized model against the float model.

    Args:
        loaded: the model record (kind, input shape or vocabulary).
        float_model: the float reference (required).
        quant_model: the quantized model (required).
        progress: optional ``progress(what, done, total)``.
        limit: the number of synthetic inputs (default per kind).

    Returns:
        ``setup`` (``inputs: "synthetic"`` and how they were drawn), ``float`` (the reference: agreement 100,
        error 0) and ``quantized`` (``agreement`` where defined, ``rel_error``, ``cosine``).

    Raises:
        ConfigError: when either model is missing, or the inputs cannot be generated.
    """
    if float_model is None or quant_model is None:
        raise ConfigError("the fidelity check compares a quantized model with its float model: give both")
    kind = loaded.kind
    x = synthetic_inputs(loaded, limit)
    if kind in SEQ_LEN:
        drawn = f"{x.shape[0]} sequences of {x.shape[1]} uniformly random token ids (special and added tokens excluded)"
    else:
        drawn = f"{x.shape[0]} Gaussian N(0, 1) inputs of shape {tuple(x.shape[1:])}"
    y_f = _outputs(float_model, kind, x, progress, "float fidelity")
    y_q = _outputs(quant_model, kind, x, progress, "quantized fidelity")
    cos = F.cosine_similarity(y_q.flatten(0, -2).double(), y_f.flatten(0, -2).double(), dim=-1)
    quant: dict[str, Any] = {}
    ref: dict[str, Any] = {}
    if kind in ("image-classifier", "causal-lm"):
        quant["agreement"] = round(agreement(y_q, y_f), 4)
        ref["agreement"] = 100.0
        what = "argmax of the output" if kind == "image-classifier" else "next token at every position"
    elif kind == "sentence-encoder" and x.shape[0] > 1:
        quant["agreement"] = round(agreement(_nearest(y_q), _nearest(y_f)), 4)
        ref["agreement"] = 100.0
        what = "nearest neighbour among the synthetic inputs (cosine)"
    else:
        what = "not defined for this kind of output"
    quant["rel_error"] = round(relative_error(y_q, y_f), 6)
    quant["cosine"] = round(float(cos.mean()), 6)
    ref.update(rel_error=0.0, cosine=1.0)
    return {
        "task": "fidelity",
        "setup": {
            "inputs": "synthetic",
            "drawn": drawn,
            "seed": SEED,
            "agreement_on": what,
            "reference": "the float model",
        },
        "float": ref,
        "quantized": quant,
    }
