"""Adapters to the peer libraries' weight quantizers, and dfquant's settings, with honest storage costs.

Each *setting* is a function ``float weight -> QuantResult``: the dequantized weight (float32, the input's
shape) and the bits every stored part takes, counted from the tensors the library keeps, at their dtype:

* **HQQ** (``hqq.core.quantize.Quantizer``, Badri and Shaji 2023): asymmetric ``b``-bit codes with a scale and
  a zero point per group along the input dimension (``axis=1``, as ``hqq_base_quant_config``), fitted by the
  half-quadratic proximal solver; scale and zero are stored in the layer's compute dtype (float16, the default
  of ``HQQLinear``). 3-bit codes are packed ten to an int32 (3.2 bits per code, rows padded to a multiple of
  ten). Groups must divide the tensor; HQQ has layers for ``nn.Linear`` only.
* **bitsandbytes** (Dettmers et al. 2023): NF4 / FP4 codes in blocks of the flattened tensor, float32 absmax per
  block, or with double quantization (``compress_statistics``, the ``Linear4bit`` default) absmax stored as
  8-bit codes in blocks of 256 plus their float32 absmax and offset; the 16-entry code map (and the 256-entry
  nested map) are stored with each tensor (``QuantState.as_dict(packed=True)``, counted here). 8-bit weights
  are LLM.int8()'s row-wise absmax int8 with a float32 scale per row (``int8_vectorwise_quant``). bitsandbytes
  offers no 2- or 3-bit weights, no per-channel 4-bit scales, and layers for ``nn.Linear`` only.
* **optimum-quanto**: ``qint2`` / ``qint4`` affine codes with a scale and a shift per group (``MaxOptimizer``,
  the default of its modules), ``qint8`` symmetric per channel (``AbsmaxOptimizer``) and ``qfloat8`` (E4M3) per
  channel; scales and shifts are stored in the weight's dtype, so the weight is given as float16 (the dtype
  quanto is used with; quanto has ``QLinear`` and ``QConv2d``). No 3-bit type.
* **torchao** (``IntxWeightOnlyConfig``, the weight-only path that runs on CPU; ``Int4WeightOnlyConfig``
  needs CUDA or the ``mslk`` kernels): ``b``-bit codes stored *unpacked*, one int8 per code, with an int8 zero
  point and a scale (float16 here, its ``scale_dtype`` option) per group of the last dimension (for a 4-D conv
  weight the groups run along the input channels only); ``Int8WeightOnlyConfig`` is per row. The file cost is
  therefore 8 bits per code whatever ``b``; :attr:`QuantResult.nominal_bits` gives the cost if codes were
  packed at ``b`` bits, for a comparison that favours torchao.

A setting that cannot quantize a tensor (a group size that does not divide it, a shape it refuses) raises
:class:`UnsupportedError` naming the reason; callers record it instead of dropping it.

quanto's ``"module"`` granularity is the group size its modules pick (128, lowered by 32 until it divides the
row, else per channel); the other granularities are exact.

The peer libraries are optional (``pip install -e '.[bench]'``): :func:`library_status` reports a missing one's
import error and :func:`peer_settings` records its settings as not offered. dfquant itself never imports them.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dfquant.methods.rex import expand, reconstruct
from dfquant.quantizers import get_quantizer
from dfquant.quantizers.qtensor import QTensor

__all__ = [
    "PEER_LIBRARIES",
    "QuantResult",
    "Setting",
    "UnsupportedError",
    "dfquant_settings",
    "library_status",
    "peer_settings",
    "recommended_peer_settings",
]

#: Library -> (import name, the layer types its modules quantize).
PEER_LIBRARIES: dict[str, tuple[str, str]] = {
    "hqq": ("hqq", "nn.Linear only (HQQLinear); no convolutions"),
    "bitsandbytes": ("bitsandbytes", "nn.Linear only (Linear4bit, Linear8bitLt); no convolutions"),
    "quanto": ("optimum.quanto", "nn.Linear and nn.Conv2d (QLinear, QConv2d)"),
    "torchao": ("torchao", "nn.Linear (and nn.Embedding) via quantize_; 4-D conv weights by the tensor API only"),
}


class UnsupportedError(Exception):
    """A setting cannot quantize this tensor (the message says why)."""


@dataclass
class QuantResult:
    """A quantized weight as a library stores it.

    Attributes:
        dequantized: float32 reconstruction, the input's shape.
        parts: ``{part: bits}`` of everything stored for this tensor (codes, scales, zero points, code maps).
        numel: number of weights.
        nominal_parts: the parts if codes were packed at their nominal width (only where the library stores
            them wider), else None.
    """

    dequantized: torch.Tensor
    parts: dict[str, int]
    numel: int
    nominal_parts: dict[str, int] | None = None

    @property
    def bits(self) -> int:
        return sum(self.parts.values())

    @property
    def nominal_bits(self) -> int:
        return sum((self.nominal_parts or self.parts).values())

    def bits_per_weight(self) -> float:
        return self.bits / self.numel


@dataclass(frozen=True)
class Setting:
    """One method at one width and granularity.

    Attributes:
        library: ``"dfquant"`` or a key of :data:`PEER_LIBRARIES`.
        method: the curve it belongs to (e.g. ``"hqq"``, ``"bnb-nf4+dq"``, ``"lloyd-max"``).
        bits: code bits.
        granularity: ``"group:G"`` or ``"channel"``.
        fn: ``weight -> QuantResult`` (raises :class:`UnsupportedError`).
        note: what the setting stores, in words.
    """

    library: str
    method: str
    bits: int
    granularity: str
    fn: Callable[[torch.Tensor], QuantResult] = field(compare=False, repr=False)
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.method} w{self.bits} {self.granularity}"


def _tbits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _group_size(gran: str) -> int | None:
    return int(gran.split(":")[1]) if gran.startswith("group:") else None


def _matrix(w: torch.Tensor) -> torch.Tensor:
    """The ``(out, in * taps)`` view a linear-only library would see of a conv weight."""
    return w.reshape(w.shape[0], -1) if w.dim() > 2 else w


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the peers' prints and warnings (kernel availability notices) during a call; turn the errors a
    library raises for a shape it cannot handle (assertions, packing shape mismatches) into
    :class:`UnsupportedError`."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        except (AssertionError, RuntimeError, ValueError, NotImplementedError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedError(f"the library refused: {msg[:160]}") from None


# ----------------------------------------------------------------------------------------------------------------
# dfquant


def _qtensor_result(qts: list[QTensor], deq: torch.Tensor, numel: int) -> QuantResult:
    parts: dict[str, int] = {}
    for qt in qts:
        for k, v in qt.storage_bits().items():
            parts[k] = parts.get(k, 0) + v
    return QuantResult(deq.to(torch.float32), parts, numel)


def dfquant_fn(
    rule: str, bits: int, gran: str, *, scale_dtype: str = "float16", expand_order: int = 1, **options: Any
) -> Callable[[torch.Tensor], QuantResult]:
    """A dfquant rule as a setting function (``expand_order=2``: REx, two terms of ``bits`` each)."""
    q = get_quantizer(rule, bits, **options)

    def fn(w: torch.Tensor) -> QuantResult:
        if expand_order == 1:
            qt = q.quantize(w, gran, scale_dtype=scale_dtype)
            return _qtensor_result([qt], qt.dequantize(torch.float32), w.numel())
        terms = expand(w, q, expand_order, granularity=gran, scale_dtype=scale_dtype)
        return _qtensor_result([t.qtensor for t in terms], reconstruct(terms, w.shape), w.numel())

    return fn


#: dfquant curves: name -> (rule, options, bit widths, granularities). Per-group codebooks (lloyd-empirical,
#: lloyd-optimal) store 2^b float32 levels per group (8 extra bits per weight at 4 bits in groups of 64), so
#: they run per channel only.
GROUPS = ("group:32", "group:64", "group:128", "channel")
DFQUANT_CURVES: dict[str, tuple[str, dict[str, Any], tuple[int, ...], tuple[str, ...], int]] = {
    "minmax": ("minmax", {}, (2, 3, 4, 8), GROUPS, 1),
    "mse": ("mse", {}, (2, 3, 4, 8), GROUPS, 1),
    "aciq": ("aciq", {}, (2, 3, 4, 8), GROUPS, 1),
    "lloyd-max": ("lloyd-max", {}, (2, 3, 4, 8), GROUPS, 1),
    "lloyd-empirical": ("lloyd-empirical", {}, (2, 3, 4), ("channel",), 1),
    "lloyd-optimal": ("lloyd-optimal", {}, (2, 3, 4), ("channel",), 1),
    "nf4": ("nf4", {}, (4,), GROUPS, 1),
    "statq-int": ("statq", {}, (2, 3, 4, 8), GROUPS, 1),
    "statq-fp4": ("statq", {"format": "fp4_e2m1"}, (4,), GROUPS, 1),
    "statq-fp6": ("statq", {"format": "fp6_e2m3"}, (6,), GROUPS, 1),
    "statq-fp8": ("statq", {"format": "fp8_e4m3"}, (8,), GROUPS, 1),
    "rex2-minmax": ("minmax", {}, (2, 3, 4), GROUPS, 2),
    "rex2-lloyd-max": ("lloyd-max", {}, (2, 3, 4), GROUPS, 2),
    # asymmetric grids (a scale and an offset per group) and the widths between 4 and 8 bits
    "minmax-uint": ("minmax", {"grid": "uint"}, (2, 3, 4, 5, 6, 8), GROUPS, 1),
    "statq-uint": ("statq", {"format": "uint{bits}"}, (2, 3, 4, 5, 6, 8), GROUPS, 1),
    "mse-5-6": ("mse", {}, (5, 6), GROUPS, 1),
    "lloyd-max-5-6": ("lloyd-max", {}, (5, 6), GROUPS, 1),
}


def dfquant_settings(curves: list[str] | None = None, scale_dtype: str = "float16") -> list[Setting]:
    """dfquant's settings (float16 scales and offsets; codebooks float32, as the file stores them)."""
    out = []
    for name, (rule, opts, widths, grans, order) in DFQUANT_CURVES.items():
        if curves is not None and name not in curves:
            continue
        for b in widths:
            for g in grans:
                bopts = {k: v.format(bits=b) if isinstance(v, str) else v for k, v in opts.items()}
                fn = dfquant_fn(rule, b, g, scale_dtype=scale_dtype, expand_order=order, **bopts)
                note = f"{scale_dtype} scales" + (f", REx order {order} ({order} x {b}-bit terms)" if order > 1 else "")
                out.append(Setting("dfquant", name.removesuffix("-5-6"), b * order, g, fn, note))
    return out


