"""Saving and loading quantized models: one ``.safetensors`` file with a versioned JSON manifest.

The file holds every tensor of the quantized model's state dict: for each quantized layer its terms' packed
codes, scales, offsets, levels (and channel indices) plus its float bias, and every other tensor as it is
(float layers, BatchNorms, embeddings left float, ...). The safetensors header metadata holds one entry,
``"dfquant"``, a JSON manifest (:data:`FORMAT_VERSION` 3)::

    {
      "format": "dfquant",                  # always this
      "format_version": 4,
      "library_version": "0.1.0",
      "source": {"zoo": "cifar-resnet20"},  # how to build the float skeleton (the caller's dict)
      "layers": {                           # every quantized layer, by qualified name
        "conv1": {
          "type": "conv2d",                 # linear | conv1d | conv2d | hf-conv1d | embedding
          "module": {...},                  # the float layer's constructor arguments
          "weight_shape": [16, 3, 3, 3],    # oriented (out, in, *kernel); (out, in) also for hf-conv1d
          "dtype": "float32",               # dtype the weight is rebuilt in
          "bias": true,
          "terms": [{"quantizer": "minmax", "bits": 4, "grid": "int4-mr", "granularity": "channel",
                     "shape": [16, 3, 3, 3], "offset": false, "scale_dtype": "float32", "num_levels": 16,
                     "num_tables": null, "channels": null, "options": {}}]
        }
      },
      "folded_bn": [{"layer": "conv1", "bn": "bn1"}],
      "tensors": {"conv1.terms.0.packed": {"dtype": "U8", "shape": [216]}, ...},   # every tensor in the file
      "aliases": {"lm_head.terms.0.packed": "embed.terms.0.packed"},  # keys sharing another key's tensor
      "report": {...}                       # optional: QuantizationReport.to_dict()
    }

Term ``i`` of layer ``NAME`` is stored as (``rows, groups`` from the shape and granularity, see
:func:`dfquant.nn.terms.term_layout`):

* ``NAME.terms.i.packed``: U8 ``[ceil(numel * bits / 8)]``, the codes in row layout, little-endian bit stream
  (:func:`dfquant.quantizers.packing.pack`);
* ``NAME.terms.i.scale``: ``[rows, groups]`` in the term's ``scale_dtype`` (F32, F16 or BF16);
  ``NAME.terms.i.offset``: the same, when ``offset`` is true;
* ``NAME.terms.i.levels``: F32 ``[num_levels]`` shared, or ``[num_tables, num_levels]`` stacked tables with
  ``NAME.terms.i.table_index`` naming each group's table: U8, ``rows * groups`` indices packed at
  ``max(1, ceil(log2 num_tables))`` bits, or I32 ``[rows, groups]`` when that exceeds 8 bits;
* ``NAME.terms.i.channels``: I64 ``[channels]``, the output channels a channel-subset term covers;

and the layer's float bias as ``NAME.bias`` (``[out]``, the layer's dtype; an ``embedding`` has none). A value
decodes as ``levels[table][code] * scale + offset`` computed in float32 (the stored scale and offset converted
exactly); a layer's weight is the float32 sum of its terms, cast to ``dtype``. An ``embedding`` layer's weight
is its ``(num_embeddings, embedding_dim)`` table, rows = tokens. A layer with the optional entry
``"rotation": {"kind": "hadamard", "block": B, "seed": S}`` holds terms fitted to ``W R^T``: its weight is that
sum times ``R`` along the flattened fan-in, computed in float32 as :class:`dfquant.methods.rotate.Rotation`
defines it (element-wise butterflies, then the signs drawn from ``S`` by torch's CPU generator). A layer with
``"balance": true`` (format version 4) stores its column scale as ``NAME.balance.scale``, F16 ``[fan_in]``
(``fan_in`` the product of ``weight_shape[1:]``), finite and positive; its weight is the sum above (rotated if
the layer rotates) times that scale along the flattened fan-in, in float32
(:mod:`dfquant.methods.balance`).

Tied weights: layers that share quantized terms (an output head tied to the token embedding) list their terms
in full, and their term tensors are stored once, under the first layer's keys; ``aliases`` maps the other
layer's keys to them. Loading gives the layers the very same term modules again.

Versions: 1 (dfquant 0.1.0) had float32 scales and offsets only, no ``scale_dtype`` term key and no
``embedding`` layers. 2 adds the three (term metadata must then carry ``scale_dtype``). 3 adds the optional
layer ``rotation``, 4 the optional layer ``balance``. Files of versions 1, 2 and 3 are still read (version 1's
scales and offsets are float32); a
version newer than :data:`FORMAT_VERSION` is refused with an error naming both versions.

Loading (:func:`load_quantized`) reads and checks the header and the manifest first: the file's size and
tensor offsets, the format and its version (a newer version than this library reads is refused), every
tensor's dtype, shape and byte count against the manifest and against what each layer's terms need, and every
quantizer name against the registry (class paths are never read from a file, and nothing is unpickled). Only
then does it build the float skeleton with ``build(manifest["source"])``, apply the recorded structural
changes (folded BatchNorms become identities, the layers they were folded into get a bias), install the
quantized layers and load all tensors strictly. Any mismatch raises :class:`~dfquant.errors.FileFormatError`.

Files are written atomically: to a temporary file in the same folder, flushed to disk, then renamed over the
destination, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from dfquant._version import __version__
from dfquant.errors import ConfigError, FileFormatError
from dfquant.methods.rex_act import InputSpec
from dfquant.methods.rotate import Rotation
from dfquant.nn.act import ActQuant
from dfquant.nn.base import QUANT_MODULES
from dfquant.nn.rex import SparseTerm
from dfquant.nn.terms import DTYPES, QuantTerm
from dfquant.quantizers.registry import quantizer_class

FORMAT_NAME = "dfquant"
FORMAT_VERSION = 4
#: Versions this library reads.
READ_VERSIONS = (1, 2, 3, 4)
METADATA_KEY = "dfquant"
_MAX_HEADER = 100_000_000  # the safetensors limit

#: torch dtype <-> safetensors header dtype, with item sizes.
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e8m0fnu: "F8_E8M0",
}
ST_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
}
_MANIFEST_KEYS = {
    "format",
    "format_version",
    "library_version",
    "source",
    "layers",
    "folded_bn",
    "tensors",
    "aliases",
    "report",
}
_LAYER_KEYS = {"type", "module", "weight_shape", "dtype", "bias", "terms"}
#: Optional layer keys (dfquant.nn_rex): a sparse outlier residual, an input (activation) expansion.
_LAYER_OPTIONAL = {"outliers", "act"}
#: Optional layer key (dfquant.qat): the layer's input quantizer, tensors NAME.input_quant.scale / .levels.
_INPUT_QUANT = "input_quant"
#: Optional layer key from format version 3 (dfquant.methods.rotate): the rotation the terms were fitted in.
_ROTATION = "rotation"
#: Optional layer key from format version 4 (dfquant.methods.balance): ``true`` with a column scale tensor.
_BALANCE = "balance"
_LAYER_ALLOWED = _LAYER_KEYS | _LAYER_OPTIONAL | {_INPUT_QUANT, _ROTATION, _BALANCE}
_TERM_KEYS_V1 = {
    "quantizer",
    "bits",
    "grid",
    "granularity",
    "shape",
    "offset",
    "num_levels",
    "num_tables",
    "channels",
    "options",
}
#: Term metadata keys by format version.
_TERM_KEYS = {1: _TERM_KEYS_V1, **{v: _TERM_KEYS_V1 | {"scale_dtype"} for v in (2, 3, 4)}}

Builder = Callable[[dict[str, Any]], nn.Module]


# ------------------------------------------------------------------------------------------------------------
# Saving


def layer_prefix(name: str) -> str:
    return f"{name}." if name else ""


def library_version() -> str:

    return str(__version__)


# ------------------------------------------------------------------------------------------------------------
# Reading and checking


def fail(path: Path, msg: str) -> FileFormatError:
    return FileFormatError(f"'{path.name}': {msg}")


def _short(e: BaseException) -> str:
    return str(e)[:200]


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed safetensors header and the file size, after checking the size against the header's
    tensor offsets (contiguous, covering the data exactly)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 <= n <= min(_MAX_HEADER, size - 8) else b""
    except OSError as e:
        raise FileFormatError(f"cannot read '{path}': {e.strerror or e}") from None
    if n < 0:
        raise fail(path, f"{size} bytes is too short for a safetensors file")
    if n > _MAX_HEADER or 8 + n > size:
        raise fail(path, f"header length {n} does not fit a file of {size} bytes (truncated or not safetensors)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also bad UTF-8, numbers of > 4300 digits, too deep nesting
        raise fail(path, f"the safetensors header is not valid JSON ({_short(e)})") from None
    if not isinstance(header, dict):
        raise fail(path, "the safetensors header is not a JSON object")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dt, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = dt in ST_SIZES and all(isinstance(s, int) and s >= 0 for s in shape) and 0 <= start <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise fail(path, f"tensor '{key}' has a malformed header entry {entry!r}")
        if end - start != math.prod(shape) * ST_SIZES[dt]:
            raise fail(
                path,
                f"tensor '{key}' spans {end - start} bytes but {dt} {shape} needs {math.prod(shape) * ST_SIZES[dt]}",
            )
        spans.append((start, end, key))
    spans.sort()
    pos = 0
    for start, end, key in spans:
        if start != pos:
            raise fail(path, f"tensor '{key}' starts at byte {start} of the data, expected {pos}")
        pos = end
    have = size - 8 - n
    if pos != have:
        raise fail(path, f"the header describes {pos} bytes of tensor data but the file holds {have} (truncated?)")
    return header, size


def check_manifest(path: Path, header: Mapping[str, Any]) -> dict[str, Any]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise fail(path, "no dfquant manifest in the safetensors metadata: not a file written by dfquant")
    try:
        manifest = json.loads(meta[METADATA_KEY])
    except (TypeError, ValueError, RecursionError) as e:
        raise fail(path, f"the manifest is not valid JSON ({_short(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise fail(path, f"manifest format is {got!r}, expected '{FORMAT_NAME}'")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise fail(path, f"manifest format_version must be a positive integer, got {version!r}")
    if version not in READ_VERSIONS:
        raise fail(
            path,
            f"file format version {version} is newer than this dfquant ({library_version()}) reads "
            f"(version {FORMAT_VERSION}); upgrade dfquant",
        )
    unknown = sorted(set(manifest) - _MANIFEST_KEYS)
    missing = sorted(_MANIFEST_KEYS - {"report"} - set(manifest))
    if unknown or missing:
        raise fail(path, f"manifest keys: unknown {unknown}, missing {missing}")
    types = {
        "library_version": str,
        "source": dict,
        "layers": dict,
        "folded_bn": list,
        "tensors": dict,
        "aliases": dict,
    }
    for key, typ in types.items():
        if not isinstance(manifest[key], typ):
            raise fail(path, f"manifest '{key}' must be a {typ.__name__}, got {type(manifest[key]).__name__}")
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a dfquant file, after checking the file's structure, format and version.

    Raises:
        FileFormatError: unreadable, truncated or foreign file, or a newer format version.
    """
    p = Path(path)
    if p.is_dir():  # a sharded folder written by dfquant.stream
        return read_folder(p, load=False)[0]
    header, _ = read_header(p)
    return check_manifest(p, header)


