"""REx on a layer's input: quantize the activation to ``A`` bits and expand its residual.

Pure tensor math (no module walking). Reference: E. Yvinec, A. Dapogny, M. Cord, K. Bailly, "REx: Data-Free
Residual Quantization Error Expansion", NeurIPS 2023 (the expansion of the inputs and its pairing with the
weight orders).

**Input expansion** of order ``K`` (``A`` bits per order)::

    X_1 = Q_1(x),    X_k = Q_k(x - sum_{i<k} X_i)   (k = 2..K).

``Q_1`` is an affine grid on the range ``[lo, hi]``: step ``D_1 = (hi - lo) / (2^A - 1)``, zero point
``z = round(-lo / D_1)`` (so that zero is a level, exact for ReLU inputs), ``X_1 = D_1 (clamp(round(x / D_1) +
z, 0, 2^A - 1) - z)``. Inside the range the residual is at most ``D_1 / 2``. ``Q_k`` for ``k >= 2`` is the
signed ``A``-bit integer grid (codes ``-2^(A-1) .. 2^(A-1) - 1``, zero a level) with step ``D_k = D_{k-1} /
(2^A - 1)``: its codes ``-(2^(A-1) - 1) .. 2^(A-1) - 1`` cover ``[-D_{k-1} / 2, D_{k-1} / 2]`` with error at most
``D_k / 2``, so each order shrinks the worst error ``(2^A - 1)``-fold, at least the ``2^(A-1)`` of the paper's
lemma for weights, here on inputs. Values clipped by the first order's range keep
their clipping error (the residual orders cover half a step only): ranges must be generous.

**Ranges** (data-free):

* ``static``: ``[lo, hi]`` fixed per layer, from the statistics of the BatchNorm that produces the input (see
  :func:`bn_input_range`);
* ``token``: computed at run time over the last dimension of the input (per token of a transformer; per
  position), ``lo = min(min x, 0)``, ``hi = max(max x, 0)``;
* ``sample``: computed at run time over each sample (all but the batch dimension): a layer whose input has no
  statistics (the first convolution on images, a layer after spatial pooling).

**Pairing with the weight orders** ``W_1..W_K``: the layer computes ``sum_{k1 + k2 <= K + 1} op(X_k1, W_k2)``
(:func:`paired_forward`), i.e. ``sum_k1 op(X_k1, sum_{k2 <= K + 1 - k1} W_k2)``; :func:`termwise_pairs` is the
pair-by-pair reference. Its cost (:func:`pair_bits_per_mac`) is ``A sum_{k2} b_k2 (c_k2 / C) (K + 1 - k2)``
bits per MAC: weight order ``k2`` (``b_k2`` bits, ``c_k2`` of ``C`` channels) meets ``K + 1 - k2`` input
orders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dfquant.errors import ConfigError, InputError

__all__ = [
    "ACT_MODES",
    "DEFAULT_CLIP_SIGMAS",
    "InputSpec",
    "bn_input_range",
    "choose_input_spec",
    "expand_input",
    "moments_input_range",
    "pair_bits_per_mac",
    "paired_forward",
    "termwise_pairs",
]

#: How an input's range is found.
ACT_MODES = ("static", "token", "sample")
#: Default Gaussian clip: ``hi = max_c (beta_c + 4 |gamma_c|)`` (a normal exceeds 4 sigma with probability
#: 3.2e-5; the residual orders cannot repair clipped values, so the range is wide and the orders refine it).
DEFAULT_CLIP_SIGMAS = 4.0


@dataclass(frozen=True)
class InputSpec:
    """How one layer's input is quantized and expanded.

    Attributes:
        bits: ``A``, bits per input order (2..8).
        order: ``K``, the number of input orders (the layer's weight expansion order).
        mode: one of :data:`ACT_MODES`.
        lo, hi: the static range (``mode == "static"``), else None.
        source: where the range comes from, in words (for the report).
    """

    bits: int
    order: int
    mode: str
    lo: float | None = None
    hi: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"activation bits must be an integer in 2..8, got {self.bits!r}")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 1 <= self.order <= 16:
            raise ConfigError(f"input expansion order must be an integer in 1..16, got {self.order!r}")
        if self.mode not in ACT_MODES:
            raise ConfigError(f"activation range mode must be one of {', '.join(ACT_MODES)}, got {self.mode!r}")
        if self.mode == "static":
            lo, hi = self.lo, self.hi
            ok = isinstance(lo, int | float) and isinstance(hi, int | float)
            if not ok or not (math.isfinite(lo) and math.isfinite(hi) and lo <= 0 <= hi):  # type: ignore[arg-type, operator]
                raise ConfigError(f"a static input range needs finite lo <= 0 <= hi, got [{self.lo}, {self.hi}]")
        elif self.lo is not None or self.hi is not None:
            raise ConfigError(f"an input range of mode '{self.mode}' is found at run time; lo and hi must be None")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (the file manifest's ``act`` entry)."""
        return {
            "bits": self.bits,
            "order": self.order,
            "mode": self.mode,
            "lo": self.lo,
            "hi": self.hi,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: object) -> InputSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: keys or values that do not describe a spec.
        """
        keys = {"bits", "order", "mode", "lo", "hi", "source"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ConfigError(f"activation metadata must be an object with keys {sorted(keys)}, got {data!r}")
        if not isinstance(data["source"], str):
            raise ConfigError(f"activation source must be a string, got {data['source']!r}")
        lo, hi = data["lo"], data["hi"]
        for v in (lo, hi):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ConfigError(f"activation range bounds must be numbers or null, got {v!r}")
        return cls(
            bits=data["bits"],
            order=data["order"],
            mode=data["mode"],
            lo=None if lo is None else float(lo),
            hi=None if hi is None else float(hi),
            source=data["source"],
        )


def bn_input_range(
    beta: torch.Tensor, gamma: torch.Tensor | None, activation: str, sigmas: float = DEFAULT_CLIP_SIGMAS
) -> tuple[float, float]:
    """Static range of an input ``act(BN(.))`` from the BatchNorm's affine parameters.

    A BatchNorm's output channel ``c`` is modelled as ``N(beta_c, gamma_c^2)`` (Gaussian, as in DFQ, Nagel et
    al. 2019); the range is the tensor-wide ``[min_c (beta_c - s |gamma_c|), max_c (beta_c + s |gamma_c|)]``
    with ``s = sigmas``, widened to hold zero, and after a ReLU ``lo = 0`` (the pre-activation quantile maps
    to the same post-activation quantile).

    Args:
        beta, gamma: the BatchNorm's shift and scale (``gamma`` None: 1).
        activation: ``"relu"`` or ``"none"``.
        sigmas: the clip in standard deviations.

    Returns:
        ``(lo, hi)`` floats.
    """
    b = beta.detach().to(torch.float32)
    g = torch.ones_like(b) if gamma is None else gamma.detach().to(torch.float32).abs()
    hi = max(float((b + sigmas * g).max()), 0.0)
    lo = 0.0 if activation == "relu" else min(float((b - sigmas * g).min()), 0.0)
    return lo, hi


def moments_input_range(
    mean: torch.Tensor, var: torch.Tensor, activation: str, sigmas: float = DEFAULT_CLIP_SIGMAS
) -> tuple[float, float]:
    """Static range of an input known by its propagated per-channel moments (a residual sum after a ReLU):
    ``[min_c (m_c - s sd_c), max_c (m_c + s sd_c)]`` widened to hold zero, ``lo = 0`` after a ReLU."""
    m = mean.detach().to(torch.float32)
    sd = var.detach().to(torch.float32).clamp_min(0).sqrt()
    hi = max(float((m + sigmas * sd).max()), 0.0)
    lo = 0.0 if activation == "relu" else min(float((m - sigmas * sd).min()), 0.0)
    return lo, hi


def _range(x: torch.Tensor, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.mode == "static":
        lo = torch.tensor(spec.lo, dtype=torch.float32, device=x.device)
        hi = torch.tensor(spec.hi, dtype=torch.float32, device=x.device)
        return lo, hi
    if spec.mode == "token":
        return x.amin(dim=-1, keepdim=True).clamp_max(0), x.amax(dim=-1, keepdim=True).clamp_min(0)
    dims = tuple(range(1, x.dim())) if x.dim() > 1 else (0,)
    return x.amin(dim=dims, keepdim=True).clamp_max(0), x.amax(dim=dims, keepdim=True).clamp_min(0)


def expand_input(x: torch.Tensor, spec: InputSpec, order: int | None = None) -> list[torch.Tensor]:
    """The input orders ``X_1..X_K`` (float32, the shape of ``x``; see the module docstring for the grids).

    Args:
        x: the layer's input.
        spec: bits, mode and range.
        order: number of orders (default ``spec.order``).

    Returns:
        ``K`` tensors whose sum approximates ``x``.

    Raises:
        InputError: a non-floating input.
    """
    if not x.is_floating_point():
        raise InputError(f"an input to quantize must be floating point, got {x.dtype}")
    K = spec.order if order is None else order
    xf = x.detach().to(torch.float32) if x.dtype != torch.float32 else x.detach()
    top = (1 << spec.bits) - 1
    lo, hi = _range(xf, spec)
    step = (hi - lo) / top
    step = torch.where(step > 0, step, torch.ones_like(step))  # an all-zero input: any step is exact
    zero = torch.clamp(torch.round(-lo / step), 0, top)
    x1 = step * (torch.clamp(torch.round(xf / step) + zero, 0, top) - zero)
    out = [x1]
    res = xf - x1
    half = 1 << (spec.bits - 1)
    for _ in range(2, K + 1):
        step = step / top  # 2 R_{k-1} / (2^A - 1) with R_{k-1} the previous half step
        xk = step * torch.clamp(torch.round(res / step), -half, half - 1)
        out.append(xk)
        res = res - xk
    return out


Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def paired_forward(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], op: Op) -> torch.Tensor:
    """``sum_{k1 + k2 <= K + 1} op(X_k1, W_k2)`` computed as ``sum_k1 op(X_k1, sum_{k2 <= K + 1 - k1} W_k2)``
    (``K`` convs/matmuls; ``weights`` are the dense weight orders, subset terms scattered, bias-free ``op``).

    Raises:
        InputError: no orders, or more input orders than weight orders.
    """
    K = len(weights)
    if not xs or K == 0 or len(xs) > K:
        raise InputError(f"{len(xs)} input orders cannot pair with {K} weight orders (need 1..{K})")
    prefix = [weights[0]]
    for w in weights[1:]:
        prefix.append(prefix[-1] + w)
    out: torch.Tensor | None = None
    for k1, xk in enumerate(xs, start=1):
        y = op(xk, prefix[K - k1])
        out = y if out is None else out + y
    assert out is not None
    return out


def termwise_pairs(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], op: Op) -> torch.Tensor:
    """Reference for :func:`paired_forward`: every pair ``(k1, k2)`` with ``k1 + k2 <= K + 1`` on its own."""
    K = len(weights)
    out: torch.Tensor | None = None
    for k1, xk in enumerate(xs, start=1):
        for k2, wk in enumerate(weights, start=1):
            if k1 + k2 <= K + 1:
                y = op(xk, wk)
                out = y if out is None else out + y
    if out is None:
        raise InputError("no pairs to compute")
    return out


def pair_bits_per_mac(term_bits: Sequence[tuple[int, int]], out_channels: int, act_bits: int) -> float:
    """Bit products per MAC of a layer with input expansion: ``A sum_{k2} b_k2 (c_k2 / C) (K + 1 - k2)``.

    Args:
        term_bits: ``(bits, channels covered)`` of each weight order, in order.
        out_channels: ``C``.
        act_bits: ``A``.
    """
    K = len(term_bits)
    return act_bits * sum(b * c / max(out_channels, 1) * (K + 1 - k) for k, (b, c) in enumerate(term_bits, 1))


def choose_input_spec(
    bits: int,
    order: int,
    kind: str,
    *,
    bn: tuple[str, torch.Tensor, torch.Tensor | None, str] | None = None,
    moments: tuple[str, torch.Tensor, torch.Tensor | None, str] | None = None,
    sigmas: float = DEFAULT_CLIP_SIGMAS,
) -> InputSpec:
    """The data-free range rule of one layer's input, in order of preference:

    1. ``bn = (name, beta, gamma, activation)``: the input is ``activation(BN(.))``: static,
       :func:`bn_input_range`;
    2. ``moments = (source, mean, var, activation)`` with a known variance (an input derived further from
       BatchNorm outputs, such as a residual sum): static, :func:`moments_input_range`;
    3. otherwise at run time: ``token`` for linear layers (per token of a transformer, per sample of a
       classifier head), ``sample`` for convolutions (per image).
    """
    if bn is not None:
        name, beta, gamma, act = bn
        lo, hi = bn_input_range(beta, gamma, act, sigmas)
        src = f"BatchNorm '{name}' ({act}): N(beta, gamma^2), {sigmas:g} sigma"
        return InputSpec(bits, order, "static", lo, hi, src)
    if moments is not None and moments[2] is not None:
        name, mean, var, act = moments[0], moments[1], moments[2], moments[3]
        lo, hi = moments_input_range(mean, var, act, sigmas)
        src = f"moments propagated from '{name}' ({act}): mean + {sigmas:g} sd"
        return InputSpec(bits, order, "static", lo, hi, src)
    if kind in ("linear", "hf-conv1d"):
        return InputSpec(bits, order, "token", source="run time, per token (last dimension)")
    return InputSpec(bits, order, "sample", source="run time, per sample (no input statistics)")
