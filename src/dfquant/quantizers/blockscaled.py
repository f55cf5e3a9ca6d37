"""Block-scaled FP4: ``mxfp4`` (OCP Microscaling) and ``nvfp4`` (NVIDIA), as quantizer rules.

Both store FP4 E2M1 elements (levels ``0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6``) with one shared scale per block
of consecutive elements along each row (the reduction dimension of a weight):

* ``mxfp4`` (OCP Microscaling Formats (MX) Specification v1.0, 2023, section 6.3): blocks of 32, scale an E8M0
  power of two ``X = 2^(floor(log2 amax) - 2)`` (``2`` is the exponent of E2M1's largest normal, 6 = 1.5 * 2^2);
  elements ``cast_E2M1(x / X)``, saturating at +-6. A block of zeros gets ``X = 2^-127``. Storage: 4 bits per
  element plus 8 per 32 elements = 4.25 bits per weight.
* ``nvfp4`` (NVIDIA, "NVFP4" in the Blackwell / TensorRT Model Optimizer documentation): blocks of 16, an FP32
  per-tensor scale ``g = amax_tensor / (6 * 448)`` and per block an E4M3 scale ``s_b = cast_E4M3(amax_b / (6 g))``
  (at most 448), elements ``cast_E2M1(x / (s_b g))``. Storage: 4 + 8/16 = 4.5 bits per weight, plus the one FP32
  ``g`` per tensor. The tensor scale is folded into the stored level table (``levels = E2M1 * g``), so a value
  decodes as ``levels[code] * s_b`` like every other term.

Scales are kept in their format's dtype (``float8_e8m0fnu`` / ``float8_e4m3fn``), so files and
:meth:`QTensor.bits_per_weight` count 8 bits per block.

Option ``scale``: ``"minmax"`` (default, the formats' definition above: the block maximum on the largest level)
or ``"analytic"``: the StatQAT rule per block, ``amax`` replaced by ``sigma_block * C* `` with ``C*`` the optimal
clip of E2M1 for a unit Gaussian (:func:`dfquant.grids.error_model.optimal_clip`), then cast to the scale format.

Example:
    >>> import torch
    >>> from dfquant import get_quantizer
    >>> qt = get_quantizer("mxfp4", 4).quantize(torch.randn(8, 64))
    >>> qt.bits_per_weight(), str(qt.granularity)
    (4.25, 'group:32')
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch

from dfquant.errors import ConfigError
from dfquant.grids.error_model import optimal_clip
from dfquant.grids.formats import Grid, make_grid
from dfquant.quantizers.base import Quantizer
from dfquant.quantizers.codes import QParams
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import QTensor
from dfquant.quantizers.registry import register

__all__ = ["BLOCK_FORMATS", "MXFP4", "NVFP4", "block_scales", "e4m3_round", "e8m0_scale"]

#: format -> (block size, scale dtype).
BLOCK_FORMATS: dict[str, tuple[int, torch.dtype]] = {
    "mxfp4": (32, torch.float8_e8m0fnu),
    "nvfp4": (16, torch.float8_e4m3fn),
}
E2M1_MAX = 6.0
E2M1_EMAX = 2
E4M3_MAX = 448.0
SCALE_RULES = ("minmax", "analytic")


def e8m0_scale(amax: torch.Tensor) -> torch.Tensor:
    """MX shared scale ``2^(floor(log2 amax) - 2)``, clamped to E8M0's ``2^-127 .. 2^127`` (float32, exact).

    ``amax = 0`` gives ``2^-127``.
    """
    a = amax.to(torch.float32)
    _, ex = torch.frexp(a)  # a = m 2^ex with m in [0.5, 1): floor(log2 a) = ex - 1
    e = torch.where(a > 0, ex - 1 - E2M1_EMAX, torch.full_like(ex, -127)).clamp(-127, 127)
    return torch.ldexp(torch.ones_like(a), e)


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to FP8 E4M3 (round to nearest even, saturating at 448), back in float32."""
    return v.to(torch.float32).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def nvfp4_tensor_scale(amax_tensor: torch.Tensor | float) -> float:
    """NVFP4's FP32 per-tensor scale ``amax / (6 * 448)`` (1 for an all-zero tensor)."""
    a = float(amax_tensor)
    return a / (E2M1_MAX * E4M3_MAX) if a > 0 else 1.0


