"""Quantization-aware training (QAT) with the statistical quantizers: StatQAT and two baselines.

:func:`prepare_qat` swaps every Linear / Conv1d / Conv2d of a model for a :class:`QATLayer` that computes with
fake-quantized weights (and, when asked, inputs); after training, :func:`convert` turns it into the packed
:class:`~dfquant.nn.base.QuantModule` layers of post-training quantization (same file format,
:func:`dfquant.io.save.save_quantized`), whose outputs equal the fake-quantized model's in eval mode bit for bit.

Methods (Aktukmak, Huang, Ding, "StatQAT: Statistical Quantizer Optimization for Deep Networks", arXiv
2605.17745, and the two baselines it compares with):

* ``statq`` — weights: the analytic rule, recomputed at every step from the current weights,
  ``s = sigma_g * C*(grid, dist) / max|y|`` per group with ``sigma_g = sqrt(mean(w^2))`` (grids without an
  offset are centred on zero) and ``C*`` the optimal clip of the exact error model
  (:func:`dfquant.quantizers.statq.analytic_scale`): no scale parameter, no learning rate on it. Inputs: the
  iterative rule, one least-squares step per forward pass, ``q = round(x / s)``, ``s <- <x, q> / <q, q>``,
  warm-started from min-max (``s_0 = max|x| / max|y|``) and continued from the previous batch's scale; eval uses
  a running average (momentum ``act_momentum``) of the per-batch scales. Per tensor.
* ``minmax`` — weights ``s = max|w_g| / max|y|`` each step; inputs: running average of ``max|x| / max|y|``.
* ``lsq`` — learned step size (Esser et al., "Learned Step Size Quantization", ICLR 2020): ``s`` a parameter per
  weight group and per input tensor, initialised to ``2 mean|x| / sqrt(max|y|)``, gradient scaled by
  ``1 / sqrt(numel * max|y|)``.

Gradients: straight-through estimator passing the gradient only inside the clip range
``[s * min(y), s * max(y)]`` (LSQ: its own estimator, which is the same for the values and also trains ``s``).
Block-scaled formats (``mxfp4``, ``nvfp4``) take their scales from each block as the formats define
(:mod:`dfquant.quantizers.blockscaled`) whatever the method; for inputs they are computed at run time, with
NVFP4's per-tensor scale from a running average of ``max|x|``.

BatchNorms that follow a layer are folded into it first (:func:`fold_model_batchnorms`), as post-training
quantization does, so the trained weights are the weights that get quantized.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> qat = prepare_qat(net, QATConfig(format="int4", act_format="uint4"))
    >>> y = qat(torch.randn(4, 8)); y.sum().backward()
    >>> q = convert(qat.eval())
    >>> x = torch.randn(3, 8)
    >>> torch.equal(q(x), qat(x))
    True
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ConfigError, ModelError
from dfquant.graph.modules import get_module, replace_module
from dfquant.grids.error_model import optimal_clip
from dfquant.grids.formats import Grid, make_grid
from dfquant.nn.act import ActQuant
from dfquant.nn.base import QuantModule, layer_kind, oriented_weight
from dfquant.nn.terms import QuantTerm
from dfquant.pipeline.fold import fold_batchnorms
from dfquant.quantizers import get_quantizer
from dfquant.quantizers.blockscaled import (
    BLOCK_FORMATS,
    block_scales,
    fake_quantize_blocks,
    nvfp4_tensor_scale,
    round_to_levels,
)
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import QTensor, from_rows, to_rows
from dfquant.quantizers.statq import round_to_grid

__all__ = [
    "ALIASES",
    "METHODS",
    "WEIGHT_RULES",
    "ActFakeQuant",
    "QATConfig",
    "QATLayer",
    "WeightFakeQuant",
    "convert",
    "fold_model_batchnorms",
    "parse_format",
    "prepare_qat",
]

METHODS = ("statq", "minmax", "lsq")
#: Weight-scale rules of the ``statq`` method.
WEIGHT_RULES = ("analytic", "iterative")
#: Short format names accepted besides grid names.
ALIASES = {"fp4": "fp4_e2m1", "fp6": "fp6_e2m3", "fp8": "fp8_e4m3", "int2": "int2-mr", "int3": "int3-mr"}
_KINDS = ("linear", "conv1d", "conv2d")


def parse_format(name: str, what: str = "format") -> tuple[str, Grid | None]:
    """``(format name, grid)`` of a format: a grid name (``int4``, ``int2-mr``, ``uint4``, ``fp4_e2m1``, ``nf4``,
    ``fp8_e4m3``, ...; short names :data:`ALIASES`) or a block format (``mxfp4``, ``nvfp4``: grid None).

    Raises:
        ConfigError: an unknown name.
    """
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key in BLOCK_FORMATS:
        return key, None
    try:
        return key, make_grid(key)
    except ConfigError as e:
        raise ConfigError(
            f"{what} '{name}' is not known ({e}); allowed: a grid name such as int4, int2-mr, uint4, fp4_e2m1, nf4, "
            f"fp8_e4m3, short names {', '.join(ALIASES)}, or {', '.join(BLOCK_FORMATS)}"
        ) from None


@dataclass(frozen=True)
class QATConfig:
    """What :func:`prepare_qat` does.

    Attributes:
        method: ``statq`` (default), ``minmax`` or ``lsq`` (see the module docstring).
        format: the weight format (see :func:`parse_format`).
        granularity: weight scales: ``channel`` (default) or ``group:G`` (block formats fix their own blocks).
        act_format: the input format of every quantized layer, or None (inputs stay float).
        dist: the source the analytic weight rule assumes, ``gaussian`` (default) or ``laplace``.
        weight_rule: ``statq`` weights: ``analytic`` (default, the scale from sigma each step) or ``iterative``
            (warm-started from the post-training scale, one least-squares step per training forward).
        act_momentum: weight of the newest batch in the running input scale.
        keep_float: globs of layer names left float (for example the first convolution and the classifier).
        fold_bn: fold BatchNorms into the layer before them first (default True).
    """

    method: str = "statq"
    format: str = "int4"
    granularity: str = "channel"
    act_format: str | None = None
    dist: str = "gaussian"
    weight_rule: str = "analytic"
    act_momentum: float = 0.1
    keep_float: tuple[str, ...] = field(default_factory=tuple)
    fold_bn: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"QAT method must be one of {', '.join(METHODS)}, got '{self.method}'")
        parse_format(self.format)
        if self.act_format is not None:
            parse_format(self.act_format, "act_format")
        if self.dist not in ("gaussian", "laplace"):
            raise ConfigError(f"dist must be 'gaussian' or 'laplace', got '{self.dist}'")
        if self.weight_rule not in WEIGHT_RULES:
            raise ConfigError(f"weight_rule must be one of {', '.join(WEIGHT_RULES)}, got '{self.weight_rule}'")
        if self.weight_rule == "iterative" and self.method != "statq":
            raise ConfigError(f"weight_rule 'iterative' is a statq rule; method '{self.method}' has its own scales")
        if self.weight_rule == "iterative":
            _, grid = parse_format(self.format)
            if grid is None or grid.family == "uint":
                raise ConfigError(
                    f"weight_rule 'iterative' needs a symmetric grid (int, int-mr, fp, nf4), got '{self.format}'"
                )
        if not 0 < self.act_momentum <= 1:
            raise ConfigError(f"act_momentum must be in (0, 1], got {self.act_momentum}")
        Granularity.parse(self.granularity)
        object.__setattr__(self, "keep_float", tuple(self.keep_float))


# ------------------------------------------------------------------------------------------------------------
# Straight-through estimators


class _ClippedSTE(torch.autograd.Function):
    """Forward: the given quantized values; backward: the gradient where ``lo <= x <= hi``, else 0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_hat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return x_hat

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None, None, None


