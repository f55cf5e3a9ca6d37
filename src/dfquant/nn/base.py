"""The quantized-layer base: which modules are quantizable (:func:`layer_kind`, their oriented weight), and
:class:`QuantModule`, a layer holding a list of terms, with its registry (:func:`register_quant_module`).

Weights are always handled in ``(out, in, *kernel)`` layout ("oriented"): for the Hugging Face ``Conv1D``,
whose parameter is stored transposed as ``(in, out)``, the terms hold the transpose. A layer computes with
``W_hat = sum_k dequantize(term_k)``; it caches the decoded weight after the first forward when
``cache_weight=True`` and decodes on every forward otherwise (see :mod:`dfquant.nn.layers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.methods.rex_act import InputSpec
from dfquant.methods.rotate import Rotation
from dfquant.nn import kernel
from dfquant.nn.act import ActQuant
from dfquant.nn.balance import ColumnScale
from dfquant.nn.rex import SparseTerm, input_expanded_forward
from dfquant.nn.terms import DTYPES, QuantTerm, dtype_name

# ------------------------------------------------------------------------------------------------------------
# Float layer types


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (GPT-2 style linear layer with an ``(in, out)``
    weight).

    Detected by class name and attributes, so ``transformers`` need not be imported: a class named ``Conv1D``
    with an ``nf`` attribute and a 2-D ``weight`` parameter of shape ``(in, nf)``.
    """
    if type(module).__name__ != "Conv1D" or isinstance(module, QuantModule):
        return False
    w = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(nf, int) and w.shape[1] == nf


def layer_kind(module: nn.Module) -> str | None:
    """The quantizable kind of a float layer: ``linear``, ``conv1d``, ``conv2d``, ``hf-conv1d``,
    ``embedding``, or None.

    An ``nn.Embedding`` with ``max_norm`` (which renormalizes looked-up rows of its weight in place) is not
    quantizable.
    """
    if isinstance(module, QuantModule):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None else None
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if is_hf_conv1d(module):
        return "hf-conv1d"
    return None


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's ``weight`` tensor as stored.

    Raises:
        InputError: the module has no weight tensor.
    """
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise InputError(f"module {type(module).__name__} has no weight tensor")
    return w


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight in ``(out, in, *kernel)`` layout (a transposed view for the HF ``Conv1D``)."""
    w = weight_of(module)
    return w.t() if is_hf_conv1d(module) else w


# ------------------------------------------------------------------------------------------------------------
# Quantized layers

M = TypeVar("M", bound="type[QuantModule]")

#: Layer type name (as written in files) -> quantized module class. Files name types only from this table.
QUANT_MODULES: dict[str, type[QuantModule]] = {}
#: What :attr:`QuantModule.matmul` may say.
MATMUL_MODES = ("auto", "decode", "kernel", "int4")


def set_matmul(model: nn.Module, mode: str) -> int:
    """Set how every quantized layer of ``model`` multiplies (:data:`MATMUL_MODES`); returns how many layers.

    Raises:
        ConfigError: another mode.
    """
    if mode not in MATMUL_MODES:
        raise ConfigError(f"matmul must be one of {', '.join(MATMUL_MODES)}, got {mode!r}")
    count = 0
    for m in model.modules():
        if isinstance(m, QuantModule):
            m.matmul = mode
            count += 1
    return count


def register_quant_module(cls: M) -> M:
    """Class decorator: make a :class:`QuantModule` subclass loadable under its ``layer_type``."""
    if not cls.layer_type or cls.layer_type in QUANT_MODULES:
        raise ConfigError(f"quantized layer type '{cls.layer_type}' is empty or already registered")
    QUANT_MODULES[cls.layer_type] = cls
    return cls


