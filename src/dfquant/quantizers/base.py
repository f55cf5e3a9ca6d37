"""The quantizer contract, written once: layout (tensor / channel / group), encode, decode, QTensor.

A quantizer is a named, stateless rule. Its only job is :meth:`Quantizer.fit`: given ``m`` groups of equal length
as a float32 ``(m, g)`` matrix, return per-group ``scale``, ``offset`` and the unit-scale levels (one grid shared
by all groups, or one codebook per group). Everything else lives here:

* layout: the tensor is viewed as rows (one row for per-tensor, one per channel along ``axis`` otherwise), each
  row split into groups of ``group_size`` (the last group of a row may be shorter: it is fitted on its true
  elements, as a second batch of equal-length groups);
* encoding: ``z = (x - offset) / scale``, nearest level (saturating, ties to even); a group whose scale is 0
  (constant or all-zero) decodes exactly to its offset;
* decoding: ``x_hat = levels[code] * scale + offset``.

The caller's tensor is never modified; all statistics are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from dfquant.errors import ConfigError, InputError, check_finite
from dfquant.grids.formats import Grid
from dfquant.quantizers.codes import QParams, describe, merge_tables, round_params
from dfquant.quantizers.encoding import encode_rows_fast
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import QTensor, group_batches, parse_scale_dtype, to_rows

# ----------------------------------------------------------------------------------------------------------------
# Quantizer


#: Values of the ``weighting`` option of rules that take importance weights.
WEIGHTINGS = ("none", "input-variance")


class Quantizer(ABC):
    """A named rule that fits per-group scale/offset/levels for a tensor.

    Subclasses set :attr:`name`, may restrict :attr:`supported_bits`, and implement :meth:`fit`. Optionally they
    implement :meth:`expected_mse` (the error model: expected MSE for a unit-variance Gaussian or Laplace source)
    and :meth:`unit_levels` (the levels used for a unit-variance source, where they are fixed).

    Args:
        bits: code bits.
        **options: rule-specific options (validated by the subclass; unknown ones raise ConfigError).
    """

    name: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[int, ...]] = tuple(range(1, 9))
    options_allowed: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    #: Whether the rule can minimize an importance-weighted squared error (:meth:`fit_weighted`).
    supports_importance: ClassVar[bool] = False
    #: Whether the rule fits, encodes and decodes on the input's device (a CUDA tensor stays on the GPU). The
    #: others fit on the CPU, where their fits use numpy and scipy, and return CPU tensors whatever the input's
    #: device: :meth:`quantize` moves the input there first.
    runs_on_device: ClassVar[bool] = False

    def __init__(self, bits: int, **options: Any) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in self.supported_bits:
            allowed = ", ".join(str(b) for b in self.supported_bits)
            raise ConfigError(f"quantizer '{self.name}' supports bits in {{{allowed}}}, got {bits!r}")
        unknown = sorted(set(options) - set(self.options_allowed))
        if unknown:
            allowed_opts = ", ".join(self.options_allowed) or "none"
            raise ConfigError(f"quantizer '{self.name}' got unknown option(s) {unknown}; allowed: {allowed_opts}")
        self.bits = bits
        self.options = dict(options)
        #: ``"input-variance"``: the rule minimizes the importance-weighted error the pipeline supplies (only
        #: for rules that set :attr:`supports_importance`, which then accept the ``weighting`` option).
        self.weighting = "none"
        if self.supports_importance:
            weighting = self.options.get("weighting", "none")
            if weighting not in WEIGHTINGS:
                raise ConfigError(
                    f"quantizer '{self.name}': weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}"
                )
            self.weighting = str(weighting)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in sorted(self.options.items()))
        return f"{type(self).__name__}(bits={self.bits}{opts})"

    # -- to implement -------------------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, x: torch.Tensor) -> QParams:
        """Fit ``m`` groups given as a finite float32 ``(m, g)`` matrix; return their :class:`QParams`."""

    def fit_weighted(self, x: torch.Tensor, importance: torch.Tensor) -> QParams:
        """Fit ``m`` groups minimizing ``sum_i importance_i (x_i - x_hat_i)^2`` (``importance``: non-negative,
        the shape of ``x``). Implemented by rules that set :attr:`supports_importance`."""
        raise ConfigError(f"quantizer '{self.name}' takes no importance weights")

    @property
    def wants_importance(self) -> bool:
        """Whether this configured rule asks the pipeline for importance weights of the weight's elements
        (:func:`dfquant.quantize_model` supplies them where the layer's input statistics are known): rules
        that support them, configured with ``weighting="input-variance"``."""
        return self.supports_importance and self.weighting != "none"

    @property
    def grid(self) -> Grid | None:
        """The fixed grid this rule encodes on, or None when levels are fitted per group."""
        return None

    @property
    def grid_name(self) -> str:
        g = self.grid
        return g.name if g is not None else f"{self.name}{self.bits}"

    def expected_mse(self, dist: str, group_size: int | None = None) -> float:
        """Expected squared error for a unit-variance ``dist`` source, in groups of ``group_size`` samples where
        the rule's clip depends on the sample (None: the population limit). Raise NotImplementedError when the
        rule has no error model."""
        raise NotImplementedError(f"quantizer '{self.name}' has no error model")

    def unit_levels(self, dist: str, group_size: int | None = None) -> torch.Tensor | None:
        """The levels (at scale, i.e. in units of the source's standard deviation) this rule uses for a
        unit-variance ``dist`` source, or None when they depend on the sample."""
        return None

    # -- written once -------------------------------------------------------------------------------------------
    def quantize(
        self,
        x: torch.Tensor,
        granularity: str | Granularity = "channel",
        name: str = "tensor",
        *,
        scale_dtype: str | torch.dtype = torch.float32,
        importance: torch.Tensor | None = None,
    ) -> QTensor:
        """Quantize ``x`` at ``granularity``.

        Args:
            x: float tensor (float32, float16 or bfloat16), not modified.
            granularity: see :class:`Granularity`.
            name: the tensor's name, used in error messages.
            scale_dtype: the dtype per-group scales and offsets are stored in (see :data:`SCALE_DTYPES`). The
                fitted scales and offsets are rounded to it *before* encoding, so the codes are chosen for the
                values that are stored and ``dequantize`` gives exactly what a saved file decodes to; the
                returned ``QTensor`` holds them in that dtype (and counts their bits accordingly).
            importance: optional non-negative weights of ``x``'s elements (same shape): the rule then
                minimizes the weighted squared error (:meth:`fit_weighted`; only rules that set
                :attr:`supports_importance`).

        Returns:
            A :class:`QTensor`.

        Raises:
            InputError: empty, non-floating or non-finite input.
            ConfigError: a granularity that does not fit the tensor, an unknown ``scale_dtype``, or a scale or
                offset too large for it.
        """
        gran = Granularity.parse(granularity)
        sdtype = parse_scale_dtype(scale_dtype)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"tensor '{name}' must be a floating-point torch.Tensor, got {describe(x)}")
        if x.numel() == 0:
            raise InputError(f"tensor '{name}' is empty (shape {tuple(x.shape)}); nothing to quantize")
        if gran.kind != "tensor" and x.dim() == 0:
            gran = Granularity("tensor")
        device = x.device if self.runs_on_device else torch.device("cpu")
        xf = x.detach().to(device=device, dtype=torch.float32)
        check_finite(xf, name)
        rows = to_rows(xf, gran)
        R, n = rows.shape
        G = gran.group_size if gran.kind == "group" else None
        glen = G if G is not None and n > G else n
        ngr = -(-n // glen)
        scale = torch.empty(R, ngr, device=xf.device)
        offset = torch.empty(R, ngr, device=xf.device)
        parts: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        info: dict[str, torch.Tensor] = {}
        split = G if G is not None and n > G else None
        batches = group_batches(rows, split)
        weights = self._importance_batches(importance, x, gran, name, split) or [None] * len(batches)
        for (batch, cols), w in zip(batches, weights, strict=True):
            p = self.fit(batch.contiguous()) if w is None else self.fit_weighted(batch.contiguous(), w)
            g0, g1 = cols.start // glen, -(-cols.stop // glen)
            scale[:, g0:g1] = p.scale.reshape(R, g1 - g0)
            offset[:, g0:g1] = p.offset.reshape(R, g1 - g0)
            tab, idx = p.tables()
            parts.append((tab.to(device=device, dtype=torch.float32), idx.to(device).reshape(R, g1 - g0), g0, g1))
            for k, v in p.info.items():
                dest = info.setdefault(k, torch.empty(R, ngr, device=xf.device))
                dest[:, g0:g1] = v.reshape(R, g1 - g0).to(torch.float32)
        scale, offset = round_params(scale, offset, sdtype, name)
        levels, table_index = merge_tables(parts, R, ngr)
        codes = self.encode(rows, scale.to(torch.float32), offset.to(torch.float32), levels, glen, table_index)
        off = offset if bool((offset != 0).any()) else None
        return QTensor(
            codes=codes,
            scale=scale,
            offset=off,
            levels=levels,
            bits=self.bits,
            shape=tuple(x.shape),
            granularity=gran,
            dtype=x.dtype,
            quantizer=self.name,
            grid=self.grid_name,
            info=info,
            table_index=table_index,
        )

    def encode(
        self,
        rows: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        levels: torch.Tensor,
        glen: int,
        table_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Codes of ``(R, n)`` rows for the fitted float32 ``(R, ngr)`` scales/offsets: those of
        :func:`encode_rows`, by lookup table (:func:`dfquant.quantizers.encoding.encode_rows_fast`). A rule may
        override it with its own exact encoder."""

        return encode_rows_fast(rows, scale, offset, levels, glen, table_index)

    def _importance_batches(
        self,
        importance: torch.Tensor | None,
        x: torch.Tensor,
        gran: Granularity,
        name: str,
        split: int | None,
    ) -> list[torch.Tensor | None] | None:
        """The importance weights laid out in the batches of :func:`group_batches`, after checks."""
        if importance is None:
            return None
        if not self.supports_importance:
            raise ConfigError(f"quantizer '{self.name}' takes no importance weights")
        if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != tuple(x.shape):
            raise InputError(
                f"importance weights of tensor '{name}' must be a tensor of shape {tuple(x.shape)}, got "
                f"{describe(importance)}"
            )
        imp = importance.detach().to(device=x.device if self.runs_on_device else "cpu", dtype=torch.float32)
        check_finite(imp, f"{name} importance")
        if bool((imp < 0).any()):
            raise InputError(f"importance weights of tensor '{name}' must be non-negative")
        return [b.contiguous() for b, _ in group_batches(to_rows(imp, gran), split)]

    def fake_quantize(
        self, x: torch.Tensor, granularity: str | Granularity = "channel", name: str = "tensor"
    ) -> torch.Tensor:
        """``dequantize(quantize(x))`` in ``x``'s dtype."""
        return self.quantize(x, granularity, name).dequantize()

    def with_options(self, **options: Any) -> Quantizer:
        """A copy of this rule with some options changed."""
        return type(self)(self.bits, **{**self.options, **options})