def block_scales(blocks: torch.Tensor, fmt: str, *, tensor_scale: float = 1.0, rule: str = "minmax") -> torch.Tensor:
    """The per-block scale (float32, exactly representable in the format's scale dtype) of ``(m, B)`` blocks.

    For ``nvfp4`` the result is ``s_b`` (the element scale is ``s_b * tensor_scale``); for ``mxfp4`` it is the
    power of two ``X``. ``rule="analytic"`` replaces the block maximum by ``sigma * C*`` (see the module
    docstring). Gradients do not flow through the result.
    """
    b = blocks.detach().to(torch.float32)
    if rule == "analytic":
        rms = b.pow(2).mean(dim=1).sqrt()
        amax = rms * optimal_clip(make_grid("fp4_e2m1"), "gaussian").clip
    else:
        amax = b.abs().amax(dim=1)
    if fmt == "mxfp4":
        return e8m0_scale(amax)
    return e4m3_round(amax / (E2M1_MAX * tensor_scale))


class _BlockFP4(Quantizer):
    """Shared body of the block-scaled FP4 rules (see the module docstring)."""

    fmt: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[int, ...]] = (4,)
    runs_on_device: ClassVar[bool] = True

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        self.scale_rule = str(self.options.get("scale", "minmax"))
        if self.scale_rule not in SCALE_RULES:
            raise ConfigError(
                f"quantizer '{self.name}': scale must be one of {', '.join(SCALE_RULES)}, got '{self.scale_rule}'"
            )
        self._grid = make_grid("fp4_e2m1")
        self.block, self.scale_dtype = BLOCK_FORMATS[self.fmt]

    @property
    def grid(self) -> Grid:
        return self._grid

    @property
    def grid_name(self) -> str:
        return self.name

    def block_granularity(self, granularity: str | Granularity) -> Granularity:
        """``group:B`` along the requested axis (``channel[:AXIS]`` is read as ``group:B[:AXIS]``).

        Raises:
            ConfigError: per-tensor granularity or another group size.
        """
        gran = Granularity.parse(granularity)
        if gran.kind == "tensor" or (gran.kind == "group" and gran.group_size != self.block):
            raise ConfigError(
                f"quantizer '{self.name}' uses blocks of {self.block}: granularity must be 'channel[:AXIS]' or "
                f"'group:{self.block}[:AXIS]', got '{gran}'"
            )
        return Granularity("group", gran.axis, self.block)

    def _tensor_scale(self) -> float:
        return 1.0

    def fit(self, x: torch.Tensor) -> QParams:
        g = self._tensor_scale()
        scale = block_scales(x, self.fmt, tensor_scale=g, rule=self.scale_rule)
        levels = self._grid.table.to(torch.float32) * g
        return QParams(scale=scale, offset=torch.zeros_like(scale), levels=levels)

    def quantize(
        self,
        x: torch.Tensor,
        granularity: str | Granularity = "channel",
        name: str = "tensor",
        *,
        scale_dtype: str | torch.dtype = torch.float32,
        importance: torch.Tensor | None = None,
    ) -> QTensor:
        """As :meth:`Quantizer.quantize`, in blocks of the format's size, with the scales stored in the format's
        scale dtype (``scale_dtype`` is not used: the format fixes it)."""
        gran = self.block_granularity(granularity)
        qt = super().quantize(x, gran, name, importance=importance)
        stored = qt.scale.to(self.scale_dtype)
        if not torch.equal(stored.to(torch.float32), qt.scale.to(torch.float32)):  # exact by construction
            raise ConfigError(f"tensor '{name}': a block scale is not representable in {self.scale_dtype}")
        return replace(qt, scale=stored)

    def bits_per_weight_nominal(self) -> float:
        """``4 + 8 / B``: the element bits plus one 8-bit scale per block."""
        return 4 + 8 / self.block


@register
class MXFP4(_BlockFP4):
    """OCP MXFP4: blocks of 32 FP4 E2M1 elements sharing an E8M0 power-of-two scale (4.25 bits per weight).

    Options:
        scale: ``"minmax"`` (default; the MX definition) or ``"analytic"`` (sigma times the optimal clip).
    """

    name = "mxfp4"
    fmt = "mxfp4"
    description = "OCP MXFP4: FP4 E2M1 in blocks of 32 with an E8M0 power-of-two scale (4.25 bits/weight)"
    options_allowed: ClassVar[tuple[str, ...]] = ("scale",)