def check_tensors(path: Path, header: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    """Every tensor in the file is in the manifest with the same dtype and shape, and vice versa; every
    quantized layer's term buffers and bias have the dtypes and shapes its metadata imply."""
    table = manifest["tensors"]
    in_file = {k for k in header if k != "__metadata__"}
    if set(table) != in_file:
        extra, lost = sorted(in_file - set(table))[:5], sorted(set(table) - in_file)[:5]
        raise fail(path, f"the file's tensors differ from the manifest: not listed {extra}, missing {lost}")
    for key in in_file:
        want = table[key]
        got = header[key]
        if not isinstance(want, dict) or want.get("dtype") != got["dtype"] or want.get("shape") != got["shape"]:
            raise fail(path, f"tensor '{key}' is {got['dtype']} {got['shape']} but the manifest says {want!r}")
    aliases = manifest["aliases"]
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in table or alias in table:
            raise fail(path, f"alias '{alias}' -> {target!r} does not name a tensor of the file")

    def entry(key: str) -> Any:  # the header entry of a key, through an alias
        return header.get(aliases.get(key, key))

    term_keys = _TERM_KEYS[manifest["format_version"]]
    for fb in manifest["folded_bn"]:
        if not isinstance(fb, dict) or set(fb) != {"layer", "bn"} or not all(isinstance(v, str) for v in fb.values()):
            raise fail(path, f"folded_bn entries must be {{'layer': name, 'bn': name}}, got {fb!r}")
    for name, layer in manifest["layers"].items():
        where = f"layer '{name or '<root>'}'"
        if not isinstance(layer, dict) or not _LAYER_KEYS <= set(layer) <= _LAYER_ALLOWED:
            keys = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise fail(path, f"{where}: metadata keys must be {sorted(_LAYER_KEYS)}, got {keys}")
        if layer.get(_ROTATION) is not None:
            if manifest["format_version"] < 3:
                raise fail(
                    path, f"{where}: a rotation needs format version 3, the file says {manifest['format_version']}"
                )
            try:
                Rotation.from_meta(layer[_ROTATION])
            except ConfigError as e:
                raise fail(path, f"{where}: {e}") from None
        if _BALANCE in layer:
            _check_balance(path, where, layer_prefix(name), layer, manifest["format_version"], entry)
        if not isinstance(layer["type"], str) or layer["type"] not in QUANT_MODULES:
            raise fail(path, f"{where}: unknown layer type {layer['type']!r}; known: {', '.join(QUANT_MODULES)}")
        if not isinstance(layer["dtype"], str) or layer["dtype"] not in DTYPES:
            raise fail(path, f"{where}: unknown dtype {layer['dtype']!r}; allowed: {', '.join(DTYPES)}")
        terms = layer["terms"]
        if not isinstance(terms, list) or not terms:
            raise fail(path, f"{where}: 'terms' must be a non-empty list")
        p = layer_prefix(name)
        for i, term in enumerate(terms):
            if not isinstance(term, dict) or set(term) != term_keys:
                raise fail(
                    path,
                    f"{where} term {i}: metadata keys must be {sorted(term_keys)} (format version "
                    f"{manifest['format_version']})",
                )
            try:
                qcls = quantizer_class(term["quantizer"]) if isinstance(term["quantizer"], str) else None
                if qcls is None:
                    raise ConfigError(f"quantizer must be a name, got {term['quantizer']!r}")
                if term["bits"] not in qcls.supported_bits:
                    raise ConfigError(f"quantizer '{qcls.name}' does not support {term['bits']!r} bits")
                specs = QuantTerm.buffer_specs(term)
            except ConfigError as e:
                raise fail(path, f"{where} term {i}: {e}") from None
            except (KeyError, TypeError, ValueError) as e:
                raise fail(path, f"{where} term {i}: malformed metadata ({e})") from None
            for buf, (dtype, shape) in specs.items():
                key = f"{p}terms.{i}.{buf}"
                got = entry(key)
                if got is None or got["dtype"] != ST_DTYPES[dtype] or tuple(got["shape"]) != shape:
                    desc = "missing" if got is None else f"{got['dtype']} {got['shape']}"
                    raise fail(
                        path,
                        f"tensor '{key}' is {desc}; the term's metadata need {ST_DTYPES[dtype]} {list(shape)}",
                    )
        _check_rex_extras(path, where, p, layer, entry)
        _check_input_quant(path, where, p, layer, entry)
        if not isinstance(layer["bias"], bool):  # a bias is allocated from weight_shape: only true/false
            raise fail(path, f"{where}: 'bias' must be true or false, got {layer['bias']!r}")
        if layer["bias"]:
            got = entry(f"{p}bias")
            ws = layer["weight_shape"]
            want_dt = ST_DTYPES[DTYPES[layer["dtype"]]]
            if got is None or not isinstance(ws, list) or not ws or got["shape"] != [ws[0]] or got["dtype"] != want_dt:
                out = ws[0] if isinstance(ws, list) and ws else "?"
                raise fail(path, f"{where}: bias tensor missing, or not {want_dt} of shape [{out}]")


def read_tensors(p: Path, size: int) -> dict[str, torch.Tensor]:
    """All tensors of a checked safetensors file of ``size`` bytes."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FileFormatError(f"cannot read '{p}': {e.strerror or e}") from None
    if len(data) != size:
        raise fail(p, f"the file changed while it was read ({size} then {len(data)} bytes)")
    data, e8m0 = _e8m0_as_bytes(data)
    try:
        out = st_load(data)
    except SafetensorError as e:
        raise fail(p, f"safetensors could not read the tensors ({e})") from None
    for key in e8m0:
        out[key] = out[key].view(torch.float8_e8m0fnu)
    return out


def _e8m0_as_bytes(data: bytes) -> tuple[bytes, list[str]]:
    """The file's bytes with its F8_E8M0 tensors (MXFP4 scales) relabelled U8, and their keys: safetensors'
    in-memory reader does not know that dtype; the caller views them back. The header was checked before."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    keys = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F8_E8M0"]
    if not keys:
        return data, keys
    for k in keys:
        header[k]["dtype"] = "U8"
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :], keys


