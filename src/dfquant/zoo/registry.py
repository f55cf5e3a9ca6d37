"""The model zoo's registry: a name -> loader table, and the record of a loaded model.

A loader is a function ``(**kwargs) -> LoadedModel`` registered with :func:`register_model`. Every loaded
model carries a ``source``: a JSON-able dict naming the zoo entry (``source["zoo"]``) and what it needs to
load the float model again (paths, options); an optional ``source["arch"]`` holds what is needed to build the
float skeleton without the weights (an architecture config). Files written by dfquant store this dict, and
:func:`build_architecture` / :func:`load_from_source` turn it back into a module. Names in a ``source`` are
resolved only through this table; no class path or callable named in a file is ever imported.

Example:
    >>> from dfquant.zoo import build_architecture
    >>> net = build_architecture({"zoo": "cifar-resnet20"})
    >>> sum(p.numel() for p in net.parameters())
    269722
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from dfquant.errors import ModelError

__all__ = [
    "LoadedModel",
    "ZooEntry",
    "available_models",
    "build_architecture",
    "load_from_source",
    "load_model",
    "register_model",
]

TASKS = ("cifar10", "stsb", "wikitext2", "fidelity", "pairs")
#: File suffixes that mark an argument as a path rather than a zoo name.
_SUFFIXES = (".safetensors", ".gguf", ".th", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class LoadedModel:
    """A float model ready to quantize and evaluate.

    Attributes:
        model: the float model, in eval mode, float32 parameters.
        name: a short display name (the zoo name, or the file or folder name).
        source: JSON-able dict that :func:`load_from_source` and :func:`build_architecture` accept.
        task: the default evaluation task (``"cifar10"``, ``"stsb"``, ``"wikitext2"`` or ``"fidelity"``).
        kind: what the forward computes: ``"image-classifier"`` (images -> logits), ``"sentence-encoder"``
            (token ids, attention mask -> one embedding per sequence), ``"causal-lm"`` (token ids ->
            next-token logits), ``"encoder"`` (token ids -> hidden states) or ``"module"`` (unknown).
        tokenizer: the text tokenizer (a Hugging Face tokenizer) for text models, else None.
        input_shape: one input's shape without the batch dimension, for image models (``(3, 32, 32)``).
        vocab_size: the vocabulary size, for text models.
        notes: facts a user should know about the weights (for example that they were already quantized).
    """

    model: nn.Module
    name: str
    source: dict[str, Any]
    task: str = "fidelity"
    kind: str = "module"
    tokenizer: Any = None
    input_shape: tuple[int, ...] | None = None
    vocab_size: int | None = None
    notes: list[str] = field(default_factory=list)


Loader = Callable[..., LoadedModel]
Builder = Callable[..., nn.Module]
F = TypeVar("F", bound=Loader)


@dataclass(frozen=True)
class ZooEntry:
    """One registered zoo name: how to load it, and how to build its skeleton from a ``source`` dict."""

    name: str
    load: Loader
    build: Builder | None
    description: str


_REGISTRY: dict[str, ZooEntry] = {}


def register_model(name: str, *, build: Builder | None = None, description: str = "") -> Callable[[F], F]:
    """Decorator: register a loader under ``name``.

    Args:
        name: the zoo name users type (``load_model(name)``, ``dfquant quantize NAME``).
        build: optional ``build(source, **kwargs) -> nn.Module`` building the float skeleton (random or empty
            weights) from a ``source`` dict this loader wrote; used to rebuild a model from a saved file.
        description: one line for listings.

    Returns:
        The decorator; it returns the loader unchanged.

    Raises:
        ModelError: when ``name`` is already registered to another loader.
    """

    def deco(fn: F) -> F:
        old = _REGISTRY.get(name)
        if old is not None and old.load is not fn:
            raise ModelError(f"zoo name '{name}' is already registered (by {old.load!r})")
        _REGISTRY[name] = ZooEntry(name, fn, build, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def available_models() -> dict[str, str]:
    """Registered zoo names with their one-line descriptions."""
    return {k: e.description for k, e in _REGISTRY.items()}


def _entry(name: str) -> ZooEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown model '{name}'; known names: {', '.join(_REGISTRY)}; or give a path to a Hugging Face "
            "folder, a .gguf file, or a .safetensors file with builder='module:callable'"
        ) from None


def _entry_for_path(p: Path) -> str:
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        raise ModelError(f"folder '{p}' has no config.json: not a Hugging Face model folder")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".gguf":
        return "gguf"
    if suffix in (".th", ".pt", ".pth", ".bin", ".ckpt"):
        raise ModelError(
            f"'{p}' is a bare checkpoint and does not say which architecture it holds; for a CIFAR ResNet "
            "use a zoo name with checkpoint=PATH (e.g. load_model('cifar-resnet20', checkpoint=...))"
        )
    raise ModelError(
        f"cannot tell what '{p}' holds from its name; allowed: a Hugging Face folder (with config.json), "
        "a .gguf file, or a .safetensors file with builder='module:callable'"
    )


def load_model(name_or_path: str | Path, **kwargs: Any) -> LoadedModel:
    """Load a float model by zoo name or from a local path.

    A registered name (see :func:`available_models`) calls its loader with ``kwargs``. Otherwise the argument
    is a path: a folder with ``config.json`` is loaded as a Hugging Face model, a ``.gguf`` file as a
    LLaMA-family GGUF model (dequantized), and a ``.safetensors`` state dict needs
    ``builder="module:callable"`` (see :func:`dfquant.zoo.safetensors_builder.load_safetensors` for what that
    trusts).

    Args:
        name_or_path: a zoo name such as ``"cifar-resnet20"``, ``"minilm"``, ``"smollm2-135m"``, or a path.
        **kwargs: options of that loader (``checkpoint=PATH`` for CIFAR ResNets, ``builder=...`` for
            safetensors files).

    Returns:
        The loaded model with its source, default task and helpers.

    Raises:
        ModelError: unknown name, missing file, or a file that does not fit the architecture.
    """
    key = str(name_or_path)
    if not isinstance(name_or_path, Path) and key in _REGISTRY:
        return _REGISTRY[key].load(**kwargs)
    p = Path(key).expanduser()
    if not p.exists():
        if "/" in key or os.sep in key or p.suffix.lower() in _SUFFIXES:
            raise ModelError(f"no such file or folder: '{p}' (nor a zoo name; known: {', '.join(_REGISTRY)})")
        _entry(key)  # raises with the list of known names
    return _entry(_entry_for_path(p)).load(path=str(p), **kwargs)


def _check_source(source: Any) -> ZooEntry:
    if not isinstance(source, dict) or not isinstance(source.get("zoo"), str):
        raise ModelError(f"a model source must be a dict with a string 'zoo' entry, got {source!r}")
    return _entry(source["zoo"])


def build_architecture(source: dict[str, Any], **kwargs: Any) -> nn.Module:
    """Build the float skeleton (weights not loaded) described by ``source``, in eval mode.

    Args:
        source: a ``LoadedModel.source`` dict, as stored in a saved file.
        **kwargs: options of that entry's builder (for example ``builder="module:callable"``, which a
            ``.safetensors`` source needs because dfquant never imports code named in a file).

    Returns:
        The module, with the same parameter and buffer names as the loaded float model.

    Raises:
        ModelError: unknown zoo name, or a source that cannot be built without the original files.
    """
    entry = _check_source(source)
    if entry.build is None:
        raise ModelError(f"zoo model '{entry.name}' cannot be built without its weights; use load_from_source(source)")
    return entry.build(source, **kwargs).eval()


def load_from_source(source: dict[str, Any], **overrides: Any) -> LoadedModel:
    """Load the float model again from a ``source`` dict (original weights needed).

    The loader receives every key of ``source`` except ``zoo`` and ``arch``, updated with ``overrides``.

    Raises:
        ModelError: unknown zoo name, or the original weights are missing.
    """
    entry = _check_source(source)
    kwargs = {k: v for k, v in source.items() if k not in ("zoo", "arch")}
    kwargs.update(overrides)
    return entry.load(**kwargs)
