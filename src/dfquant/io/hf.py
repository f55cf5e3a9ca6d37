"""Hugging Face folders: a quantized ``transformers`` model written so that ``from_pretrained`` loads it.

:func:`save_hf` writes, into a folder, what ``AutoModel...from_pretrained(folder)`` reads:

* ``config.json``: the source model's configuration plus ``quantization_config``::

      {"quant_method": "dfquant", "format_version": 4, "library_version": "0.1.0",
       "layers": {"encoder.layer.0.attention.self.query": {...layer metadata of the file format...}, ...}}

  each layer's entry is the one of a dfquant file's manifest (:mod:`dfquant.io.manifest`: type, module
  arguments, weight shape, dtype, terms, rotation, ...), keyed by its name inside the ``transformers`` model;
* the tokenizer's files, when a tokenizer is given;
* ``model.safetensors``: the state dict (float parameters, and the packed codes, scales and tables of the
  quantized layers under the same keys as in a dfquant file), or, past ``max_shard_bytes``, shards
  ``model-0000K-of-0000N.safetensors`` and ``model.safetensors.index.json`` (``metadata.total_size`` and
  ``weight_map``), as ``transformers`` shards its own checkpoints. Tensors tied to another key are stored once;
  ``transformers`` ties them again from the configuration. A quantized output head (whose float weight was tied
  to the token embedding) is written untied (``tie_word_embeddings: false``), with its own tensors.

The folder is written next to its destination and renamed into place: an interrupted save leaves no folder.
Loading it needs dfquant's quantizer registered with ``transformers`` (:mod:`dfquant.io.hf_quantizer`, which
``import dfquant`` arranges).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dfquant.config import parse_device
from dfquant.errors import ConfigError, FileFormatError, InputError
from dfquant.io.manifest import FORMAT_VERSION, READ_VERSIONS, ST_DTYPES, library_version, read_header
from dfquant.nn.base import QuantModule

__all__ = [
    "HF_QUANT_METHOD",
    "MAX_SHARD_BYTES",
    "arrange_registration",
    "hf_model_of",
    "hf_quantization_config",
    "is_hf_folder",
    "load_hf",
    "read_hf_config",
    "save_hf",
]

#: The ``quant_method`` of dfquant's ``quantization_config``.
HF_QUANT_METHOD = "dfquant"
#: Shard size past which the weights are split (as ``transformers``' default ``max_shard_size``, 5 GB).
MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"


def hf_model_of(model: nn.Module) -> tuple[str, Any]:
    """The ``transformers`` model inside ``model`` (``model`` itself, or a submodule such as a sentence encoder's
    ``encoder``) and its qualified name (``""`` for ``model`` itself).

    Raises:
        InputError: no ``transformers.PreTrainedModel`` in ``model``.
    """
    for name, m in model.named_modules():
        if hasattr(m, "config") and hasattr(m, "save_pretrained") and hasattr(m.config, "to_dict"):
            return name, m
    raise InputError(f"{type(model).__name__} holds no transformers model: --format hf writes Hugging Face models only")


def hf_quantization_config(
    hf_model: nn.Module, source: Mapping[str, Any] | None = None, prefix: str = ""
) -> dict[str, Any]:
    """The ``quantization_config`` entry of a quantized ``transformers`` model (see the module docstring).

    Raises:
        InputError: a model without quantized layers.
    """
    layers = {n: m.layer_meta() for n, m in hf_model.named_modules() if isinstance(m, QuantModule)}
    if not layers:
        raise InputError("the model has no quantized layer: quantize it before writing a Hugging Face folder")
    out: dict[str, Any] = {
        "quant_method": HF_QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "layers": layers,
    }
    if source is not None:  # how dfquant builds the float model again (dfquant eval), and where this model sits in it
        out["source"] = dict(source)
        out["prefix"] = prefix
    return out


def _tensors(hf_model: nn.Module, dedupe: bool = True) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors; with ``dedupe`` each tensor stored once (keys tied to an earlier
    one left out: ``transformers`` ties them again), else every key."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, t in hf_model.state_dict().items():
        if t.dtype not in ST_DTYPES:
            raise InputError(f"tensor '{key}' has dtype {t.dtype}, which safetensors files here do not store")
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if dedupe and t.numel() and view in seen:
            continue
        seen.add(view)
        out[key] = t.detach().to("cpu").contiguous().clone()
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in key order cut into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def save_hf(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    source: Mapping[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the quantized ``transformers`` model inside ``model`` as a Hugging Face folder ``out``.

    Args:
        model: a quantized model (:func:`dfquant.quantize_model`) that is, or holds, a ``transformers`` model.
        out: the folder to create (an existing folder is replaced only once the new one is complete).
        tokenizer: its tokenizer (``save_pretrained`` into the folder), or None.
        source: the float model's dfquant source (``LoadedModel.source``), kept in ``quantization_config`` so that
            ``dfquant eval FOLDER`` can build the float reference.
        max_shard_bytes: shard the weights past this size.

    Returns:
        The folder.

    Raises:
        InputError: no ``transformers`` model or no quantized layer inside ``model``.
        ConfigError: ``max_shard_bytes`` below 1, or an output path whose parent folder does not exist.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    dest = Path(out)
    if not dest.parent.is_dir():
        raise ConfigError(f"output folder '{dest.parent}' does not exist")
    prefix, hf_model = hf_model_of(model)
    config = dict(hf_model.config.to_dict())  # a transformers PretrainedConfig
    config["quantization_config"] = hf_quantization_config(hf_model, source, prefix)
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    untie = bool(config.get("tie_word_embeddings")) and isinstance(head, QuantModule)
    if untie:  # transformers ties float weights only: a quantized head keeps its own tensors
        config["tie_word_embeddings"] = False
    shards = _shards(_tensors(hf_model, dedupe=not untie), max_shard_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            total = 0
            for i, part in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(part, str(tmp / name), metadata={"format": "pt"})
                for key, t in part.items():
                    weight_map[key] = name
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a quantized Hugging Face folder: its ``config.json`` has a ``quantization_config`` (or
    cannot be read, so that :func:`read_hf_config` says why). A dfquant streaming output, whose ``config.json`` is
    the source's, is not one."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "quantization_config" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return True


def read_hf_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a dfquant Hugging Face folder, after checking the folder: a dfquant
    ``quantization_config`` of a version this library reads, and every weight file it needs present and whole
    (each safetensors header read and its size checked against the tensors it lists).

    Raises:
        FileFormatError: no or unreadable ``config.json``, another or no ``quant_method``, a newer format, a
            missing weight file or index entry, or a truncated shard.
    """
    p = Path(folder)
    cfg_path = p / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FileFormatError(f"'{p.name}': cannot read config.json ({e.strerror or e})") from None
    except ValueError as e:
        raise FileFormatError(f"'{p.name}': config.json is not valid JSON ({str(e)[:200]})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != HF_QUANT_METHOD:
        got = qc.get("quant_method") if isinstance(qc, dict) else None
        raise FileFormatError(f"'{p.name}': config.json has no dfquant quantization_config (quant_method {got!r})")
    version = qc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in READ_VERSIONS:
        raise FileFormatError(
            f"'{p.name}': folder format version {version!r} is newer than this dfquant ({library_version()}) reads "
            f"(version {FORMAT_VERSION}); upgrade dfquant"
        )
    index = p / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FileFormatError(f"'{p.name}': unreadable {INDEX_FILE} ({str(e)[:200]})") from None
    else:
        files = ["model.safetensors"]
    for name in files:
        f = p / name
        if not f.is_file():
            raise FileFormatError(f"'{p.name}': weight file '{name}' is missing (truncated folder)")
        read_header(f)  # checks the size against the header's tensors: a truncated shard fails here
    return config


def load_hf(folder: str | os.PathLike[str], *, device: str | torch.device | None = None) -> nn.Module:
    """Load a dfquant Hugging Face folder with ``transformers`` (the class named in ``architectures``), after
    :func:`read_hf_config`'s checks; the model is in eval mode on ``device`` (None: the CPU).

    Raises:
        FileFormatError: as :func:`read_hf_config`, or a class ``transformers`` does not have.
        ConfigError: a device this machine does not have.
    """
    dev = None if device is None else parse_device(device)
    config = read_hf_config(folder)
    import transformers  # the hf extra; imported only to load a folder

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, str(arch), None) if arch else None
    if cls is None:
        raise FileFormatError(f"'{Path(folder).name}': config.json names no transformers class ({arch!r})")
    _register_now()
    model = cls.from_pretrained(str(folder))
    return (model if dev is None else model.to(dev)).eval()


#: The ``transformers`` module whose import triggers the registration.
_HOOK_MODULE = "transformers.quantizers.auto"


def _register_now() -> None:
    try:
        from dfquant.io.hf_quantizer import register  # imports transformers: only once it is imported anyway

        register()
    except Exception as e:  # never break the user's import of transformers
        warnings.warn(f"dfquant could not register its transformers quantizer: {e}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers dfquant's quantizer right after ``transformers.quantizers.auto`` is executed."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _HOOK_MODULE:
            return None
        sys.meta_path.remove(self)  # the real spec, from the other finders; this hook fires once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register_now()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def arrange_registration() -> None:
    """Register dfquant's quantizer with ``transformers`` now if it is imported, else once it is."""
    if _HOOK_MODULE in sys.modules:
        _register_now()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(f, _RegisterAfterImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