def _ste(x: torch.Tensor, x_hat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    if not x.requires_grad:
        return x_hat
    out: torch.Tensor = _ClippedSTE.apply(x, x_hat, lo, hi)
    return out


def _grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """``s`` in the forward, gradient times ``g`` in the backward (LSQ)."""
    return (s - s * g).detach() + s * g


def _round_pass(z: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``round_to_grid(z)`` in the forward, identity in the backward (LSQ)."""
    return (round_to_grid(z, grid) - z).detach() + z


# ------------------------------------------------------------------------------------------------------------
# Weights


class WeightFakeQuant(nn.Module):
    """Fake quantization of one weight (oriented ``(out, in, *kernel)``) by a QAT method.

    Args:
        shape: the oriented weight shape.
        method: ``statq``, ``minmax`` or ``lsq``.
        fmt: the format name (:func:`parse_format`).
        granularity: ``channel`` or ``group:G`` (block formats use their own blocks).
        dist: the analytic rule's source.
        init: the weight, to initialise LSQ's step sizes and the iterative rule's scales.
        weight_rule: ``analytic`` or ``iterative`` (``statq`` only; see the module docstring).
    """

    levels: torch.Tensor
    wscale: torch.Tensor | None

    def __init__(
        self,
        shape: tuple[int, ...],
        method: str,
        fmt: str,
        granularity: str,
        dist: str,
        init: torch.Tensor,
        weight_rule: str = "analytic",
    ) -> None:
        super().__init__()
        self.method = method
        self.fmt, grid = parse_format(fmt)
        self.shape = tuple(shape)
        self.dist = dist
        if grid is None:
            self.gran = Granularity("group", 0, BLOCK_FORMATS[self.fmt][0])
            self.grid = make_grid("fp4_e2m1")
        else:
            self.gran = Granularity.parse(granularity)
            self.grid = grid
        self.block = grid is None
        rows = to_rows(init.detach().to(torch.float32), self.gran)
        self.n = rows.shape[1]
        G = self.gran.group_size if self.gran.kind == "group" else None
        self.glen = G if G is not None and self.n > G else self.n
        self.ngr = -(-self.n // self.glen)
        self.register_buffer("levels", self.grid.table.to(torch.float32).clone())
        self.ymax = float(max(abs(self.grid.levels[0]), abs(self.grid.levels[-1])))
        self.clip_ratio = optimal_clip(self.grid, dist).scale if not self.block else 0.0
        self.step: nn.Parameter | None = None
        if method == "lsq" and not self.block:
            groups, _ = self._groups(rows)
            s0 = 2 * groups.abs().sum(dim=1) / self._counts(rows.shape[0]) / math.sqrt(self.ymax)
            self.step = nn.Parameter(s0.clamp(min=1e-8))
        self.iterative = method == "statq" and weight_rule == "iterative" and not self.block
        self.register_buffer("wscale", None)
        if self.iterative:
            ptq = get_quantizer("statq", self.grid.bits, format=self.grid.name, rule="iterative")
            qt = ptq.quantize(init.detach().to(torch.float32), str(self.gran))
            self.wscale = qt.scale.to(torch.float32).reshape(-1).clone()

    def _groups(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(R * ngr, glen)`` groups (zero-padded tail) and the padding."""
        pad = self.ngr * self.glen - self.n
        if pad:
            rows = F.pad(rows, (0, pad))
        return rows.reshape(-1, self.glen), pad

    def _counts(self, R: int) -> torch.Tensor:
        """True element count of each group."""
        c = torch.full((R, self.ngr), float(self.glen))
        c[:, -1] = self.n - (self.ngr - 1) * self.glen
        return c.reshape(-1)

    def scales(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(unit values q (groups, glen), scale (groups,), tensor scale g)`` of the oriented weight: the value
        is ``(q * g) * scale`` (``g = 1`` except for NVFP4). No gradient."""
        with torch.no_grad():
            rows = to_rows(w.detach().to(torch.float32), self.gran)
            groups, _ = self._groups(rows)
            g = 1.0
            if self.block:
                if self.fmt == "nvfp4":
                    g = nvfp4_tensor_scale(rows.abs().max())
                s = block_scales(groups, self.fmt, tensor_scale=g)
                ss = s * g
            else:
                if self.iterative:
                    assert self.wscale is not None
                    if self.training and torch.is_grad_enabled():
                        self.wscale.copy_(self._ls_step(groups, self.wscale))
                    s = self.wscale.clone()
                elif self.method == "statq":
                    sigma = (groups * groups).sum(dim=1).div(self._counts(rows.shape[0])).sqrt()
                    s = sigma * self.clip_ratio
                elif self.method == "minmax":
                    s = groups.abs().amax(dim=1) / self.ymax
                else:
                    assert self.step is not None
                    s = self.step.detach().abs().clamp(min=1e-8)
                ss = s
            safe = torch.where(ss > 0, ss, torch.ones_like(ss))[:, None]
            q = round_to_levels(groups / safe, self.levels)
            q = torch.where(ss[:, None] > 0, q, torch.zeros_like(q))
        return q, s, g

    def _ls_step(self, groups: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """One step of the iterative rule per group: ``q = round(w / s)``, ``s <- <w, q> / <q, q>`` (a group
        whose codes are all zero keeps its scale)."""
        safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
        q = round_to_levels(groups / safe, self.levels)
        qq = (q * q).sum(dim=1)
        s_ls = (groups * q).sum(dim=1) / torch.where(qq > 0, qq, torch.ones_like(qq))
        return torch.where((qq > 0) & (s_ls > 0), s_ls, s)

    def _to_weight(self, groups_vals: torch.Tensor, R: int) -> torch.Tensor:
        vals = groups_vals.reshape(R, self.ngr * self.glen)[:, : self.n]
        return from_rows(vals, self.shape, self.gran)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        R = self.shape[0] if self.gran.kind != "tensor" else 1
        if self.method == "lsq" and self.step is not None and torch.is_grad_enabled():
            rows = to_rows(w.to(torch.float32), self.gran)
            groups, _ = self._groups(rows)
            gs = 1.0 / math.sqrt(w.numel() * self.ymax)
            s = _grad_scale(self.step.abs().clamp(min=1e-8), gs)[:, None]
            z = (groups / s).clamp(float(self.grid.levels[0]), float(self.grid.levels[-1]))
            return self._to_weight(_round_pass(z, self.grid) * s, R).to(w.dtype)
        q, s, g = self.scales(w)
        vals = (q * g) * s[:, None]  # the decode of the converted term: levels[code] * scale
        w_hat = self._to_weight(vals, R).to(w.dtype)
        lo_hi = (s * g)[:, None].expand(-1, self.glen)
        lo = self._to_weight(lo_hi * float(self.grid.levels[0]), R)
        hi = self._to_weight(lo_hi * float(self.grid.levels[-1]), R)
        return _ste(w, w_hat, lo, hi)

    def qtensor(self, w: torch.Tensor) -> QTensor:
        """The trained weight as a :class:`QTensor` whose dequantization equals this module's eval output."""
        q, s, g = self.scales(w)
        R = self.shape[0] if self.gran.kind != "tensor" else 1
        levels = (self.levels * g) if g != 1.0 else self.levels.clone()
        codes = torch.bucketize(q, self.levels).to(torch.uint8)  # q holds exact levels: their indices
        codes = codes.reshape(R, self.ngr * self.glen)[:, : self.n].contiguous()
        scale = s.reshape(R, self.ngr)
        name = self.fmt if self.block else "statq"
        if self.block:
            scale = scale.to(BLOCK_FORMATS[self.fmt][1])
        return QTensor(
            codes=codes,
            scale=scale,
            offset=None,
            levels=levels,
            bits=4 if self.block else self.grid.bits,
            shape=self.shape,
            granularity=self.gran,
            dtype=w.dtype,
            quantizer=name,
            grid=self.fmt if self.block else self.grid.name,
        )

    def extra_repr(self) -> str:
        rule = ", iterative" if self.iterative else ""
        return f"{self.method}{rule}, {self.fmt}, {self.gran}"


# ------------------------------------------------------------------------------------------------------------
# Inputs


class ActFakeQuant(nn.Module):
    """Fake quantization of a layer's input, per tensor, by a QAT method (see the module docstring).

    Buffers: ``scale`` (the current training scale), ``running`` (the eval scale), ``initialized``; LSQ has a
    ``step`` parameter instead. Block formats keep ``running`` as NVFP4's running ``max|x|``.
    """

    levels: torch.Tensor
    scale: torch.Tensor
    running: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, method: str, fmt: str, axis: int, momentum: float) -> None:
        super().__init__()
        self.method = method
        self.fmt, grid = parse_format(fmt, "act_format")
        self.block = grid is None
        self.grid = grid if grid is not None else make_grid("fp4_e2m1")
        self.axis = axis
        self.momentum = momentum
        self.register_buffer("levels", self.grid.table.to(torch.float32).clone())
        self.ymax = float(max(abs(self.grid.levels[0]), abs(self.grid.levels[-1])))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("running", torch.ones(1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.step = nn.Parameter(torch.ones(1)) if method == "lsq" and not self.block else None

    def _update(self, x: torch.Tensor) -> None:
        """One update of the scale from this batch (training mode)."""
        xd = x.detach().to(torch.float32)
        amax = xd.abs().max().clamp(min=1e-8)
        first = not bool(self.initialized)
        m = 1.0 if first else self.momentum
        if self.block:
            self.running.mul_(1 - m).add_(m * amax)
        elif self.method == "lsq":
            if first and self.step is not None:
                with torch.no_grad():
                    self.step.fill_(float(2 * xd.abs().mean() / math.sqrt(self.ymax)) or 1e-3)
        elif self.method == "minmax":
            self.scale.fill_(float(amax / self.ymax))
            self.running.mul_(1 - m).add_(m * self.scale)
        else:  # statq: one least-squares step, warm-started from min-max, then from the last scale
            s = float(amax / self.ymax) if first else float(self.scale)
            q = round_to_grid(xd / s, self.grid)
            den = float((q * q).sum())
            if den > 0:
                s_new = float((q * xd).sum()) / den
                if s_new > 0 and math.isfinite(s_new):
                    s = s_new
            self.scale.fill_(s)
            self.running.mul_(1 - m).add_(m * s)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update(x)
        if self.block:
            if not self.training:
                return self.export()(x)
            g = nvfp4_tensor_scale(self.running) if self.fmt == "nvfp4" else 1.0
            xq = fake_quantize_blocks(x, self.fmt, self.axis, tensor_scale=g)
            lim = float(self.running) if self.fmt == "nvfp4" else float(x.detach().abs().max())
            return _ste(x, xq, torch.tensor(-lim), torch.tensor(lim))
        if self.step is not None:
            s = self.step.abs().clamp(min=1e-8)
            if not self.training:
                return self.export()(x)
            gs = 1.0 / math.sqrt(x[0].numel() * self.ymax)
            sg = _grad_scale(s, gs)
            z = (x / sg).clamp(float(self.grid.levels[0]), float(self.grid.levels[-1]))
            return _round_pass(z, self.grid) * sg
        if not self.training:
            return self.export()(x)
        s_t = self.scale.to(x.dtype)
        x_hat = round_to_grid(x.detach() / s_t, self.grid) * s_t
        return _ste(x, x_hat, s_t * float(self.grid.levels[0]), s_t * float(self.grid.levels[-1]))

    def export(self) -> ActQuant:
        """The eval-mode quantizer as the :class:`~dfquant.nn.act.ActQuant` a converted layer holds."""
        if self.block:
            g = nvfp4_tensor_scale(self.running) if self.fmt == "nvfp4" else 1.0
            return ActQuant(
                fmt=self.fmt,
                scale=torch.tensor([g]),
                levels=self.levels,
                block=BLOCK_FORMATS[self.fmt][0],
                axis=self.axis,
            )
        s = self.step.detach().abs().clamp(min=1e-8) if self.step is not None else self.running
        return ActQuant(fmt=self.grid.name, scale=s, levels=self.levels)

    def extra_repr(self) -> str:
        return f"{self.method}, {self.fmt}, running={float(self.running):.5g}"


# ------------------------------------------------------------------------------------------------------------
# Layers and models


class QATLayer(nn.Module):
    """A float Linear / Conv1d / Conv2d computing with fake-quantized weights (and inputs).

    Attributes:
        layer: the float layer (its weight and bias are what training updates).
        wq: the :class:`WeightFakeQuant`.
        aq: the :class:`ActFakeQuant`, or None.
    """

    def __init__(self, layer: nn.Module, config: QATConfig) -> None:
        super().__init__()
        kind = layer_kind(layer)
        if kind not in _KINDS:
            raise ModelError(f"QAT supports {', '.join(_KINDS)} layers, got {type(layer).__name__}")
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ModelError(
                f"QAT supports convolutions with zero padding only, got padding_mode '{layer.padding_mode}'"
            )
        self.kind = kind
        self.layer = layer
        w = oriented_weight(layer)
        self.wq = WeightFakeQuant(
            tuple(w.shape), config.method, config.format, config.granularity, config.dist, w, config.weight_rule
        )
        axis = 1 if kind in ("conv1d", "conv2d") else -1
        self.aq = (
            ActFakeQuant(config.method, config.act_format, axis, config.act_momentum)
            if config.act_format is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        w = self.wq(oriented_weight(self.layer))
        bias = cast(torch.Tensor | None, self.layer.bias)
        if self.kind == "linear":
            return F.linear(x, w, bias)
        conv = cast(nn.Conv2d, self.layer)  # Conv1d has the same attributes
        op: Any = F.conv2d if self.kind == "conv2d" else F.conv1d
        return cast(torch.Tensor, op(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups))

    def to_quant_module(self) -> QuantModule:
        """The packed layer (same outputs as this one in eval mode)."""
        with torch.no_grad():
            qt = self.wq.qtensor(oriented_weight(self.layer).detach())
        options: dict[str, Any] = {"format": self.wq.fmt, "qat": self.wq.method}
        if not self.wq.block:
            rule = "iterative" if self.wq.iterative else "analytic"
            options["rule"] = rule if self.wq.method == "statq" else self.wq.method
        mod = QuantModule.from_float(self.layer, [QuantTerm.from_qtensor(qt, options=options)])
        if self.aq is not None:
            mod.input_quant = self.aq.export()
        return mod.eval()


def fold_model_batchnorms(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv / linear into it (running statistics; the BatchNorm
    becomes a :class:`~dfquant.graph.modules.FoldedBatchNorm`), in place, as :func:`dfquant.quantize_model` does.

    Returns:
        The model.
    """
    return fold_batchnorms(model)[0]


def _kept(name: str, config: QATConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in config.keep_float)


def prepare_qat(model: nn.Module, config: QATConfig | None = None) -> nn.Module:
    """A copy of ``model`` ready for quantization-aware training: BatchNorms folded (``config.fold_bn``), every
    Linear / Conv1d / Conv2d not matched by ``config.keep_float`` wrapped in a :class:`QATLayer`; train mode.

    Raises:
        ConfigError: an invalid config.
        ModelError: no layer to quantize.
    """
    config = config if config is not None else QATConfig()
    if not isinstance(config, QATConfig):
        raise ConfigError(f"config must be a QATConfig, got {type(config).__name__}")
    net = copy.deepcopy(model)
    if config.fold_bn:
        net = fold_model_batchnorms(net)
    names = [n for n, m in net.named_modules() if layer_kind(m) in _KINDS and not _kept(n, config)]
    if not names:
        raise ModelError("no Linear / Conv1d / Conv2d layer to quantize (check keep_float)")
    for n in names:
        net = replace_module(net, n, QATLayer(get_module(net, n), config))
    return net.train()


def convert(model: nn.Module) -> nn.Module:
    """A copy of a QAT model with every :class:`QATLayer` replaced by its packed :class:`~dfquant.nn.base.QuantModule`
    (in eval mode; :func:`dfquant.io.save.save_quantized` writes it like a post-training result).

    Raises:
        ModelError: the model holds no QATLayer.
    """
    net = copy.deepcopy(model).eval()
    names = [n for n, m in net.named_modules() if isinstance(m, QATLayer)]
    if not names:
        raise ModelError("the model has no QAT layer to convert (use prepare_qat first)")
    for n in names:
        qat_layer = get_module(net, n)
        assert isinstance(qat_layer, QATLayer)
        net = replace_module(net, n, qat_layer.to_quant_module())
    return net