# ----------------------------------------------------------------------------------------------------------------
# HQQ


def hqq_fn(bits: int, gran: str) -> Callable[[torch.Tensor], QuantResult]:
    """HQQ's ``Quantizer.quantize`` as ``HQQLinear`` calls it (``hqq_base_quant_config`` parameters)."""

    def fn(w: torch.Tensor) -> QuantResult:
        from hqq.core.quantize import Quantizer as HQQQuantizer

        m = _matrix(w.detach().to(torch.float32))
        g = _group_size(gran) or m.shape[1]
        if m.numel() % g:
            raise UnsupportedError(f"group size {g} does not divide the tensor's {m.numel()} elements")
        with _quiet():
            wq, meta = HQQQuantizer.quantize(
                m, nbits=bits, channel_wise=True, group_size=g, optimize=True, round_zero=bits == 4, axis=1,
                compute_dtype=torch.float16, device="cpu",
            )  # fmt: skip
            meta["scale"] = meta["scale"].to(torch.float16)  # HQQLinear keeps meta in its compute dtype
            meta["zero"] = meta["zero"].to(torch.float16)
            meta["compute_dtype"] = torch.float16
            deq = HQQQuantizer.dequantize(wq, meta)
        parts = {"codes": _tbits(wq), "scale": _tbits(meta["scale"]), "zero": _tbits(meta["zero"])}
        return QuantResult(deq.to(torch.float32).reshape(w.shape), parts, w.numel())

    return fn


