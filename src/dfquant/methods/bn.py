"""BatchNorm folding and data-free bias correction, as pure tensor math.

Folding (exact in inference mode): a conv/linear ``y = W x + b`` followed by BatchNorm
``z = gamma * (y - mu) / sqrt(var + eps) + beta`` equals one conv/linear with, per output channel ``o``,

    s_o = gamma_o / sqrt(var_o + eps),   W'_o = s_o * W_o,   b'_o = beta_o + (b_o - mu_o) * s_o.

Bias correction (Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019, section 4.2): quantizing ``W`` to ``W_q = W + dW`` shifts the expected output
by ``E[dW x] = dW E[x]``; subtracting it from the bias removes the shift,

    b_corrected = b - dW E[x].

Without data, ``E[x]`` comes from the BatchNorm that produces the layer's input: its output channel ``c`` is
modelled as ``N(beta_c, gamma_c^2)``, so with no activation ``E[x_c] = beta_c``, and after a ReLU ``E[x_c]``
is the mean of a clipped normal (:func:`relu_gaussian_mean`). For a convolution the shift of output channel
``o`` is ``sum_c sum_taps dW[o, c, taps] * E[x_c]`` (input channels of ``o``'s group only). That is exact for
outputs whose receptive field lies inside the input; at the borders zero padding feeds zeros instead of
``E[x_c]``, so there the correction is an approximation (it over-corrects by the padded taps' share).

Where the input is not one BatchNorm's output but, as in a residual network, ``ReLU(BN(u) + shortcut)``, the
per-channel mean and variance are propagated through the graph (:func:`propagate_moments`): a BatchNorm
output is ``N(beta, gamma^2)``; a sum of two branches, taken as independent, has the sum of their means and
of their variances and is modelled as normal again; a ReLU of ``N(mu, sigma^2)`` has the rectified-normal
moments (:func:`relu_gaussian_moments`); zero-padded channels (the option-A shortcut of He et al. 2016,
"Deep Residual Learning for Image Recognition") have mean and variance 0; spatial slicing keeps both;
spatial averaging keeps the mean (its variance depends on the spatial correlation, which the statistics do
not give, and becomes unknown).

All functions compute in float32 and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dfquant.errors import ConfigError, InputError

__all__ = [
    "ACTIVATIONS",
    "MOMENT_OPS",
    "MomentOp",
    "Moments",
    "correct_bias",
    "expected_input_mean",
    "expected_output_shift",
    "fold_batchnorm",
    "propagate_moments",
    "relu_gaussian_mean",
    "relu_gaussian_moments",
]

#: Activations between a BatchNorm and the next layer that bias correction models.
ACTIVATIONS = ("none", "relu")


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32)


def fold_batchnorm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an inference-mode BatchNorm into the conv/linear before it.

    ``s = gamma / sqrt(var + eps)``, ``W' = s * W`` (per output channel, axis 0), ``b' = beta + (b - mu) * s``
    (Ioffe and Szegedy 2015 give the BatchNorm transform; folding is its composition with the affine layer).

    Args:
        weight: ``(out, ...)`` weight, output channels on axis 0.
        bias: ``(out,)`` or None (zero).
        running_mean, running_var: ``(out,)`` BatchNorm statistics.
        gamma, beta: ``(out,)`` affine parameters, or None for a BatchNorm without affine (1 and 0).
        eps: the BatchNorm's epsilon.

    Returns:
        ``(W', b')`` in ``weight``'s dtype.

    Raises:
        InputError: shapes that do not match, or non-finite statistics.
    """
    out = weight.shape[0]
    for label, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("gamma", gamma),
        ("beta", beta),
        ("bias", bias),
    ):
        if t is not None and tuple(t.shape) != (out,):
            raise InputError(f"BatchNorm folding: {label} has shape {tuple(t.shape)}, expected ({out},)")
        if t is not None and not bool(torch.isfinite(t).all()):
            raise InputError(f"BatchNorm folding: {label} holds NaN or infinite values")
    var = _f32(running_var)
    if bool((var + eps <= 0).any()):
        raise InputError("BatchNorm folding: running_var + eps must be positive")
    g = _f32(gamma) if gamma is not None else torch.ones(out)
    b0 = _f32(beta) if beta is not None else torch.zeros(out)
    s = g / torch.sqrt(var + eps)
    w = _f32(weight) * s.reshape(-1, *([1] * (weight.dim() - 1)))
    b = _f32(bias) if bias is not None else torch.zeros(out)
    new_bias = b0 + (b - _f32(running_mean)) * s
    return w.to(weight.dtype), new_bias.to(weight.dtype)


