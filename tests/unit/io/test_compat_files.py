"""Backward compatibility: every released file-format version has a saved model in ``tests/data`` that must
reload forever, and a newer version than this library reads is refused by name.

The files of versions >= 2 were written by ``tests/data/make_compat_files.py`` (minmax per channel, lloyd-max
with stacked tables, nf4 with bfloat16 scales, statq on FP4 E2M1, an order-2 residual expansion, a quantized
embedding with float16 scales, a folded BatchNorm); version 1's by dfquant 0.1.0 (``V1Net`` in the same script).

What a file promises, and so what is checked on every CPU:

* every stored tensor (packed codes, scales, offsets, level tables, table indices, biases) is loaded bit for bit;
* the decoded weights are bit-identical to a plain reference decoder written here (``numpy`` bit unpacking and
  ``levels[table][code] * scale + offset`` in float32: integers and exactly rounded products and sums);
* the reloaded model's outputs are bit-identical to a float model built on this machine from those decoded
  weights (same kernels), and within a relative ``1e-5`` of the outputs stored when the file was written (float
  sums differ in the last bits between CPUs: torch picks its vector kernels by ``ATEN_CPU_CAPABILITY``).

These tests carry the ``portable`` marker: ``make test-portable`` runs them under every CPU capability.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dfquant.errors import FileFormatError
from dfquant.io.load import load_quantized
from dfquant.io.manifest import FORMAT_VERSION, METADATA_KEY, READ_VERSIONS, read_manifest
from dfquant.nn.base import QuantModule

pytestmark = pytest.mark.portable

DATA = Path(__file__).resolve().parents[2] / "data"

#: Relative tolerance of reloaded outputs against the outputs stored on the CPU that wrote the file.
OUTPUT_RTOL = 1e-5


def _maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dfquant_make_compat_files", DATA / "make_compat_files.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MAKER = _maker()


def _kept(version: int) -> tuple[Path, Path]:
    if version == 1:
        return DATA / "format_v1.safetensors", DATA / "format_v1_expected.safetensors"
    return DATA / f"format_v{version}_compat.safetensors", DATA / f"format_v{version}_compat_expected.safetensors"


def _builder(version: int) -> Callable[[object], nn.Module]:
    return MAKER.build_v1 if version == 1 else MAKER.build


def _run(model: nn.Module, version: int, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if version == 1:
            return model(expected["ids"])
        return model(expected["ids"], expected["image"])


# -- a plain reference decoder, independent of dfquant.quantizers (packing included) ----------------------------------


def _ref_unpack(packed: torch.Tensor, bits: int, numel: int) -> np.ndarray:
    """Codes of a little-endian bit stream: code ``i`` is bits ``[bits*i, bits*(i+1))``, bit 0 the least
    significant bit of byte 0."""
    stream = np.unpackbits(packed.numpy(), bitorder="little")[: numel * bits].reshape(numel, bits)
    return (stream.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _index_bits(tables: int) -> int:
    return max(1, (tables - 1).bit_length())


def _ref_term(term: dict, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """One term's float32 values in its own shape, from the file's tensors and the manifest's term entry."""
    shape = tuple(term["shape"])
    numel = int(np.prod(shape))
    gran = term["granularity"]
    rows = 1 if gran == "tensor" else shape[0]
    assert gran == "tensor" or (gran.startswith(("channel", "group:")) and gran.count(":") <= 1), gran
    cols = numel // rows
    codes = _ref_unpack(tensors[prefix + "packed"], term["bits"], numel).reshape(rows, cols)
    scale = tensors[prefix + "scale"].to(torch.float32)
    groups = scale.shape[1]
    group_len = -(-cols // groups)
    levels = tensors[prefix + "levels"]
    if levels.dim() == 1:
        table = torch.zeros(rows, groups, dtype=torch.int64)
        levels = levels[None]
    else:
        idx = tensors[prefix + "table_index"]
        table = torch.from_numpy(_ref_unpack(idx, _index_bits(levels.shape[0]), rows * groups)).reshape(rows, groups)
    out = torch.empty(rows, cols, dtype=torch.float32)
    offset = tensors.get(prefix + "offset")
    for r in range(rows):
        for g in range(groups):
            cs = slice(g * group_len, min(cols, (g + 1) * group_len))
            vals = levels[table[r, g], torch.from_numpy(codes[r, cs])] * scale[r, g]
            if offset is not None:
                vals = vals + offset[r, g].to(torch.float32)
            out[r, cs] = vals
    return out.reshape(shape)


def _ref_undo_rotation(w: torch.Tensor, rotation: dict) -> torch.Tensor:
    """``W R`` for ``R = H D`` (format 3): on the flattened fan-in, blocks of ``block`` then the powers of two of
    the remainder, each by in-place butterflies ``(a, b) -> (a + b, a - b)`` in numpy float32 scaled by
    ``1/sqrt(B)``, then times the signs drawn from the seed by torch's CPU generator."""
    rows = w.reshape(w.shape[0], -1).numpy().astype(np.float32).copy()
    n, block = rows.shape[1], rotation["block"]
    sizes = [block] * (n // block)
    rest = n % block
    while rest:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    start = 0
    for b in sizes:
        x = rows[:, start : start + b]
        h = 1
        while h < b:
            for i in range(0, b, 2 * h):
                for j in range(i, i + h):
                    a, c = x[:, j].copy(), x[:, j + h].copy()
                    x[:, j], x[:, j + h] = a + c, a - c
            h *= 2
        if b > 1:
            x *= np.float32(1.0 / np.sqrt(b))
        start += b
    g = torch.Generator().manual_seed(rotation["seed"])
    signs = (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).numpy().astype(np.float32)
    return torch.from_numpy(rows * signs).reshape(w.shape)


def _ref_weight(layer: dict, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``(0 + term_1 + ... + term_K) R diag(c)`` (float32, oriented), as a file defines a layer's weight (``R``
    only with a ``rotation`` entry, ``c`` only with ``balance``)."""
    w = torch.zeros(tuple(layer["weight_shape"]), dtype=torch.float32)
    for k, term in enumerate(layer["terms"]):
        assert term.get("channels") is None  # the kept files hold whole-tensor terms only
        w = w + _ref_term(term, tensors, f"{name}.terms.{k}.")
    if layer.get("rotation") is not None:
        w = _ref_undo_rotation(w, layer["rotation"])
    if layer.get("balance"):  # format 4: times the float16 column scale along the flattened fan-in (float32)
        c = tensors[f"{name}.balance.scale"].numpy().astype(np.float32)
        w = torch.from_numpy(w.reshape(w.shape[0], -1).numpy() * c).reshape(w.shape)
    return w


def _float_twin(model: nn.Module, manifest: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose quantized layers are plain float layers holding the reference weights."""
    twin = copy.deepcopy(model)
    for name, layer in manifest["layers"].items():
        q = twin.get_submodule(name)
        assert isinstance(q, QuantModule)
        w = _ref_weight(layer, tensors, name)
        bias = tensors.get(f"{name}.bias")
        if layer["type"] == "linear":
            f: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        elif layer["type"] == "embedding":
            f = nn.Embedding(w.shape[0], w.shape[1])
        elif layer["type"] in ("conv1d", "conv2d"):
            args = layer["module"]
            cls = nn.Conv1d if layer["type"] == "conv1d" else nn.Conv2d
            f = cls(
                args["in_channels"],
                args["out_channels"],
                args["kernel_size"],
                stride=args.get("stride", 1),
                padding=args.get("padding", 0),
                dilation=args.get("dilation", 1),
                groups=args.get("groups", 1),
                bias=bias is not None,
            )
        else:
            raise AssertionError(f"no float twin for layer type {layer['type']!r}")
        with torch.no_grad():
            f.weight.copy_(w)
            if bias is not None:
                f.bias.copy_(bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, f.eval())
    return twin


# -- the kept files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", list(READ_VERSIONS))
def test_every_readable_version_has_a_kept_file(version: int) -> None:
    """A new format version must come with its compatibility file (run ``make_compat_files.py``)."""
    model, expected = _kept(version)
    assert model.is_file() and expected.is_file(), f"no compatibility file for format version {version}"
    assert read_manifest(model)["format_version"] == version
    assert model.stat().st_size < 16_000 and expected.stat().st_size < 4_000  # kept tiny


@pytest.mark.parametrize("version", list(READ_VERSIONS))
def test_kept_file_reloads_every_stored_tensor_bit_identical(version: int) -> None:
    path, _ = _kept(version)
    tensors = load_file(path)
    model, _ = load_quantized(path, build=_builder(version))
    state = model.state_dict()
    for key, stored in tensors.items():
        assert key in state, f"{key} of the file is not in the loaded model"
        assert state[key].dtype == stored.dtype and torch.equal(state[key], stored), key


@pytest.mark.parametrize("version", list(READ_VERSIONS))
def test_kept_file_decodes_bit_identical_weights(version: int) -> None:
    path, _ = _kept(version)
    tensors = load_file(path)
    model, manifest = load_quantized(path, build=_builder(version))
    assert manifest["layers"], "the kept file holds no quantized layer"
    for name, layer in manifest["layers"].items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantModule)
        ref = _ref_weight(layer, tensors, name)
        got = q.dequantize_weight()
        assert got.dtype == torch.float32 and torch.equal(got, ref), name
        assert bool((got != 0).any()), f"{name} decodes to all zeros"


@pytest.mark.parametrize("version", list(READ_VERSIONS))
@pytest.mark.parametrize("cache_weight", [True, False])
def test_kept_file_outputs_match_a_float_twin_and_the_stored_outputs(version: int, cache_weight: bool) -> None:
    path, expected_path = _kept(version)
    tensors = load_file(path)
    expected = load_file(expected_path)
    model, manifest = load_quantized(path, build=_builder(version), cache_weight=cache_weight)
    out = _run(model, version, expected)
    twin = _float_twin(model, manifest, tensors)
    # same weights, same kernels on this machine: the same bits
    assert torch.equal(out, _run(twin, version, expected))
    # against the outputs of the CPU that wrote the file: the last bits of float sums may differ
    stored = expected["output"]
    assert out.dtype == stored.dtype and out.shape == stored.shape
    torch.testing.assert_close(out, stored, rtol=OUTPUT_RTOL, atol=OUTPUT_RTOL * float(stored.abs().max()))
    # and a second load gives the same bits (no state kept between loads)
    again, _ = load_quantized(path, build=_builder(version), cache_weight=not cache_weight)
    assert torch.equal(_run(again, version, expected), out)


def test_kept_file_covers_the_features_it_was_made_for() -> None:
    path, _ = _kept(FORMAT_VERSION)
    model, manifest = load_quantized(path, build=MAKER.build)
    quantizers = {t["quantizer"] for lay in manifest["layers"].values() for t in lay["terms"]}
    assert {"minmax", "lloyd-max", "nf4", "statq"} <= quantizers
    assert len(model.mix.terms) == 2  # residual expansion of order 2
    assert isinstance(model.emb, QuantModule) and model.emb.layer_type == "embedding"
    assert model.lloyd.terms[0].num_tables >= 2  # stacked level tables
    assert model.fp4.terms[0].grid == "fp4_e2m1"
    assert model.nf4.terms[0].scale.dtype == torch.bfloat16
    assert model.emb.terms[0].scale.dtype == torch.float16
    assert {(f["layer"], f["bn"]) for f in manifest["folded_bn"]} == {("conv", "bn")}
    assert model.conv.rotation is not None and model.conv.rotation.blocks(27) == [16, 8, 2, 1]
    assert model.head.rotation is not None and model.head.rotation.block == 8
    assert manifest["layers"]["head"]["terms"][0]["quantizer"] == "lloyd-max"
    assert model.mix.balance is not None and model.mix.rotation is None
    assert model.nf4.balance is not None and model.nf4.rotation is not None
    assert not torch.equal(model.nf4.balance.scale, torch.ones(16, dtype=torch.float16))


def test_format_v1_keeps_its_own_conventions() -> None:
    """Format version 1: float32 scales and no ``scale_dtype`` key."""
    path, _ = _kept(1)
    man = read_manifest(path)
    assert man["format_version"] == 1 and "scale_dtype" not in man["layers"]["conv"]["terms"][0]
    model, _ = load_quantized(path, build=MAKER.build_v1)
    assert model.conv.terms[0].scale.dtype == torch.float32


def test_current_version_file_is_what_the_current_code_writes() -> None:
    """The kept file of the current version is what the current code writes for the same model and rules: the
    same codes and table choices bit for bit; decoded weights and biases within ``1e-6`` of the tensor's largest
    magnitude (BatchNorm folding, fits and bias correction are float sums, whose last bits depend on the CPU);
    outputs within the tolerance above. A change in a quantizer's output shows here: then write a new format's
    files or fix the quantizer, never loosen this."""
    from dfquant.pipeline.quantize import quantize_model

    path, expected_path = _kept(FORMAT_VERSION)
    q, _ = quantize_model(MAKER.trained(), MAKER.config())
    kept = load_file(path)
    manifest = read_manifest(path)
    fresh = q.state_dict()
    assert set(fresh) == set(kept)
    for key, stored in kept.items():
        got = fresh[key]
        assert got.dtype == stored.dtype and got.shape == stored.shape, key
        if not stored.is_floating_point() or key.endswith(".levels"):  # codes, table indices, grids: exact
            assert torch.equal(got, stored), key
        elif key.endswith(".bias"):
            torch.testing.assert_close(got, stored, rtol=0.0, atol=1e-6 * float(stored.abs().max()), msg=key)
    for name, layer in manifest["layers"].items():
        ref = _ref_weight(layer, kept, name)
        got_w = q.get_submodule(name).dequantize_weight()
        torch.testing.assert_close(got_w, ref, rtol=0.0, atol=1e-6 * float(ref.abs().max()), msg=name)
    expected = load_file(expected_path)
    stored_out = expected["output"]
    torch.testing.assert_close(
        _run(q, FORMAT_VERSION, expected),
        stored_out,
        rtol=OUTPUT_RTOL,
        atol=OUTPUT_RTOL * float(stored_out.abs().max()),
    )


def test_maker_weights_do_not_depend_on_the_global_seed() -> None:
    torch.manual_seed(123)
    a = MAKER.trained().state_dict()
    torch.rand(5)
    b = MAKER.trained().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("version", [v for v in READ_VERSIONS if v >= 2])
def test_newer_version_than_known_names_both(version: int, tmp_path: Path) -> None:
    path, _ = _kept(version)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    man = json.loads(meta[METADATA_KEY])
    newer = FORMAT_VERSION + 1
    man["format_version"] = newer
    bad = tmp_path / "newer.safetensors"
    save_file(load_file(path), str(bad), metadata={METADATA_KEY: json.dumps(man)})
    for call in (lambda: read_manifest(bad), lambda: load_quantized(bad, build=MAKER.build)):
        with pytest.raises(FileFormatError) as e:
            call()
        msg = str(e.value)
        assert f"version {newer}" in msg and f"version {FORMAT_VERSION}" in msg and "upgrade" in msg