# ----------------------------------------------------------------------------------------------------------------
# bitsandbytes


def bnb4_fn(quant_type: str, blocksize: int, double_quant: bool) -> Callable[[torch.Tensor], QuantResult]:
    """``bitsandbytes.functional.quantize_4bit`` (what ``Linear4bit`` stores)."""

    def fn(w: torch.Tensor) -> QuantResult:
        import bitsandbytes.functional as F

        x = w.detach().to(torch.float32).contiguous()
        with _quiet():
            q, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
            deq = F.dequantize_4bit(q, state)
        parts = {"codes": _tbits(q)}
        for k, v in state.as_dict(packed=True).items():
            if isinstance(v, torch.Tensor) and not k.startswith("quant_state."):  # the last one holds metadata
                parts[k] = _tbits(v)
        return QuantResult(deq.to(torch.float32).reshape(w.shape), parts, w.numel())

    return fn


def bnb8_fn() -> Callable[[torch.Tensor], QuantResult]:
    """LLM.int8()'s weight format: int8 codes, float32 absmax per row (``int8_vectorwise_quant``)."""

    def fn(w: torch.Tensor) -> QuantResult:
        import bitsandbytes.functional as F

        m = _matrix(w.detach().to(torch.float32)).contiguous()
        with _quiet():
            q, row_stats, _ = F.int8_vectorwise_quant(m)
        deq = q.to(torch.float32) * (row_stats.to(torch.float32)[:, None] / 127.0)
        parts = {"codes": _tbits(q), "scale": _tbits(row_stats)}
        return QuantResult(deq.reshape(w.shape), parts, w.numel())

    return fn