class QuantModule(nn.Module):
    """Base of the quantized layers: a list of :class:`QuantTerm` plus a float bias.

    Subclasses set :attr:`layer_type`, implement :meth:`module_args`, :meth:`_from_args`, :meth:`_forward` and
    :meth:`matches_float`.

    Args:
        terms: the terms, in oriented layout; their sum is the weight.
        bias: ``(out,)`` float bias or None.
        weight_shape: the oriented weight shape ``(out, in, *kernel)``.
        dtype: the dtype the dequantized weight is computed in (the original weight's).
        cache_weight: keep the dequantized weight after the first use (see the module docstring).
    """

    layer_type: ClassVar[str] = ""
    #: Whether the layer type can have a bias (an embedding cannot).
    has_bias: ClassVar[bool] = True
    bias: nn.Parameter | None
    outliers: Any  # a dfquant.nn.rex.SparseTerm or None
    input_quant: ActQuant | None
    #: The rotation the terms were fitted in (:mod:`dfquant.methods.rotate`): the weight is ``(sum of terms) R``.
    rotation: Rotation | None
    #: The column scale of a balanced layer (:mod:`dfquant.methods.balance`): the weight is ``(...) diag(c)``.
    balance: ColumnScale | None
    #: How the layer multiplies (one of :data:`MATMUL_MODES`): ``"auto"`` runs the fused kernel
    #: (:mod:`dfquant.nn.kernel`) where it can (CUDA inputs, Triton installed, terms it takes) and decodes
    #: elsewhere; ``"decode"`` always decodes the weight then multiplies; ``"kernel"`` runs the kernel or fails
    #: naming why (also on CPU tensors under ``TRITON_INTERPRET=1``); ``"int4"`` runs torch's int4 CPU kernel
    #: (uniform 4-bit grids; bfloat16 inputs, see :mod:`dfquant.nn.kernel`) or fails naming why.
    matmul: str

    def __init__(
        self,
        terms: Sequence[QuantTerm],
        bias: torch.Tensor | None,
        *,
        weight_shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        cache_weight: bool = True,
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.dtype = dtype
        self.cache_weight = cache_weight
        self.terms = nn.ModuleList()
        self._cached: torch.Tensor | None = None
        # REx extras (see dfquant.nn.rex): a sparse outlier residual and an input expansion, absent by default
        self.register_module("outliers", None)
        self.input_spec: Any = None
        self.register_module("input_quant", None)  # an ActQuant set by quantization-aware training (dfquant.qat.fake)
        self.rotation = None
        self.register_module("balance", None)
        self.matmul = "auto"
        self._kernel_weights: dict[str, list[Any]] = {}
        for t in terms:
            self.add_term(t)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- terms and the weight -------------------------------------------------------------------------------
    def add_term(self, term: QuantTerm) -> None:
        """Append a term (e.g. a residual expansion order); drops the cached weight.

        Raises:
            InputError: a term whose shape does not fit the weight.
        """
        expect = self.weight_shape if term.channels is None else (term.shape[0], *self.weight_shape[1:])
        if term.shape != tuple(expect):
            raise InputError(
                f"a term of shape {term.shape} does not fit a {self.layer_type} weight of shape {self.weight_shape}"
            )
        self.terms.append(term)
        self.clear_cache()

    @property
    def quant_terms(self) -> list[QuantTerm]:
        """The terms, typed."""
        return [t for t in self.terms if isinstance(t, QuantTerm)]

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight (it is rebuilt from the terms on the next use)."""
        self._cached = None
        self.__dict__.pop("_order_cache", None)
        self.__dict__.get("_kernel_weights", {}).clear()

    def dequantize_weight(self) -> torch.Tensor:
        """``sum_k term_k`` in oriented layout, summed in float32 in term order starting from zero, then cast
        to :attr:`dtype`.

        A first term covering every channel is decoded straight into the sum as ``0.0 + term`` (no zero
        tensor, no extra pass; same values bit for bit).
        """
        terms = self.quant_terms
        device = terms[0].scale.device if terms else torch.device("cpu")
        if terms and terms[0].channels is None:
            w = terms[0]._decode(from_zero=True).contiguous()
            terms = terms[1:]
        else:
            w = torch.zeros(self.weight_shape, dtype=torch.float32, device=device)
        for t in terms:
            w = t.add_to(w)
        if self.outliers is not None:
            w = self.outliers.add_to(w)
        if self.rotation is not None:
            w = self.rotation.undo(w)
        if self.balance is not None:
            w = self.balance.undo(w)
        return w.to(self.dtype)

    def dequantize_weight_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """``dequantize_weight()[rows]`` decoding only those rows (axis 0: output channels, or tokens of an
        embedding): int64 indices ``(k,)`` in range, in any order; the result is ``(k, *weight_shape[1:])`` in
        :attr:`dtype`, the same values bit for bit.

        Every element of the weight is ``0 + term_1 + ... + term_K (+ outlier)``, each term element decoded
        from its own group's parameters (:meth:`QuantTerm.dequantize_rows`); a channel-subset term adds its
        values to the rows it covers (``index_add``, as the full sum does) and the outlier residual adds the
        outliers that fall in the rows.

        Returns:
            The rows, or None when a term's granularity does not run along axis 0 (only the full weight can be
            decoded then).
        """
        terms = self.quant_terms
        n0 = self.weight_shape[0]
        device = terms[0].scale.device if terms else rows.device
        rows = rows.to(device=device, dtype=torch.int64).reshape(-1)
        uniq, inverse = torch.unique(rows, return_inverse=True)
        if uniq.numel() < rows.numel():  # decode each row once
            once = self.dequantize_weight_rows(uniq)
            return None if once is None else once.index_select(0, inverse)
        k = rows.numel()
        w: torch.Tensor | None = None
        for t in terms:
            if t.channels is None:
                vals = t.dequantize_rows(rows, from_zero=w is None)
                if vals is None:
                    return None
                w = vals if w is None else w + vals
                continue
            if w is None:
                w = torch.zeros((k, *self.weight_shape[1:]), dtype=torch.float32, device=device)
            channels = t.channels.to(device)
            pos = torch.full((n0,), -1, dtype=torch.int64, device=device)
            pos[channels] = torch.arange(channels.numel(), device=device)
            at = pos[rows]  # each requested row's position in the term, -1 where the term does not cover it
            hit = (at >= 0).nonzero().reshape(-1)
            vals = t.dequantize_rows(at[hit])
            if vals is None:
                return None
            w = w.index_add(0, hit, vals)
        if w is None:
            w = torch.zeros((k, *self.weight_shape[1:]), dtype=torch.float32, device=device)
        if self.outliers is not None:
            res = self.outliers.to_residual()
            cols = math.prod(self.weight_shape[1:])
            slot = torch.full((n0,), -1, dtype=torch.int64, device=device)
            slot[rows] = torch.arange(k, device=device)
            src = res.index.to(device)
            at = slot[src // cols]  # the requested row each outlier falls in, -1 for the others
            sel = (at >= 0).nonzero().reshape(-1)
            flat = w.reshape(-1).index_add(0, at[sel] * cols + src[sel] % cols, res.values().to(device)[sel])
            w = flat.view(w.shape)
        if self.rotation is not None:  # R acts on each row alone: the rows of (sum) R are (rows of sum) R
            w = self.rotation.undo(w)
        if self.balance is not None:  # so does diag(c)
            w = self.balance.undo(w)
        return w.to(self.dtype)

    def quantized_weight(self) -> torch.Tensor:
        """The dequantized weight, from the cache when enabled (oriented layout)."""
        if self._cached is not None:
            return self._cached
        w = self.dequantize_weight()
        if self.cache_weight:
            self._cached = w
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the float layer's own layout (read-only view for code that reads
        ``layer.weight``)."""
        return self.quantized_weight()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> QuantModule:
        """Moves and casts (``.to()``, ``.half()``, ...) apply to the bias and set the dtype the weight is
        rebuilt in; the terms keep their stored dtypes (scales and offsets in their storage dtype, levels in
        float32), only their device follows, so a cast never changes the decoded values."""
        self.clear_cache()
        probe = fn(torch.zeros((), dtype=self.dtype))
        out = super()._apply(fn, recurse=False)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.dtype = probe.dtype
        if recurse:
            if isinstance(probe, torch.Tensor):
                device = probe.device
                for child in self.children():
                    child._apply(lambda t: t.to(device), recurse=True)
            else:
                for child in self.children():
                    child._apply(fn, recurse=True)
        return out

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cached"] = None  # a deep copy or pickle never carries the cache
        state["_kernel_weights"] = {}
        state.pop("_order_cache", None)
        return state

    # -- accounting -----------------------------------------------------------------------------------------
    def storage_bits(self) -> int:
        """Bits of all terms as :meth:`QTensor.storage_bits` counts them."""
        extra = self.outliers.storage_bits() if self.outliers is not None else 0
        extra += self.balance.storage_bits() if self.balance is not None else 0
        return sum(t.storage_bits() for t in self.quant_terms) + extra

    def bits_per_weight(self) -> float:
        """Storage bits of all terms over the number of weights."""
        return self.storage_bits() / max(math.prod(self.weight_shape), 1)

    def nbytes(self) -> int:
        """Bytes the terms occupy in a file (packed codes, scales, offsets, levels, indices; a column scale)."""
        extra = self.outliers.nbytes() if self.outliers is not None else 0
        extra += self.balance.nbytes() if self.balance is not None else 0
        return sum(t.nbytes() for t in self.quant_terms) + extra

    def resident_bytes(self) -> int:
        """Bytes the layer keeps for its weight now: the terms (:meth:`nbytes`), plus the cached decoded weight
        and the kernels' repacked copies when present."""
        total = self.nbytes()
        if self._cached is not None:
            total += self._cached.numel() * self._cached.element_size()
        for packed in self._kernel_weights.values():
            for w in packed:
                total += sum(t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))
        return total

    # -- description ----------------------------------------------------------------------------------------
    def module_args(self) -> dict[str, Any]:
        """JSON-ready constructor arguments of the float layer (sizes, stride, padding, ...)."""
        raise NotImplementedError

    def layer_meta(self) -> dict[str, Any]:
        """JSON-ready description of this layer for a file's manifest."""
        meta = {
            "type": self.layer_type,
            "module": self.module_args(),
            "weight_shape": list(self.weight_shape),
            "dtype": dtype_name(self.dtype),
            "bias": self.bias is not None,
            "terms": [t.meta() for t in self.quant_terms],
        }
        if self.outliers is not None:  # optional keys (dfquant.nn.rex); absent in plain layers
            meta["outliers"] = self.outliers.meta()
        if self.input_spec is not None:
            meta["act"] = self.input_spec.to_dict()
        if self.input_quant is not None:
            meta["input_quant"] = self.input_quant.meta()
        if self.rotation is not None:
            meta["rotation"] = self.rotation.meta()
        if self.balance is not None:
            meta["balance"] = True
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], *, cache_weight: bool = True) -> QuantModule:
        """An empty quantized layer (zero buffers) described by ``layer_meta()`` output, dispatched on its
        ``type`` through :data:`QUANT_MODULES`.

        Raises:
            ConfigError: an unknown type or inconsistent metadata.
        """
        kind = meta["type"]
        sub = QUANT_MODULES.get(kind) if isinstance(kind, str) else None
        if sub is None:
            raise ConfigError(f"unknown quantized layer type {kind!r}; known: {', '.join(QUANT_MODULES)}")
        dtype = DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
        if dtype is None:
            raise ConfigError(f"unknown dtype {meta['dtype']!r}; allowed: {', '.join(DTYPES)}")
        mod = sub._from_args(dict(meta["module"]), dtype, cache_weight)
        if list(mod.weight_shape) != list(meta["weight_shape"]):
            raise ConfigError(
                f"weight_shape {meta['weight_shape']} does not match the layer arguments (expected "
                f"{list(mod.weight_shape)})"
            )
        for tm in meta["terms"]:
            mod.add_term(QuantTerm.from_meta(tm))
        if meta.get("outliers") is not None or meta.get("act") is not None:
            if meta.get("outliers") is not None:
                mod.outliers = SparseTerm.from_meta(meta["outliers"], mod.weight_shape)
            if meta.get("act") is not None:
                mod.input_spec = InputSpec.from_dict(meta["act"])
        if meta.get("input_quant") is not None:
            mod.input_quant = ActQuant.from_meta(meta["input_quant"])
        if meta.get("rotation") is not None:
            mod.rotation = Rotation.from_meta(meta["rotation"])
        if meta.get("balance", False) is True:
            mod.balance = ColumnScale.empty(math.prod(mod.weight_shape[1:]))
        if meta["bias"] and not sub.has_bias:
            raise ConfigError(f"a {kind} layer has no bias, but the metadata say it has one")
        if meta["bias"]:
            mod.bias = nn.Parameter(torch.zeros(mod.weight_shape[0], dtype=dtype), requires_grad=False)
        return mod

    @classmethod
    def _from_args(cls, args: dict[str, Any], dtype: torch.dtype, cache_weight: bool) -> QuantModule:
        raise NotImplementedError

    @classmethod
    def from_float(cls, layer: nn.Module, terms: Sequence[QuantTerm], *, cache_weight: bool = True) -> QuantModule:
        """The quantized counterpart of float ``layer`` (dispatched on its kind), holding ``terms`` and a copy
        of its bias.

        Raises:
            ConfigError: a layer type that has no quantized counterpart.
        """
        kind = layer_kind(layer)
        sub = QUANT_MODULES.get(kind) if kind is not None else None
        if sub is None:
            raise ConfigError(f"layers of type {type(layer).__name__} have no quantized counterpart")
        w = oriented_weight(layer)
        mod = sub._from_args(sub.args_of(layer), w.dtype, cache_weight)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        for t in terms:
            mod.add_term(t)
        return mod

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict[str, Any]:
        """The :meth:`module_args` of a float layer of this kind."""
        raise NotImplementedError

    def matches_float(self, layer: nn.Module) -> bool:
        """Whether float ``layer`` is the layer this one replaces (same kind and arguments)."""
        return layer_kind(layer) == self.layer_type and type(self).args_of(layer) == self.module_args()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.input_spec is not None:
            return input_expanded_forward(self, x)
        if self.matmul != "decode":
            path, why = self.matmul_path(x.device)
            if path == "kernel":
                return self._kernel_forward(x)
            if path == "int4":
                return self._int4_forward(x)
            if self.matmul in ("kernel", "int4"):
                raise ConfigError(f"{self.layer_type} layer {self.weight_shape}: matmul={self.matmul!r}, but {why}")
        return self._forward(x, self.quantized_weight())

    def matmul_path(self, device: torch.device | str) -> tuple[str, str]:
        """``("kernel", "")`` when a forward on ``device`` runs the fused kernel, else ``("decode", why)``."""
        dev = torch.device(device)
        if self.matmul == "decode":
            return "decode", "matmul='decode'"
        if self.layer_type not in ("linear", "hf-conv1d"):
            return "decode", f"the kernel multiplies linear layers, not {self.layer_type}"
        if self.outliers is not None or self.input_spec is not None or self.input_quant is not None:
            return "decode", "an outlier residual or an input quantizer"
        if self.matmul == "int4":
            if dev.type != "cpu":
                return "decode", f"a {dev.type} input (the int4 kernel runs on the CPU)"
            if len(self.quant_terms) != 1:
                return "decode", f"{len(self.quant_terms)} terms (the int4 kernel takes one)"
            why_int4 = kernel.int4_cpu_reason(self.quant_terms[0])
            return ("int4", "") if why_int4 is None else ("decode", why_int4)
        if not kernel.available():
            return "decode", "Triton is not installed (pip install 'dfquant[kernels]')"
        if dev.type != "cuda" and not (self.matmul == "kernel" and kernel.interpreted()):
            return "decode", f"a {dev.type} input (the kernel runs on CUDA)"
        if not self.quant_terms:
            return "decode", "no terms"
        for t in self.quant_terms:
            why = kernel.unsupported_reason(t)
            if why is not None:
                return "decode", why
        return "kernel", ""

    def _int4_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's int4 CPU kernel on the one term (repacked once), the input rotated first when needed."""
        packed = self._kernel_weights.get("int4")
        if packed is None:
            packed = [kernel.pack_int4_cpu(self.quant_terms[0])]
            self._kernel_weights["int4"] = packed
        y = kernel.int4_cpu_matmul(self._transformed_input(x), packed[0])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_k lut_matmul(x', term_k) + b``: each term multiplied from its packed codes (repacked once per
        device), ``x'`` the input scaled and rotated as the terms need (:meth:`_transformed_input`)."""
        key = str(x.device)
        kws = self._kernel_weights.get(key)
        if kws is None:
            kws = [kernel.pack_for_kernel(t, x.device) for t in self.quant_terms]
            self._kernel_weights[key] = kws
        xin = self._transformed_input(x)
        y = kernel.lut_matmul(xin, kws[0])
        for kw in kws[1:]:
            y = y + kernel.lut_matmul(xin, kw)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the terms multiply: ``x`` scaled by the column scale, then rotated (the terms hold
        ``(W diag(1/c)) R^T``)."""
        if self.balance is not None:
            x = self.balance.scale_input(x)
        return x if self.rotation is None else self.rotation.rotate_input(x).to(x.dtype)

    def _forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        desc = ", ".join(f"{k}={v}" for k, v in self.module_args().items())
        return f"{desc}, bias={self.bias is not None}, terms={len(self.terms)}, cache_weight={self.cache_weight}"
