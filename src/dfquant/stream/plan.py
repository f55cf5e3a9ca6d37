"""Which tensors of a sharded checkpoint become quantized layers, decided from names and shapes alone.

Every tensor is classified without building the model (:func:`plan_checkpoint`):

* a floating ``NAME.weight`` with 2 dimensions is the weight of layer ``NAME``: an ``embedding`` when a name
  component is an embedding table's (``embed_tokens``, ``word_embeddings``, ``position_embeddings``, ``wte``,
  ``wpe``, ...), else a ``linear`` layer stored ``(out, in)``; the rule is ``config.rule_for(NAME)``, exactly
  as :func:`dfquant.quantize_model` resolves a module's qualified name;
* ``NAME.bias`` of a quantized layer becomes that layer's float bias (the same key the single-file format
  uses), in the layer's dtype;
* everything else (norms, biases of float layers, buffers, weights of 3 or more dimensions, whose convolution
  arguments are not in the checkpoint) is copied unchanged.

When the folder also holds a Hugging Face ``config.json``, :class:`HFLayout` supplies what the names cannot: the
names the rebuilt model uses (a wrapper's prefix such as ``encoder.``, a base-model prefix such as ``bert.``),
exact layer arguments (an embedding's ``padding_idx``; Hugging Face ``Conv1D`` layers stored ``(in, out)``) and
tied parameters. It builds the model on the ``meta`` device, which allocates no memory. The output then
records that folder as its ``source``, so :func:`dfquant.io.load.load_quantized` rebuilds the model from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfquant.config import LayerRule, QuantConfig
from dfquant.errors import ConfigError, ModelError
from dfquant.nn.base import QUANT_MODULES, layer_kind
from dfquant.pipeline.plan import LayerPlan, split_sparsity
from dfquant.stream.shards import Checkpoint
from dfquant.zoo.hf import build_hf, config_dict, guess_kind, import_transformers, sentence_layout

__all__ = ["HFLayout", "Plan", "TensorTask", "plan_checkpoint"]

_FLOATS = ("F64", "F32", "F16", "BF16")
_EMBED = re.compile(r"(embed_tokens|embeddings?|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe)$")
TYPE_NAMES = {"linear": "Linear", "embedding": "Embedding", "hf-conv1d": "Conv1D"}
ST_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass(frozen=True)
class TensorTask:
    """What to do with one input tensor.

    Attributes:
        key: the name in the input. out: the name in the output (layer ``out[:-7]`` for a weight).
        role: ``"weight"`` (quantized), ``"bias"`` (a quantized layer's bias, cast to ``dtype``) or ``"copy"``.
        layer, kind, args, rule: for a weight: the layer name, its type, constructor arguments and rule.
        dtype: the layer's dtype name (weights and biases).
        sparsity: the layer's residual-expansion sparsity after the split across layers.
    """

    key: str
    out: str
    role: str
    layer: str = ""
    kind: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    rule: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    sparsity: float = 0.0


@dataclass
class Plan:
    """The tasks of every shard, plus what the output's manifest needs beyond them."""

    tasks: dict[str, list[TensorTask]]
    source: dict[str, Any]
    layers: list[str]
    has_bias: dict[str, bool]
    ties: dict[str, str]
    skipped: list[dict[str, Any]]
    dropped: list[str]
    notes: list[str]


class HFLayout:
    """Names, layer arguments and ties of the model a Hugging Face folder describes, from a ``meta`` model.

    Args:
        folder: a folder with ``config.json`` (and optionally the sentence-transformers files).

    Raises:
        ModelError: ``transformers`` missing, or a config it cannot build.
    """

    def __init__(self, folder: Path) -> None:

        tf = import_transformers(f"streaming '{folder}'")
        layout = sentence_layout(folder)
        try:
            config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the config of '{folder}': {e}") from None
        kind = guess_kind(config, layout)
        arch: dict[str, Any] = {"config": config_dict(config), "kind": kind}
        if kind == "sentence-encoder":
            arch.update(layout or {}, add_pooling_layer=False)
        self.source: dict[str, Any] = {"zoo": "hf", "path": str(folder), "arch": arch}
        try:
            with torch.device("meta"):
                self.model: nn.Module = build_hf(self.source)
        except Exception as e:  # a config transformers cannot instantiate
            raise ModelError(f"cannot build the model that '{folder}/config.json' describes: {e}") from None
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self.shapes = {k: tuple(v.shape) for k, v in self.model.state_dict(keep_vars=True).items()}
        first: dict[int, str] = {}
        self.tied: dict[str, str] = {}
        for k, p in params.items():
            if id(p) in first:
                self.tied[k] = first[id(p)]
            else:
                first[id(p)] = k
        self.base_prefix = str(getattr(self.model, "base_model_prefix", "") or "")
        inner = getattr(self.model, "encoder", None) if kind == "sentence-encoder" else self.model
        self.inner_base = str(getattr(inner, "base_model_prefix", "") or "")

    def map_names(self, keys: list[str]) -> tuple[dict[str, str], list[str]]:
        """``{checkpoint key: model key}`` and the keys the model does not have.

        A key maps to the model key equal to it, or ending in ``"." + key`` (a wrapper's prefix) after an
        optional base-model prefix is stripped; the prefix must be the same for every key.

        Raises:
            ModelError: a key that maps ambiguously, or keys mapped with different prefixes.
        """
        model_keys = set(self.shapes)
        mapping: dict[str, str] = {}
        dropped: list[str] = []
        prefixes: set[str] = set()
        base = f"{self.inner_base}." if self.inner_base else ""
        for key in keys:
            cands = [key, key[len(base) :]] if base and key.startswith(base) else [key]
            hit = None
            for c in cands:
                if c in model_keys:
                    hit = c
                    break
                ends = [m for m in model_keys if m.endswith("." + c)]
                if len(ends) > 1:
                    raise ModelError(f"tensor '{key}' matches several parameters of the model: {sorted(ends)[:4]}")
                if ends:
                    hit = ends[0]
                    prefixes.add(hit[: -len(c)])
                    break
            if hit is None:
                dropped.append(key)
            else:
                mapping[key] = hit
        if len(prefixes) > 1:
            raise ModelError(f"checkpoint names map to the model with different prefixes {sorted(prefixes)}")
        return mapping, dropped

    def layer(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """The kind and constructor arguments of the layer ``name`` of the model (None if not quantizable)."""
        try:
            m = self.model.get_submodule(name)
        except AttributeError:
            return None, {}
        kind = layer_kind(m)
        if kind is None or kind not in ("linear", "embedding", "hf-conv1d"):
            return None, {}
        return kind, QUANT_MODULES[kind].args_of(m)


def _name_kind(layer: str, shape: tuple[int, ...]) -> tuple[str | None, dict[str, Any]]:
    last = layer.rsplit(".", 1)[-1]
    if _EMBED.search(last):
        return "embedding", {"num_embeddings": shape[0], "embedding_dim": shape[1], "padding_idx": None}
    return "linear", {"in_features": shape[1], "out_features": shape[0]}


def _check_rule(layer: str, kind: str, shape: tuple[int, ...], rule: LayerRule) -> None:
    oriented = (shape[1], shape[0]) if kind == "hf-conv1d" else shape
    where = f"layer '{layer}' ({TYPE_NAMES[kind]} {'x'.join(map(str, shape))})"
    rule.check_layer(oriented, where)


def plan_checkpoint(ckpt: Checkpoint, config: QuantConfig, layout: HFLayout | None = None) -> Plan:
    """Classify every tensor of ``ckpt`` (see the module docstring) and validate each layer's rule.

    Raises:
        ConfigError: a rule that does not fit a layer (naming it), before any tensor is read.
        ModelError: checkpoint names that do not fit the model ``layout`` describes.
    """
    entries = ckpt.entries()
    if layout is not None:
        names, dropped = layout.map_names(list(entries))
        source = layout.source
    else:
        names, dropped = {k: k for k in entries}, []
        source = {"zoo": "safetensors", "path": str(ckpt.folder)}
    outs = {v: k for k, v in names.items()}
    weights: dict[str, tuple[str, dict[str, Any], str]] = {}
    skipped: list[dict[str, Any]] = []
    notes: list[str] = []
    for key, (dt, shape, _) in entries.items():
        out = names.get(key)
        if out is None or not out.endswith(".weight") or dt not in _FLOATS or len(shape) < 2:
            continue
        layer = out[: -len(".weight")]
        if len(shape) > 2:
            skipped.append({"name": layer, "shape": list(shape), "reason": "convolution arguments unknown; kept float"})
            continue
        kind, args = layout.layer(layer) if layout is not None else _name_kind(layer, shape)
        if kind is None:
            continue
        rule = config.rule_for(layer)
        if rule.skip:
            skipped.append({"name": layer, "shape": list(shape), "reason": rule.reason or "skipped by rule"})
            continue
        _check_rule(layer, kind, shape, rule)
        weights[layer] = (kind, args, dt)
    if config.strict and skipped:
        raise ConfigError(f"strict mode: {len(skipped)} layer(s) left in float: {[s['name'] for s in skipped][:10]}")

    plans = []
    for layer, (kind, _, _dt) in weights.items():
        shape = entries[outs[f"{layer}.weight"]][1]
        plans.append(LayerPlan(layer, kind, TYPE_NAMES[kind], shape, config.rule_for(layer), None, None))
    sparsity = split_sparsity([p for p in plans], config.sparsity_split) if plans else {}
    tasks: dict[str, list[TensorTask]] = {s.name: [] for s in ckpt.shards}
    has_bias = dict.fromkeys(weights, False)
    for s in ckpt.shards:
        for key in s.tensors:
            out = names.get(key)
            if out is None:
                continue
            head, _, tail = out.rpartition(".")
            if tail == "weight" and head in weights:
                kind, args, dt = weights[head]
                rule_d = config.rule_for(head).to_dict()
                tasks[s.name].append(
                    TensorTask(key, out, "weight", head, kind, args, rule_d, dt, sparsity.get(head, 0.0))
                )
            elif tail == "bias" and head in weights:
                has_bias[head] = True
                tasks[s.name].append(TensorTask(key, out, "bias", head, dtype=weights[head][2]))
            else:
                tasks[s.name].append(TensorTask(key, out, "copy"))
    ties: dict[str, str] = {}
    if layout is not None:
        for k, target in layout.tied.items():
            if k not in outs and target in outs:
                ties[k] = target
        missing = sorted(set(layout.shapes) - set(outs) - set(ties))
        if missing:
            raise ModelError(f"the checkpoint lacks tensors of the model its config.json describes: {missing[:5]}")
        if dropped:
            notes.append(f"{len(dropped)} tensor(s) the model does not use were left out: {dropped[:5]}")
    for k, target in ties.items():
        head, tail = k.rpartition(".")[0], k.rpartition(".")[2]
        thead = target.rpartition(".")[0]
        same = (
            layout is not None and layout.layer(head)[0] is not None and config.rule_for(head) == config.rule_for(thead)
        )
        if thead in weights and tail == "weight" and not same:
            raise ConfigError(
                f"layer '{head}' shares its weight with '{thead}'; streaming needs both quantized with one rule"
            )
    return Plan(tasks, source, list(weights), has_bias, ties, skipped, dropped, notes)