# ----------------------------------------------------------------------------------------------------------------
# optimum-quanto


def quanto_fn(qtype_name: str, gran: str) -> Callable[[torch.Tensor], QuantResult]:
    """``optimum.quanto.quantize_weight`` with the optimizer its modules use, on a float16 weight."""

    def fn(w: torch.Tensor) -> QuantResult:
        from optimum.quanto import qtypes
        from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer
        from optimum.quanto.tensor.weights import quantize_weight

        qtype = qtypes[qtype_name]
        x = w.detach().to(torch.float16)
        g = _quanto_module_group(x) if gran == "module" else _group_size(gran)
        with _quiet():
            if qtype.bits == 8:
                if g is not None:
                    raise UnsupportedError("quanto's 8-bit types are per channel only")
                scale = AbsmaxOptimizer()(x, qtype=qtype, axis=0)
                qw = quantize_weight(x, qtype=qtype, axis=0, scale=scale, optimized=False)
                parts = {"codes": _tbits(qw._data), "scale": _tbits(qw._scale)}
            else:
                per_row = x.numel() // x.shape[0]
                if g is not None and per_row % g:
                    raise UnsupportedError(f"group size {g} does not divide the {per_row} weights per output channel")
                try:
                    scale, shift = MaxOptimizer()(x, qtype=qtype, axis=0, group_size=g)
                    qw = quantize_weight(
                        x, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=g, optimized=False
                    )
                except ValueError as e:
                    raise UnsupportedError(str(e)) from None
                data = qw._data._data if hasattr(qw._data, "_data") else qw._data
                parts = {"codes": _tbits(data), "scale": _tbits(qw._scale), "shift": _tbits(qw._shift)}
            deq = qw.dequantize()
        return QuantResult(deq.to(torch.float32).reshape(w.shape), parts, w.numel())

    return fn