def read_folder(path: Path, load: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A sharded output folder (see :mod:`dfquant.stream`): ``model.safetensors.index.json`` holds the manifest
    (``metadata.dfquant``) and which shard holds each tensor (``weight_map``). Every shard's header gets the
    single-file checks; together they must hold exactly the tensors the index lists, each where it says, and
    then they are checked against the manifest as one file's header would be. With ``load``, the tensors of
    all shards are read."""
    index = path / "model.safetensors.index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise fail(path, f"not a quantized file nor a folder with a readable '{index.name}' ({_short(e)})") from None
    meta = data.get("metadata") if isinstance(data, dict) else None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise fail(path, f"'{index.name}' needs a 'metadata' object and a 'weight_map' of tensor -> shard file")
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: meta[METADATA_KEY]}} if METADATA_KEY in meta else {}
    shards = sorted(set(wmap.values()))
    sizes = []
    for name in shards:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise fail(path, f"the index names shard {name!r}; allowed: a .safetensors file in the folder")
        shard_header, size = read_header(path / name)
        sizes.append(size)
        for key, entry in shard_header.items():
            if key != "__metadata__" and (wmap.get(key) != name or key in header):
                raise fail(path, f"tensor '{key}' of shard '{name}' is not where the index says ({wmap.get(key)!r})")
            if key != "__metadata__":
                header[key] = entry
    lost = sorted(set(wmap) - set(header))
    if lost:
        raise fail(path, f"the index lists tensors no shard holds: {lost[:5]}")
    manifest = check_manifest(path, header)
    check_tensors(path, header, manifest)
    tensors: dict[str, torch.Tensor] = {}
    for name, size in zip(shards, sizes, strict=True) if load else ():
        tensors.update(read_tensors(path / name, size))
    return manifest, tensors


def _check_input_quant(path: Path, where: str, prefix: str, layer: Mapping[str, Any], entry: Any) -> None:
    """The optional ``input_quant`` entry of a layer (:class:`dfquant.nn.act.ActQuant`): valid metadata and its two
    F32 tensors, ``scale [1]`` and ``levels [num_levels]``."""
    meta = layer.get(_INPUT_QUANT)
    if meta is None:
        return
    try:
        ActQuant.from_meta(meta)
    except ConfigError as e:
        raise fail(path, f"{where}: {e}") from None
    for buf, shape in (("scale", [1]), ("levels", [meta["num_levels"]])):
        key = f"{prefix}{_INPUT_QUANT}.{buf}"
        got = entry(key)
        if got is None or got["dtype"] != "F32" or got["shape"] != shape:
            desc = "missing" if got is None else f"{got['dtype']} {got['shape']}"
            raise fail(path, f"tensor '{key}' is {desc}; the input_quant metadata need F32 {shape}")


def _check_balance(
    path: Path, where: str, prefix: str, layer: Mapping[str, Any], version: int, entry: Callable[[str], Any]
) -> None:
    """The optional ``balance`` of a layer: ``true``, format version 4, and an F16 ``[fan_in]`` scale tensor."""
    if layer[_BALANCE] is not True:
        raise fail(path, f"{where}: 'balance' must be true when present, got {layer[_BALANCE]!r}")
    if version < 4:
        raise fail(path, f"{where}: a balance needs format version 4, the file says {version}")
    ws = layer.get("weight_shape")
    if not isinstance(ws, list) or not ws or not all(isinstance(s, int) and s > 0 for s in ws):
        raise fail(path, f"{where}: weight_shape must be positive integers, got {ws!r}")
    fan_in = math.prod(ws[1:])
    key = f"{prefix}balance.scale"
    got = entry(key)
    if got is None or got["dtype"] != "F16" or got["shape"] != [fan_in]:
        desc = "missing" if got is None else f"{got['dtype']} {got['shape']}"
        raise fail(path, f"tensor '{key}' is {desc}; a balanced layer needs F16 [{fan_in}]")


def is_own_key(rest: str) -> bool:
    return (
        rest == "bias"
        or rest == "balance.scale"
        or (rest.startswith("terms.") and rest.count(".") == 2)
        or (rest.startswith("outliers.") and rest.count(".") == 1)
        or (rest.startswith(f"{_INPUT_QUANT}.") and rest.count(".") == 1)
    )


def _check_rex_extras(
    path: Path, where: str, prefix: str, layer: Mapping[str, Any], entry: Callable[[str], Any]
) -> None:
    """The optional ``outliers`` / ``act`` entries of a layer (see :mod:`dfquant.nn_rex`)."""

    try:
        if layer.get("act") is not None:
            InputSpec.from_dict(layer["act"])
        if layer.get("outliers") is None:
            return
        ws = layer["weight_shape"]
        if not isinstance(ws, list) or not ws or not all(isinstance(s, int) and s > 0 for s in ws):
            raise ConfigError(f"weight_shape must be positive integers, got {ws!r}")
        specs = SparseTerm.buffer_specs(layer["outliers"], ws)
    except ConfigError as e:
        raise fail(path, f"{where}: {e}") from None
    for buf, (dtype, shape) in specs.items():
        key = f"{prefix}outliers.{buf}"
        got = entry(key)
        if got is None or got["dtype"] != ST_DTYPES[dtype] or tuple(got["shape"]) != shape:
            desc = "missing" if got is None else f"{got['dtype']} {got['shape']}"
            raise fail(path, f"tensor '{key}' is {desc}; the outlier metadata need {ST_DTYPES[dtype]} {list(shape)}")
