"""Semantic textual similarity: STS Benchmark test (``stsb``) and the shipped demo pairs (``pairs``).

Each sentence is embedded by the model (a sentence encoder: token ids and attention mask -> one vector), each
pair is scored by the cosine similarity of its two embeddings, and the scores are compared with the gold
similarities by Spearman (and Pearson) correlation x 100. The float all-MiniLM-L6-v2 gives 82.03 on STS-B
test.

``sts-test.csv`` is TAB-separated but not proper CSV (sentences hold unescaped quotes): :func:`parse_sts`
splits each line on tabs and reads fields ``genre, filename, year, id, score, sentence1, sentence2`` (some
lines carry extra fields after sentence2, which are ignored).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.eval.metrics import pearson, spearman
from dfquant.eval.registry import Progress, models_to_run, no_grad_eval, register_evaluator
from dfquant.graph.modules import model_device
from dfquant.zoo.assets import asset_path, missing_reason
from dfquant.zoo.registry import LoadedModel

__all__ = ["encode_sentences", "load_demo_pairs", "parse_pairs", "parse_sts", "read_sts", "score_pairs"]

Pair = tuple[str, str, float]
STS_DIR = "stsb"
STS_TEST = "sts-test.csv"
BATCH = 64


def parse_sts(text: str, origin: str = "<text>") -> list[Pair]:
    """Parse STS Benchmark lines (TAB-separated, quotes are plain text) into (sentence1, sentence2, score).

    Args:
        text: the file's content.
        origin: a name for error messages.

    Raises:
        InputError: a non-empty line with fewer than 7 fields or a score that is not a number.
    """
    pairs: list[Pair] = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) < 7:
            raise InputError(f"{origin} line {n}: expected >= 7 TAB-separated fields, got {len(f)}")
        try:
            score = float(f[4])
        except ValueError:
            raise InputError(f"{origin} line {n}: score {f[4]!r} is not a number") from None
        pairs.append((f[5], f[6], score))
    return pairs


def read_sts(name: str = STS_TEST) -> list[Pair]:
    """The pairs of an STS Benchmark file in the assets folder.

    Raises:
        ConfigError: when the file is missing.
    """
    p = asset_path(STS_DIR, name)
    if p is None:
        raise ConfigError(f"task 'stsb' needs its data: {missing_reason(STS_DIR, name)}")
    return parse_sts(Path(p).read_text(encoding="utf-8"), f"{STS_DIR}/{name}")


def parse_pairs(text: str, origin: str = "<text>") -> list[Pair]:
    """Parse ``score<TAB>sentence1<TAB>sentence2`` lines; blank lines and ``#`` comment lines are skipped.

    Raises:
        InputError: a line without exactly three fields or with a non-numeric score.
    """
    pairs: list[Pair] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        f = line.split("\t")
        if len(f) != 3:
            raise InputError(f"{origin} line {n}: expected 'score<TAB>sentence1<TAB>sentence2', got {len(f)} fields")
        try:
            pairs.append((f[1], f[2], float(f[0])))
        except ValueError:
            raise InputError(f"{origin} line {n}: score {f[0]!r} is not a number") from None
    return pairs


def load_demo_pairs() -> list[Pair]:
    """The sentence pairs shipped with dfquant (``dfquant/data/demo_pairs.tsv``, scores 0..5)."""
    text = resources.files("dfquant").joinpath("data/demo_pairs.tsv").read_text(encoding="utf-8")
    return parse_pairs(text, "demo_pairs.tsv")


def encode_sentences(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    *,
    batch_size: int = BATCH,
    what: str = "sentences",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Embed sentences with a sentence encoder (``model(input_ids, attention_mask) -> (B, H)``).

    Sentences are batched in order of length (less padding; the attention mask makes the result independent of
    batching) and truncated to the tokenizer's ``model_max_length``; the rows come back in input order.
    """
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(sentences)
    with no_grad_eval(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
            dev = model_device(model)
            emb = model(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)).float().cpu()
            for j, i in enumerate(idx):
                out[i] = emb[j]
            if progress is not None:
                progress(what, min(start + batch_size, len(order)), len(order))
    return torch.stack(out)


def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    pairs: list[Pair],
    *,
    what: str = "pairs",
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each pair's embeddings, and the embeddings of the distinct sentences.

    Returns:
        ``(cosines (N,), embeddings (U, H))`` where U is the number of distinct sentences.
    """
    uniq = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    pos = {s: i for i, s in enumerate(uniq)}
    emb = encode_sentences(model, tokenizer, uniq, what=what, progress=progress)
    ia = torch.tensor([pos[a] for a, _, _ in pairs])
    ib = torch.tensor([pos[b] for _, b, _ in pairs])
    return F.cosine_similarity(emb[ia], emb[ib], dim=-1), emb


def _evaluate_pairs(
    task: str,
    data: str,
    pairs: list[Pair],
    loaded: LoadedModel,
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    progress: Progress | None,
) -> dict[str, Any]:
    if loaded.tokenizer is None:
        raise ConfigError(f"task '{task}' needs the model's tokenizer; '{loaded.name}' has none")
    gold = torch.tensor([s for _, _, s in pairs], dtype=torch.float64)
    out: dict[str, Any] = {
        "task": task,
        "setup": {
            "pairs": len(pairs),
            "data": data,
            "metric": "Spearman / Pearson x100 of the embeddings' cosine similarity vs the gold score",
        },
    }
    embs: dict[str, torch.Tensor] = {}
    for key, model in models_to_run(float_model, quant_model):
        cos, embs[key] = score_pairs(model, loaded.tokenizer, pairs, what=f"{key} {task}", progress=progress)
        out[key] = {
            "spearman": round(100 * spearman(cos, gold), 4),
            "pearson": round(100 * pearson(cos, gold), 4),
        }
    if len(embs) == 2:
        cos_fq = F.cosine_similarity(embs["quantized"], embs["float"], dim=-1)
        out["quantized"]["embedding_cosine"] = round(float(cos_fq.double().mean()), 6)
    return out


@register_evaluator("stsb", kinds=("sentence-encoder",), description="STS Benchmark test, Spearman x100")
def evaluate_stsb(
    loaded: LoadedModel,
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Spearman and Pearson x100 on the 1379 STS-B test pairs (the first ``limit`` pairs when given).

    Returns:
        ``float`` / ``quantized``: ``spearman``, ``pearson`` and, for the quantized model when both are given,
        ``embedding_cosine`` (mean cosine between its and the float model's embeddings of the same sentences).
    """
    pairs = read_sts()
    pairs = pairs[:limit] if limit is not None else pairs
    return _evaluate_pairs("stsb", f"{STS_DIR}/{STS_TEST}", pairs, loaded, float_model, quant_model, progress)


@register_evaluator("pairs", kinds=("sentence-encoder",), description="the shipped demo sentence pairs, Spearman")
def evaluate_pairs(
    loaded: LoadedModel,
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Spearman and Pearson x100 on the sentence pairs shipped with dfquant (a demo set, not a benchmark).

    Returns:
        The same keys as :func:`evaluate_stsb`.
    """
    pairs = load_demo_pairs()
    pairs = pairs[:limit] if limit is not None else pairs
    data = "dfquant/data/demo_pairs.tsv (hand-written demo pairs, not a benchmark)"
    return _evaluate_pairs("pairs", data, pairs, loaded, float_model, quant_model, progress)