def _quanto_module_group(x: torch.Tensor) -> int | None:
    """The group size quanto's modules pick for a 2/4-bit weight (``QModuleMixin``): 128, lowered by 32 until it
    divides the weights per output channel (not below 32), else per channel."""
    per_row = x.numel() // x.shape[0]
    g = 128
    if per_row <= g:
        return None
    while per_row % g and g > 32:
        g -= 32
    return g if per_row % g == 0 else None


# ----------------------------------------------------------------------------------------------------------------
# torchao


def torchao_intx_fn(bits: int, gran: str, symmetric: bool = False) -> Callable[[torch.Tensor], QuantResult]:
    """torchao ``IntxWeightOnlyConfig`` (unpacked int8 storage, int8 zero points, float16 scales)."""

    def fn(w: torch.Tensor) -> QuantResult:
        from torchao.quantization import quant_api as qa
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_primitives import MappingType

        x = w.detach().to(torch.float32)
        if x.dim() not in (2, 4):
            raise UnsupportedError(f"torchao's Intx weights are 2-D or 4-D, got {x.dim()}-D")
        g = _group_size(gran)
        dim_len = x.shape[-1] if x.dim() == 2 else x.shape[1]
        if g is not None and dim_len % g:
            raise UnsupportedError(f"group size {g} does not divide the grouped dimension ({dim_len})")
        cfg = qa.IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=PerGroup(g) if g is not None else PerAxis(0),
            mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
            scale_dtype=torch.float16,
        )
        with _quiet():
            qw = qa._intx_weight_only_quantize_tensor(x, cfg)
            deq = qw.dequantize()
        parts = {"codes": _tbits(qw.qdata), "scale": _tbits(qw.scale), "zero": _tbits(qw.zero_point)}
        nominal = dict(parts, codes=qw.qdata.numel() * bits)
        return QuantResult(deq.to(torch.float32).reshape(w.shape), parts, w.numel(), nominal)

    return fn


def torchao_int8_fn() -> Callable[[torch.Tensor], QuantResult]:
    """torchao ``Int8WeightOnlyConfig`` (per row: int8 codes, float32 scale and int8 zero point per row)."""

    def fn(w: torch.Tensor) -> QuantResult:
        from torchao.quantization import quant_api as qa

        x = _matrix(w.detach().to(torch.float32))
        with _quiet():
            qw = qa._int8_weight_only_quantize_tensor(x, qa.Int8WeightOnlyConfig())
            deq = qw.dequantize()
        parts = {"codes": _tbits(qw.qdata), "scale": _tbits(qw.scale), "zero": _tbits(qw.zero_point)}
        return QuantResult(deq.to(torch.float32).reshape(w.shape), parts, w.numel())

    return fn


# ----------------------------------------------------------------------------------------------------------------
# Catalogue


def library_status() -> dict[str, str]:
    """``{library: "ok <version>" or "missing: <error>"}`` for the peers."""
    import importlib

    out = {}
    for lib, (module, _) in PEER_LIBRARIES.items():
        try:
            with _quiet():
                mod = importlib.import_module(module)
            version = getattr(mod, "__version__", None)
            if version is None:
                from importlib.metadata import version as dist_version

                version = dist_version({"quanto": "optimum-quanto"}.get(lib, lib))
            out[lib] = f"ok {version}"
        except Exception as e:  # an optional library that is absent or broken
            out[lib] = f"missing: {type(e).__name__}: {e}"
    return out