def relu_gaussian_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[max(0, Z)]`` for ``Z ~ N(mean, std^2)``, elementwise: the clipped-normal mean

        E[ReLU(Z)] = std * phi(mean / std) + mean * Phi(mean / std),

    with ``phi``/``Phi`` the standard normal pdf/cdf (Nagel et al. 2019, section 4.2); ``max(mean, 0)`` where
    ``std == 0``.
    """
    return relu_gaussian_moments(mean, std)[0]


def relu_gaussian_moments(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``max(0, Z)`` for ``Z ~ N(mean, std^2)``, elementwise.

    With ``a = mean / std``: ``E[ReLU(Z)] = std*phi(a) + mean*Phi(a)`` and
    ``E[ReLU(Z)^2] = (mean^2 + std^2) * Phi(a) + mean * std * phi(a)`` (moments of the rectified normal); the
    variance is their difference, clamped at 0. Where ``std == 0``: ``(max(mean, 0), 0)``.
    """
    m = _f32(mean)
    s = _f32(std).abs()
    pos = s > 0
    safe = torch.where(pos, s, torch.ones_like(s))
    a = m / safe
    pdf = torch.exp(-0.5 * a * a) / (2.0 * torch.pi) ** 0.5
    cdf = torch.special.ndtr(a)
    m1 = s * pdf + m * cdf
    m2 = (m * m + s * s) * cdf + m * s * pdf
    var = (m2 - m1 * m1).clamp_min(0.0)
    return torch.where(pos, m1, m.clamp_min(0.0)), torch.where(pos, var, torch.zeros_like(var))


def expected_input_mean(beta: torch.Tensor, gamma: torch.Tensor | None, activation: str = "relu") -> torch.Tensor:
    """Expected value of a layer's input channels when they come from a BatchNorm (then ``activation``).

    The BatchNorm output of channel ``c`` is modelled as ``N(beta_c, gamma_c^2)`` (Nagel et al. 2019, 4.2);
    ``activation="none"`` gives ``E[x_c] = beta_c``, ``"relu"`` the clipped-normal mean
    ``|gamma_c| * phi(beta_c/|gamma_c|) + beta_c * Phi(beta_c/|gamma_c|)``.

    Args:
        beta: ``(C,)`` BatchNorm shift.
        gamma: ``(C,)`` BatchNorm scale (its sign does not matter), or None (1).
        activation: one of :data:`ACTIVATIONS`.

    Raises:
        ConfigError: an activation that is not modelled.
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"bias correction models activations {', '.join(ACTIVATIONS)}, got '{activation}'")
    b = _f32(beta)
    g = _f32(gamma).abs() if gamma is not None else torch.ones_like(b)
    return b.clone() if activation == "none" else relu_gaussian_mean(b, g)


def expected_output_shift(delta_weight: torch.Tensor, input_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``E[dW x]`` per output channel, for inputs with per-channel mean ``input_mean``.

    For a linear layer ``dW @ E[x]``; for a convolution with ``groups`` groups, output channel ``o`` of group
    ``g`` gets ``sum_{c, taps} dW[o, c, taps] * E[x_{g*Cg + c}]`` (spatial taps summed: exact away from zero
    padding, see the module docstring).

    Args:
        delta_weight: ``(out, in/groups, *kernel)`` or ``(out, in)``.
        input_mean: ``(in,)``.
        groups: the convolution's groups (1 for linear layers).

    Returns:
        ``(out,)`` float32.

    Raises:
        InputError: shapes that do not fit together.
    """
    d = _f32(delta_weight)
    out = d.shape[0]
    per_in = d.reshape(out, d.shape[1], -1).sum(dim=2) if d.dim() > 2 else d  # (out, in/groups)
    ex = _f32(input_mean).reshape(-1)
    if groups < 1 or out % groups or per_in.shape[1] * groups != ex.numel():
        raise InputError(
            f"bias correction: a weight of shape {tuple(d.shape)} with {groups} group(s) needs "
            f"{per_in.shape[1] * groups} input means, got {ex.numel()}"
        )
    opg, ipg = out // groups, per_in.shape[1]
    shift = torch.bmm(per_in.reshape(groups, opg, ipg), ex.reshape(groups, ipg, 1))
    return shift.reshape(out)


