"""Loading a quantized model: the header and manifest are read and checked first (:mod:`dfquant.io.manifest`),
then the float skeleton is built from the recorded source, folded BatchNorms and quantized layers installed,
and every tensor loaded strictly. Nothing is unpickled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfquant.config import parse_device
from dfquant.errors import ConfigError, InputError, ModelError
from dfquant.graph.modules import FoldedBatchNorm, get_module, module_names, replace_module
from dfquant.io.manifest import (
    Builder,
    check_manifest,
    check_tensors,
    fail,
    is_own_key,
    layer_prefix,
    read_folder,
    read_header,
    read_tensors,
)
from dfquant.nn.base import QuantModule, layer_kind, oriented_weight
from dfquant.nn.terms import QuantTerm
from dfquant.zoo import build_architecture


def build_quant_layers(
    path: Path, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], cache_weight: bool
) -> dict[str, QuantModule]:
    out = {}
    terms_by_buffers: dict[tuple[tuple[str, int], ...], QuantTerm] = {}
    for name, layer in manifest["layers"].items():
        where = f"layer '{name or '<root>'}'"
        try:
            mod = QuantModule.from_meta(layer, cache_weight=cache_weight)
        except (ConfigError, InputError) as e:
            raise fail(path, f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise fail(path, f"{where}: malformed metadata ({e})") from None
        p = layer_prefix(name)
        own = {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p) and is_own_key(k[len(p) :])}
        try:
            mod.load_state_dict(own, strict=True, assign=True)
            for term in mod.quant_terms:
                term.validate(mod.weight_shape)
            if mod.outliers is not None:
                mod.outliers.validate()
            if mod.balance is not None:
                mod.balance.validate(math.prod(mod.weight_shape[1:]))
            if mod.input_quant is not None:
                mod.input_quant.validate()
        except (RuntimeError, InputError) as e:
            raise fail(path, f"{where}: {str(e).splitlines()[0]}") from None
        for i, term in enumerate(mod.quant_terms):  # tied layers: share the very same term modules again
            ident = tuple(sorted((k, id(b)) for k, b in term.named_buffers(recurse=False)))
            first = terms_by_buffers.setdefault(ident, term)
            if first is not term and first.meta() == term.meta():
                mod.terms[i] = first
        out[name] = mod
    return out


def load_quantized(
    path: str | os.PathLike[str],
    build: Builder | None = None,
    *,
    cache_weight: bool = False,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a file written by :func:`save_quantized`.

    Args:
        path: the ``.safetensors`` file, or a sharded output folder of :mod:`dfquant.stream`.
        build: makes the float skeleton from ``manifest["source"]``; default
            :func:`dfquant.zoo.build_architecture` (the model zoo).
        cache_weight: passed to the quantized layers (see :mod:`dfquant.nn.layers`). Default False: a loaded model
            keeps only its packed codes, scales and tables (about 14 % of the float32 weight memory at 4 bits in
            groups of 64) and decodes the weights each forward uses; True keeps each dequantized weight after its
            first use, for float speed at the float model's memory and more.
        device: where the model goes once loaded (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see
            :func:`dfquant.config.parse_device`); None: the CPU. The codes, scales and tables are the file's
            bit for bit on any device.

    Returns:
        ``(model, manifest)``; the model is in eval mode and computes exactly what the saved one did.

    Raises:
        FileFormatError: unreadable, truncated or foreign file, newer format, unknown quantizer or layer type,
            tensors that do not match the manifest, or a skeleton that does not match the file.
        ModelError: ``build`` cannot build the model named in the source.
        ConfigError: a device this machine does not have.
    """
    dev = None if device is None else parse_device(device)  # checked before the file is read
    p = Path(path)
    if p.is_dir():  # a sharded folder written by dfquant.stream: the same checks over its index and shards
        manifest, tensors = read_folder(p)
    else:
        header, size = read_header(p)
        manifest = check_manifest(p, header)
        check_tensors(p, header, manifest)
        tensors = read_tensors(p, size)
    for alias, target in manifest["aliases"].items():
        tensors[alias] = tensors[target]
    qlayers = build_quant_layers(p, manifest, tensors, cache_weight)

    if build is None:
        build = build_architecture
    model = build(dict(manifest["source"]))
    if not isinstance(model, nn.Module):
        raise ModelError(f"build(source) returned a {type(model).__name__}, not an nn.Module")

    def module_at(name: str, what: str) -> nn.Module:
        try:
            return get_module(model, name)
        except ModelError:
            raise fail(p, f"the model built from source {manifest['source']} has no {what} '{name}'") from None

    for fb in manifest["folded_bn"]:
        bn = module_at(fb["bn"], "BatchNorm")
        if not isinstance(bn, (nn.modules.batchnorm._BatchNorm, FoldedBatchNorm)):
            raise fail(p, f"'{fb['bn']}' is a {type(bn).__name__} in the built model, not a BatchNorm")
        model = replace_module(model, fb["bn"], FoldedBatchNorm(fb["layer"]))
        layer = module_at(fb["layer"], "layer")
        if fb["layer"] not in qlayers and getattr(layer, "bias", 0) is None:
            w = oriented_weight(layer)
            bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype), requires_grad=w.requires_grad)
            layer.register_parameter("bias", bias)
    names = module_names(model)
    for name, qmod in qlayers.items():
        float_layer = module_at(name, "layer")
        if not qmod.matches_float(float_layer):
            built = type(float_layer).__name__
            if layer_kind(float_layer) == qmod.layer_type:
                built += f" with {type(qmod).args_of(float_layer)}"
            raise fail(
                p,
                f"layer '{name or '<root>'}' is a {built} in the model built from source "
                f"{manifest['source']}, but the file holds a {qmod.layer_type} with {qmod.module_args()}",
            )
        for alias in names.get(id(float_layer), [name]):
            model = replace_module(model, alias, qmod)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        raise fail(
            p,
            f"the file's tensors do not match the model built from source {manifest['source']}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, shape differs {wrong[:5]}"
            + (" (more not shown)" if max(len(missing), len(unexpected), len(wrong)) > 5 else ""),
        )
    # Float tensors are copied into the skeleton's own tensors (keeping ties between modules); where the
    # skeleton was built in another dtype it takes the file's, so that the values are the saved ones exactly.
    for key, t in expected.items():
        if t.dtype != tensors[key].dtype:
            t.data = t.data.to(tensors[key].dtype)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise fail(p, f"loading the tensors failed: {str(e).splitlines()[0]}") from None
    if dev is not None:
        model = model.to(dev)
    return model.eval(), manifest