def peer_settings() -> tuple[list[Setting], list[dict[str, str]]]:
    """Every peer setting of an installed library, and the settings each library does not offer (recorded)."""
    status = library_status()
    s: list[Setting] = []
    not_offered: list[dict[str, str]] = []

    def skip(lib: str, what: str, why: str) -> None:
        not_offered.append({"library": lib, "setting": what, "reason": why})

    if status["hqq"].startswith("ok"):
        for b in (2, 3, 4, 8):
            for g in GROUPS:
                s.append(Setting("hqq", "hqq", b, g, hqq_fn(b, g), "float16 scale and zero per group"))
    if status["bitsandbytes"].startswith("ok"):
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                for g in GROUPS[:3]:
                    name = f"bnb-{qt}" + ("+dq" if dq else "")
                    note = "8-bit double-quantized absmax" if dq else "float32 absmax per block"
                    s.append(Setting("bitsandbytes", name, 4, g, bnb4_fn(qt, _group_size(g) or 64, dq), note))
        s.append(Setting("bitsandbytes", "bnb-int8", 8, "channel", bnb8_fn(), "float32 absmax per row"))
        skip("bitsandbytes", "2- and 3-bit weights", "no such weight type")
        skip("bitsandbytes", "4-bit per channel", "blocks of the flattened tensor only")
    if status["quanto"].startswith("ok"):
        for qt, b in (("qint2", 2), ("qint4", 4)):
            for g in GROUPS:
                s.append(Setting("quanto", "quanto", b, g, quanto_fn(qt, g), "float16 scale and shift per group"))
        s.append(Setting("quanto", "quanto", 8, "channel", quanto_fn("qint8", "channel"), "float16 scale per row"))
        note = "group 128 or the largest multiple of 32 dividing the row, else per channel (QModuleMixin)"
        s.append(Setting("quanto", "quanto", 4, "module", quanto_fn("qint4", "module"), note))
        s.append(Setting("quanto", "quanto-fp8", 8, "channel", quanto_fn("qfloat8", "channel"), "E4M3, fp16 scale"))
        skip("quanto", "3-bit weights", "no qint3 type")
        skip("quanto", "8-bit per group", "qint8/qfloat8 weights are per channel only")
    if status["torchao"].startswith("ok"):
        for b in (2, 3, 4, 8):
            for g in GROUPS:
                s.append(
                    Setting("torchao", "torchao-intx", b, g, torchao_intx_fn(b, g), "int8-unpacked codes, fp16 scale")
                )
        s.append(Setting("torchao", "torchao-int8", 8, "channel", torchao_int8_fn(), "per row, float32 scale"))
        skip("torchao", "Int4WeightOnlyConfig on CPU", "needs CUDA or the mslk kernels (ImportError on this machine)")
    for lib, st in status.items():
        if not st.startswith("ok"):
            skip(lib, "all settings", st)
    return s, not_offered


def recommended_peer_settings() -> list[Setting]:
    """Each peer's recommended 4-bit weight-only setting (the defaults of its documented entry point)."""
    wanted = {
        ("hqq", "hqq", 4, "group:64"),  # hqq_base_quant_config(nbits=4, group_size=64)
        ("bitsandbytes", "bnb-nf4+dq", 4, "group:64"),  # QLoRA: NF4, blocksize 64, double quantization
        ("quanto", "quanto", 4, "module"),  # qint4 weights, the group size its modules choose (128 first)
        ("torchao", "torchao-intx", 4, "group:32"),  # IntxWeightOnlyConfig int4 PerGroup(32), the CPU example
    }
    settings, _ = peer_settings()
    return [s for s in settings if (s.library, s.method, s.bits, s.granularity) in wanted]


def rel_mse(w: torch.Tensor, r: QuantResult) -> float:
    """``||w_hat - w||^2 / ||w||^2``."""
    ref = w.detach().to(torch.float32)
    den = float((ref * ref).sum())
    return float(((r.dequantized - ref) ** 2).sum()) / den if den > 0 else math.nan