def correct_bias(
    weight: torch.Tensor,
    weight_q: torch.Tensor,
    bias: torch.Tensor | None,
    input_mean: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DFQ bias correction: ``b' = b - (W_q - W) E[x]`` (Nagel et al. 2019, section 4.2).

    Args:
        weight: the float weight ``(out, ...)`` (after any BatchNorm folding).
        weight_q: its dequantized approximation, same shape.
        bias: ``(out,)`` or None (zero).
        input_mean: ``(in,)`` expected input per channel (see :func:`expected_input_mean`).
        groups: convolution groups.

    Returns:
        ``(corrected bias, shift)``, both float32 ``(out,)``; ``corrected = bias - shift``.
    """
    if weight.shape != weight_q.shape:
        raise InputError(
            f"bias correction: float weight {tuple(weight.shape)} and quantized weight {tuple(weight_q.shape)} differ"
        )
    shift = expected_output_shift(_f32(weight_q) - _f32(weight), input_mean, groups)
    b = _f32(bias) if bias is not None else torch.zeros_like(shift)
    return b - shift, shift


# ------------------------------------------------------------------------------------------------------------
# Moment propagation

#: Operations :func:`propagate_moments` models.
MOMENT_OPS = ("batchnorm", "relu", "add", "identity", "pad", "mean")


@dataclass(frozen=True)
class Moments:
    """Per-channel mean and variance of a tensor.

    Attributes:
        mean: ``(C,)`` expected values.
        var: ``(C,)`` variances, or None where unknown (after spatial averaging).
        rel_var: after spatial averaging, the variances before it: the average scales each channel's variance
            by a factor that depends only on the spatial correlation, so where the channels share one spatial
            correlation these are the variances up to one common factor (enough to weigh channels against each
            other); None otherwise.
    """

    mean: torch.Tensor
    var: torch.Tensor | None
    rel_var: torch.Tensor | None = None

    @property
    def relative_variance(self) -> torch.Tensor | None:
        """``var`` where known, else ``rel_var``: the variances up to a factor common to all channels."""
        return self.var if self.var is not None else self.rel_var


@dataclass(frozen=True)
class MomentOp:
    """One step of a moment program: the value ``node`` computed by ``op`` from ``inputs`` (earlier nodes).

    Attributes:
        node: the value's name.
        op: one of :data:`MOMENT_OPS`: ``batchnorm`` (the output of the BatchNorm ``source``, whatever its
            input), ``relu``, ``add`` (two inputs), ``identity`` (dropout in eval mode, spatial slicing),
            ``pad`` (``pad[0]`` zero channels before and ``pad[1]`` after), ``mean`` (spatial averaging).
        inputs: names of the input values.
        source: the BatchNorm's name for ``batchnorm``.
        pad: channels added before and after for ``pad``.
    """

    node: str
    op: str
    inputs: tuple[str, ...] = ()
    source: str = ""
    pad: tuple[int, int] = (0, 0)


def _add(a: Moments, b: Moments) -> Moments | None:
    if a.mean.shape != b.mean.shape:
        return None
    var = None if a.var is None or b.var is None else a.var + b.var
    return Moments(a.mean + b.mean, var)


def _apply(
    op: MomentOp, args: list[Moments], batchnorms: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> Moments | None:
    if op.op == "batchnorm":
        if op.source not in batchnorms:
            return None
        beta, gamma = batchnorms[op.source]
        return Moments(_f32(beta).clone(), _f32(gamma) ** 2)
    if not args:
        return None
    x = args[0]
    if op.op == "relu":
        if x.var is None:
            return None
        mean, var = relu_gaussian_moments(x.mean, x.var.clamp_min(0.0).sqrt())
        return Moments(mean, var)
    if op.op == "add":
        return _add(args[0], args[1]) if len(args) == 2 else None
    if op.op == "identity":
        return x
    if op.op == "pad":
        before, after = op.pad
        if before < 0 or after < 0:
            return None
        pad = torch.nn.functional.pad
        rel = None if x.rel_var is None else pad(x.rel_var, (before, after))
        return Moments(pad(x.mean, (before, after)), None if x.var is None else pad(x.var, (before, after)), rel)
    if op.op == "mean":
        return Moments(x.mean, None, x.relative_variance)
    raise ConfigError(f"moment propagation models {', '.join(MOMENT_OPS)}, got '{op.op}'")


def propagate_moments(
    program: Sequence[MomentOp], batchnorms: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, Moments]:
    """Per-channel mean and variance of every value of ``program``, without data.

    Rules (see the module docstring): ``batchnorm``: ``(beta, gamma^2)``, the Gaussian model of DFQ (Nagel et
    al. 2019, section 4.2); ``relu``: the rectified-normal moments of ``N(mu, sigma^2)``; ``add``: means and
    variances add (the branches are taken as independent, and their sum as normal); ``identity``: unchanged;
    ``pad``: zero channels have mean and variance 0; ``mean`` (spatial averaging): the mean is kept, the
    variance becomes unknown (kept only as :attr:`Moments.rel_var`). A value whose inputs are unknown, or
    whose op needs an unknown variance, is left out of the result.

    Args:
        program: the ops in topological order (each input named before it is used).
        batchnorms: BatchNorm name -> ``(beta, gamma)`` (``gamma``'s sign does not matter).

    Returns:
        Node name -> :class:`Moments` (float32), for the values that could be derived.

    Raises:
        ConfigError: an op that is not modelled.
    """
    known: dict[str, Moments] = {}
    for op in program:
        if any(name not in known for name in op.inputs):
            continue
        out = _apply(op, [known[name] for name in op.inputs], batchnorms)
        if out is not None:
            known[op.node] = out
    return known
