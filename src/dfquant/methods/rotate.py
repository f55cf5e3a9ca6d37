"""Random block Walsh-Hadamard rotation of a layer's input dimension, undone when the weight is decoded.

Real weights are heavy-tailed, so a grid fitted to a Gaussian (the closed-form Lloyd-Max table) or any
``2^b``-level grid spends its levels badly on them. Multiplying each weight row by a random orthogonal matrix
``R`` spreads every large weight over a block and makes the block's values close to Gaussian (a sum of many
terms with random signs), whatever the distribution was: QuaRot (Ashkboos et al. 2024), QuIP# (Tseng et al.
2024) and HIGGS (Malinovskii et al. 2025) quantize ``W R^T`` for that reason. Since ``R`` is orthogonal,

    y = W x = (W R^T) (R x),    W_hat = Q(W R^T) R,

so the layer either rotates its input at run time or decodes ``W_hat`` once; both give the same output, and
the squared error of ``W_hat`` equals that of ``Q(W R^T)`` (an orthogonal map keeps Frobenius norms).

Here ``R = H D`` acts on the flattened fan-in (``in * kh * kw`` for a convolution, in PyTorch's order) of
the weight in ``(out, in, ...)`` layout: ``D`` is a diagonal of random signs drawn from ``seed``, and ``H``
is block diagonal with normalized Walsh-Hadamard blocks ``H_B / sqrt(B)`` (symmetric, so ``H^{-1} = H``).
The fan-in ``n`` is cut into blocks of ``block`` (a power of two) and its remainder into the powers of two of
its binary expansion (``144 = 64 + 64 + 16``), so that every width gets an orthogonal ``R`` without padding.
Each block is transformed by the fast Walsh-Hadamard transform, ``log2 B`` butterfly passes of additions and
subtractions, ``O(n log B)`` per row (Fino and Algazi 1976). The passes are element-wise, so a decoded
weight is the same bit for bit on every machine.

Only the sign seed and the block size are stored; the signs are drawn again, on the CPU generator, when a
file is loaded.

Example:
    >>> import torch
    >>> r = Rotation(block=64, seed=1)
    >>> w = torch.randn(4, 144)
    >>> bool(torch.allclose(r.undo(r.apply(w)), w, atol=1e-5))
    True
    >>> r.blocks(144)
    [64, 64, 16]
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dfquant.errors import ConfigError
from dfquant.grids.distributions import fit_groups
from dfquant.quantizers.granularity import Granularity
from dfquant.quantizers.qtensor import group_batches, to_rows

__all__ = ["DEFAULT_BLOCK", "KINDS", "Rotation", "parse_rotation"]

#: The rotations a rule may ask for.
KINDS = ("none", "hadamard")
#: Block size of ``hadamard`` without ``:BLOCK``.
DEFAULT_BLOCK = 64


@dataclass(frozen=True)
class Rotation:
    """A random block Walsh-Hadamard rotation ``R = H D`` of the last dimension (see the module docstring).

    Attributes:
        block: the largest block, a power of two (>= 2).
        seed: seed of the signs ``D`` (torch's CPU generator).
    """

    block: int = DEFAULT_BLOCK
    seed: int = 0

    def __post_init__(self) -> None:
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
            raise ConfigError(f"rotation block must be a power of two >= 2, got {b!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"rotation seed must be an integer in [0, 2^63), got {self.seed!r}")

    @classmethod
    def for_layer(cls, block: int, layer: str) -> Rotation:
        """The rotation of layer ``layer``: its signs seeded by the CRC-32 of the name, so that layers differ
        and a run repeats."""
        return cls(block=block, seed=zlib.crc32(layer.encode("utf-8")))

    @classmethod
    def for_rule(cls, spec: str, layer: str) -> Rotation | None:
        """The rotation a rule's ``rotate`` spec (normal form ``"none"`` or ``"hadamard:B"``) gives layer
        ``layer`` (:meth:`for_layer`), or None for ``"none"``: the one place a layer's rotation is derived, so that
        every stage (quantization, DF-MPC's low-layer fit) uses the same signs."""
        block = rotation_block(spec)
        return None if block is None else cls.for_layer(block, layer)

    def blocks(self, n: int) -> list[int]:
        """Block sizes along a dimension of ``n``: ``n // block`` blocks of ``block``, then the powers of two of
        the remainder, largest first."""
        out = [self.block] * (n // self.block)
        rest = n % self.block
        while rest:
            p = 1 << (rest.bit_length() - 1)
            out.append(p)
            rest -= p
        return out

    def signs(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``n`` random signs ``D`` (float32 +-1), drawn on the CPU generator and moved to ``device``."""
        g = torch.Generator().manual_seed(self.seed)
        return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).to(torch.float32).to(device)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """``W R^T = W D H`` along ``w``'s flattened trailing dimensions (float32, ``w``'s shape)."""
        rows = _flat(w)
        return self._hadamard(rows * self.signs(rows.shape[1], rows.device)).view(w.shape)

    def undo(self, q: torch.Tensor) -> torch.Tensor:
        """``Q R = Q H D``: the weight in the layer's own basis (float32, ``q``'s shape)."""
        rows = _flat(q)
        return (self._hadamard(rows) * self.signs(rows.shape[1], rows.device)).view(q.shape)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` along ``x``'s last dimension, for layers that multiply by ``Q(W R^T)`` directly."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.float32)
        return self._hadamard(flat * self.signs(shape[-1], x.device)).view(shape)

    def _hadamard(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows H`` for ``(m, n)`` rows: each block by the normalized fast Walsh-Hadamard transform."""
        m, n = rows.shape
        parts = []
        start = 0
        sizes = self.blocks(n)
        i = 0
        while i < len(sizes):  # runs of equal blocks are transformed together
            b = sizes[i]
            j = i
            while j < len(sizes) and sizes[j] == b:
                j += 1
            width = b * (j - i)
            parts.append(_fwht(rows[:, start : start + width].reshape(m, j - i, b)).reshape(m, width))
            start += width
            i = j
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def meta(self) -> dict[str, Any]:
        """JSON-ready description (a file's layer entry ``rotation``)."""
        return {"kind": "hadamard", "block": self.block, "seed": self.seed}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Rotation:
        """The rotation :meth:`meta` describes.

        Raises:
            ConfigError: another kind, missing or extra keys, or bad values.
        """
        if not isinstance(meta, Mapping) or set(meta) != {"kind", "block", "seed"} or meta["kind"] != "hadamard":
            raise ConfigError(f"rotation must be {{'kind': 'hadamard', 'block': B, 'seed': S}}, got {meta!r}")
        return cls(block=meta["block"], seed=meta["seed"])


def parse_rotation(spec: object, where: str = "layer rule") -> str:
    """Check a rule's ``rotate`` setting and return its normal form: ``"none"``, or ``"hadamard:B"``.

    ``"hadamard"`` means blocks of :data:`DEFAULT_BLOCK`; ``"hadamard:B"`` takes a power of two ``B >= 2``.

    Raises:
        ConfigError: anything else, naming what is allowed.
    """
    allowed = "'none', 'hadamard' or 'hadamard:B' (B a power of two >= 2)"
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: 'rotate' must be {allowed}, got {spec!r}")
    kind, _, block = spec.strip().lower().partition(":")
    if kind == "none" and not block:
        return "none"
    if kind != "hadamard":
        raise ConfigError(f"{where}: 'rotate' must be {allowed}, got {spec!r}")
    try:
        b = int(block) if block else DEFAULT_BLOCK
        Rotation(block=b)
    except (ValueError, ConfigError):
        raise ConfigError(f"{where}: 'rotate' must be {allowed}, got {spec!r}") from None
    return f"hadamard:{b}"


def rotation_block(spec: str) -> int | None:
    """The block size of a normal-form ``rotate`` setting, None for ``"none"``."""
    return None if spec == "none" else int(spec.partition(":")[2])


def _flat(w: torch.Tensor) -> torch.Tensor:
    """``w`` as float32 ``(out, fan_in)`` rows."""
    return w.to(torch.float32).reshape(w.shape[0], -1) if w.dim() > 1 else w.to(torch.float32).reshape(1, -1)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform ``x H_B / sqrt(B)`` along the last dimension (a power of two ``B``).

    Each pass pairs the halves of blocks of width ``2h``: ``(a, b) -> (a + b, a - b)``; the result is in
    Sylvester (natural) order. Scaling by ``B^{-1/2}`` once at the end keeps the passes exact additions.
    """
    shape = x.shape
    b = shape[-1]
    out = x.contiguous()
    h = 1
    while h < b:
        v = out.view(*shape[:-1], b // (2 * h), 2, h)
        lo, hi = v[..., 0, :], v[..., 1, :]
        out = torch.stack((lo + hi, lo - hi), dim=-2).reshape(shape)
        h *= 2
    return out * (1.0 / math.sqrt(b)) if b > 1 else out


def gaussian_ks(w: torch.Tensor, granularity: str | Granularity) -> float:
    """The mean Kolmogorov-Smirnov statistic of a Gaussian fitted to each group of ``w`` at ``granularity`` (the
    groups a rule fits; :func:`dfquant.grids.distributions.fit_groups`), weighted by group size: how far the
    groups are from the Gaussian a Lloyd-Max table is made for. Compared before and after the rotation, it says
    what the rotation did to the distribution (lower is closer to Gaussian)."""
    gran = Granularity.parse(granularity)
    rows = to_rows(w.detach().to(torch.float32).cpu(), gran)
    G = gran.group_size if gran.kind == "group" else None
    split = G if G is not None and rows.shape[1] > G else None
    total = count = 0.0
    for batch, _ in group_batches(rows, split):
        ks = fit_groups(batch.contiguous(), ks="gaussian").ks_gaussian
        total += float(ks.double().sum()) * batch.shape[1]
        count += batch.numel()
    return total / count if count else math.nan