@register
class NVFP4(_BlockFP4):
    """NVIDIA NVFP4: blocks of 16 FP4 E2M1 elements with an E4M3 scale, plus one FP32 scale per tensor.

    Options:
        scale: ``"minmax"`` (default) or ``"analytic"``.
        tensor_amax: the tensor maximum the FP32 scale comes from (default: measured on the tensor being
            quantized; :meth:`quantize` fills it in).
    """

    name = "nvfp4"
    fmt = "nvfp4"
    description = "NVIDIA NVFP4: FP4 E2M1 in blocks of 16 with an E4M3 scale and an FP32 tensor scale (4.5 bits/weight)"
    options_allowed: ClassVar[tuple[str, ...]] = ("scale", "tensor_amax")

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        amax = self.options.get("tensor_amax")
        if amax is not None and (isinstance(amax, bool) or not isinstance(amax, (int, float)) or not amax >= 0):
            raise ConfigError(f"quantizer 'nvfp4': tensor_amax must be a number >= 0, got {amax!r}")

    def _tensor_scale(self) -> float:
        amax = self.options.get("tensor_amax")
        if amax is None:
            raise ConfigError("quantizer 'nvfp4': fit needs tensor_amax (quantize() measures it)")
        return nvfp4_tensor_scale(float(amax))

    def quantize(
        self,
        x: torch.Tensor,
        granularity: str | Granularity = "channel",
        name: str = "tensor",
        *,
        scale_dtype: str | torch.dtype = torch.float32,
        importance: torch.Tensor | None = None,
    ) -> QTensor:
        measurable = isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 0
        if self.options.get("tensor_amax") is None and measurable and bool(torch.isfinite(x).all()):
            amax = float(x.detach().abs().max().float())
            rule = self.with_options(tensor_amax=amax)
            assert isinstance(rule, NVFP4)
            return rule.quantize(x, granularity, name, importance=importance)
        return super().quantize(x, granularity, name, scale_dtype=scale_dtype, importance=importance)


def round_to_levels(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest of the increasing ``levels`` to each value of ``z`` (saturating; a value exactly between two levels
    goes to the lower one). The same values whatever calls it, so a fake-quantized model and the model converted
    from it compute alike."""
    lv = levels.to(device=z.device, dtype=z.dtype)
    mids = (lv[1:] + lv[:-1]) * 0.5
    return lv[torch.bucketize(z, mids)]


def fake_quantize_blocks(
    x: torch.Tensor, fmt: str, axis: int, *, tensor_scale: float | torch.Tensor = 1.0, rule: str = "minmax"
) -> torch.Tensor:
    """``x`` through ``fmt`` (``mxfp4`` or ``nvfp4``) in blocks along ``axis`` (the last block of a row may be
    shorter), scales computed from each block (dynamic quantization, as for activations). No gradient flows
    (wrap it in a straight-through estimator for training).

    Returns the dequantized values ``E2M1(x / S) * S`` with ``S = X`` (MXFP4) or ``S = s_b * g`` (NVFP4).
    """
    block = BLOCK_FORMATS[fmt][0]
    xm = x.detach().to(torch.float32).movedim(axis, -1)
    shape = xm.shape
    n = shape[-1]
    nb = -(-n // block)
    rows = xm.reshape(-1, n)
    if nb * block != n:
        rows = torch.nn.functional.pad(rows, (0, nb * block - n))
    blocks = rows.reshape(-1, block)
    g = float(tensor_scale)
    s = block_scales(blocks, fmt, tensor_scale=g, rule=rule)
    if fmt == "nvfp4":
        s = s * g
    safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
    levels = make_grid("fp4_e2m1").table.to(torch.float32)
    q = round_to_levels(blocks / safe, levels) * safe
    q = torch.where(s[:, None] > 0, q, torch.zeros_like(q))
    out = q.reshape(-1, nb * block)[:, :n].reshape(shape).movedim(-1, axis)
    return out.to(x.dtype)
