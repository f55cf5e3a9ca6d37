"""Saving a quantized model: its state dict and manifest in one ``.safetensors`` file (the schema:
:mod:`dfquant.io.manifest`), written atomically (:mod:`dfquant.io.atomic`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dfquant.errors import InputError
from dfquant.graph.modules import FoldedBatchNorm
from dfquant.io.atomic import replace_atomic
from dfquant.io.manifest import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, ST_DTYPES, library_version
from dfquant.nn.base import QuantModule
from dfquant.pipeline.report import QuantizationReport


def _collect_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as contiguous CPU tensors; keys that hold the very same tensor view as an earlier key
    (tied weights) are recorded as aliases instead of being stored twice."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"state-dict entry '{key}' is a {type(t).__name__}, not a tensor; cannot be saved")
        if t.dtype not in ST_DTYPES:
            raise InputError(f"tensor '{key}' has dtype {t.dtype}, which the file format does not store")
        view = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if t.numel() and view in views:
            aliases[key] = views[view]
            continue
        views[view] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    seen: set[int] = set()  # safetensors refuses tensors that share memory: copy any that still do
    for key, t in tensors.items():
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = tensors[key] = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
    return tensors, aliases


def build_manifest(
    model: nn.Module, source: Mapping[str, Any], report: QuantizationReport | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the tensors :func:`save_quantized` writes (see the module docstring for the schema).

    Raises:
        InputError: a ``source`` or quantizer option that is not JSON, or a tensor dtype the format cannot
            hold.
    """
    if not isinstance(source, Mapping):
        raise InputError(f"source must be a dict describing how to build the model, got {type(source).__name__}")
    layers: dict[str, Any] = {}
    folded: list[dict[str, str]] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantModule):
            layers[name] = m.layer_meta()
        elif isinstance(m, FoldedBatchNorm):
            folded.append({"layer": m.layer, "bn": name})
    tensors, aliases = _collect_tensors(model)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "source": dict(source),
        "layers": layers,
        "folded_bn": folded,
        "tensors": {k: {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape)} for k, t in tensors.items()},
        "aliases": aliases,
    }
    if report is not None:
        manifest["report"] = report.to_dict()
    return manifest, tensors


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    source: Mapping[str, Any],
    report: QuantizationReport | None = None,
) -> Path:
    """Write a quantized model to one ``.safetensors`` file, atomically.

    Args:
        model: a model returned by :func:`dfquant.quantize_model` (or loaded by :func:`load_quantized`).
        path: destination file; its folder must exist.
        source: JSON-ready dict that the loader's ``build`` turns back into the float skeleton (the model zoo
            fills it, e.g. ``{"zoo": "cifar-resnet20"}``).
        report: the quantization report, stored in the manifest when given.

    Returns:
        The path written.

    Raises:
        InputError: a ``source``/option that is not JSON, or a tensor the format cannot hold.
        FileFormatError: the file cannot be written.
    """
    dest = Path(path)
    manifest, tensors = build_manifest(model, source, report)
    try:
        text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise InputError(f"the manifest is not plain JSON (check source and quantizer options): {e}") from None
    replace_atomic(dest, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))
    return dest
