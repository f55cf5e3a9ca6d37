"""Number grids: the finite, sorted sets of levels that a code decodes to.

A :class:`Grid` knows nothing about tensors' statistics: it is a number format at unit scale. A quantizer picks
a per-group ``scale`` (and ``offset``) and encodes ``z = (x - offset) / scale`` on the grid; the code of a value
is the index of its level in the sorted level list, so every grid packs the same way (``bits`` per code).

Families (``make_grid(family, bits)``):

* ``int``      two's complement integers ``-2^(b-1) .. 2^(b-1)-1`` (has a zero level; 1 bit gives {-1, 0}).
* ``int-sym``  restricted symmetric integers ``-(2^(b-1)-1) .. 2^(b-1)-1`` (zero level, 2^b - 1 levels; b >= 2).
* ``int-mr``   mid-rise symmetric levels ``k + 1/2`` for ``k = -2^(b-1) .. 2^(b-1)-1`` (no zero level, 2^b levels):
               the uniform quantizer of Max (1960) and of ACIQ (Banner et al., 2019).
* ``uint``     unsigned integers ``0 .. 2^b - 1`` (asymmetric quantization with a zero point / offset).
* minifloats with the OCP Microscaling definitions (OCP MX v1.0, 2023): ``fp8_e4m3`` (max 448, no inf),
  ``fp8_e5m2`` (IEEE-like, max 57344), ``fp6_e3m2`` (max 28), ``fp6_e2m3`` (max 7.5), ``fp4_e2m1``
  (levels ±{0, .5, 1, 1.5, 2, 3, 4, 6}). Positive and negative zero share one level.
* codebooks: ``nf4`` (QLoRA, Dettmers et al. 2023), ``lloyd-gaussian`` / ``lloyd-laplace`` (Lloyd-Max levels of
  the unit-variance source, see :mod:`dfquant.grids.lloyd_max`), ``apot`` (additive powers of two, Li et al. ICLR 2020),
  ``iq4_nl`` (llama.cpp's 4-bit non-linear table ``kvalues_iq4nl``, in its own integer units, so that a file of it
  maps exactly onto GGUF's IQ4_NL type).

Encoding is round-to-nearest and saturating (values beyond the extreme levels take the extreme level), with ties
going to the level whose distance (in levels) from zero is even, i.e. round-half-to-even for integer and
minifloat grids.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Literal

import torch

from dfquant.errors import ConfigError
from dfquant.grids.lloyd_max import lloyd_max_table

GridKind = Literal["int", "float", "codebook"]

#: Minifloat formats: name -> (exponent bits, mantissa bits, has inf/nan encodings like IEEE, E4M3-style NaN only).
MINIFLOATS: dict[str, tuple[int, int, str]] = {
    "fp8_e4m3": (4, 3, "e4m3"),
    "fp8_e5m2": (5, 2, "ieee"),
    "fp6_e3m2": (3, 2, "none"),
    "fp6_e2m3": (2, 3, "none"),
    "fp4_e2m1": (2, 1, "none"),
}

#: NF4 levels from QLoRA (Dettmers et al., 2023, Appendix E), as shipped by bitsandbytes.
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: llama.cpp's IQ4_NL levels (ggml ``kvalues_iq4nl``): a non-uniform 16-level table, denser near zero.
IQ4_NL_LEVELS: tuple[float, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

INT_FAMILIES = ("int", "int-sym", "int-mr", "uint")
CODEBOOK_FAMILIES = ("nf4", "iq4_nl", "lloyd-gaussian", "lloyd-laplace", "apot")
FAMILIES = INT_FAMILIES + tuple(MINIFLOATS) + CODEBOOK_FAMILIES
#: Families with one width of their own (``bits`` must be ``None`` or that width).
FIXED_WIDTH_FAMILIES = (*MINIFLOATS, "nf4", "iq4_nl")


@dataclass(frozen=True, eq=False)
class Grid:
    """A sorted set of levels at unit scale, with nearest-level encoding.

    Attributes:
        name: canonical name, e.g. ``"int4-mr"``, ``"fp8_e4m3"``, ``"lloyd-gaussian3"``.
        family: the family it was built from (see :data:`FAMILIES`).
        kind: ``"int"``, ``"float"`` or ``"codebook"``.
        bits: bits per code; ``len(levels) <= 2**bits``.
        levels: the levels, strictly increasing.
    """

    name: str
    family: str
    kind: GridKind
    bits: int
    levels: tuple[float, ...]
    _zero_index: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        lv = self.levels
        if len(lv) < 1 or len(lv) > 2**self.bits:
            raise ConfigError(f"grid '{self.name}' has {len(lv)} levels; {self.bits} bits allow 1..{2**self.bits}")
        if any(b <= a for a, b in itertools.pairwise(lv)):
            raise ConfigError(f"grid '{self.name}': levels must be strictly increasing")

    @cached_property
    def table(self) -> torch.Tensor:
        """The levels as a float32 tensor."""
        return torch.tensor(self.levels, dtype=torch.float32)

    @cached_property
    def midpoints(self) -> torch.Tensor:
        """Decision thresholds (midpoints between consecutive levels), float32."""
        t = self.table
        return (t[:-1] + t[1:]) * 0.5

    @cached_property
    def _tie_up(self) -> torch.Tensor:
        """For each midpoint, 1 when a tie goes to the upper level (ties to the level at even distance from 0)."""
        n = len(self.levels)
        ref = self.zero_index if self.zero_index is not None else 0
        up = [1 if abs(k + 1 - ref) % 2 == 0 else 0 for k in range(n - 1)]
        return torch.tensor(up, dtype=torch.int64)

    @property
    def zero_index(self) -> int | None:
        """Index of the level 0.0, or None when the grid has no zero level."""
        if self._zero_index is not None:
            return self._zero_index
        try:
            return self.levels.index(0.0)
        except ValueError:
            return None

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def max_abs(self) -> float:
        """Largest magnitude level (the clip of a grid used at scale 1)."""
        return max(abs(self.levels[0]), abs(self.levels[-1]))

    @property
    def symmetric(self) -> bool:
        """True when the level set is symmetric about zero."""
        lv = self.levels
        return all(math.isclose(a, -b, abs_tol=1e-12) for a, b in zip(lv, reversed(lv), strict=True))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-level codes of ``z`` (already divided by the scale), saturating, ties to even.

        Args:
            z: float tensor of any shape.

        Returns:
            uint8 tensor (int16 for grids of more than 256 levels) of level indices, same shape as ``z``.
        """
        z = z.to(torch.float32)
        mids = self.midpoints.to(z.device)
        if mids.numel() == 0:
            return torch.zeros(z.shape, dtype=torch.uint8, device=z.device)
        if self.kind == "int":
            # Unit-spaced levels: the index is round(z - lowest level), clamped. torch.round rounds half to even,
            # which on these grids is the same tie rule as below (even distance from the zero level, or even
            # index when there is no zero level), so both paths give identical codes.
            # Mid-rise grids (levels k + 1/2) use floor(z) instead: z - y_0 would round tiny negative z onto the
            # half-integer tie and lose its sign; their ties (integer z) go to the even index.
            zi = self.zero_index
            if zi is not None:
                idx = torch.round(z) + zi
            else:
                fl = torch.floor(z)
                idx = fl - (self.levels[0] - 0.5)
                idx = torch.where((z == fl) & (torch.remainder(idx, 2) == 1), idx - 1, idx)
            return idx.clamp_(0, self.num_levels - 1).to(torch.uint8)
        idx = torch.bucketize(z, mids)  # z == mids[k] -> k (the lower level)
        k = idx.clamp(max=mids.numel() - 1)
        tie = (z == mids[k]) & (idx < mids.numel())
        idx = torch.where(tie, idx + self._tie_up.to(z.device)[k], idx)
        return idx.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Levels (float32) of integer ``codes``."""
        return self.table.to(codes.device)[codes.long()]

    def round(self, z: torch.Tensor) -> torch.Tensor:
        """Saturating round-to-nearest onto the grid (``decode(encode(z))``)."""
        return self.decode(self.encode(z))


def _int_levels(family: str, bits: int) -> list[float]:
    if family == "int":
        return [float(k) for k in range(-(2 ** (bits - 1)), 2 ** (bits - 1))]
    if family == "int-sym":
        if bits < 2:
            raise ConfigError("grid 'int-sym' needs bits >= 2 (1 bit has only the zero level); use 'int-mr'")
        m = 2 ** (bits - 1) - 1
        return [float(k) for k in range(-m, m + 1)]
    if family == "int-mr":
        return [k + 0.5 for k in range(-(2 ** (bits - 1)), 2 ** (bits - 1))]
    if family == "uint":
        return [float(k) for k in range(2**bits)]
    raise ConfigError(f"unknown integer grid family '{family}'")


def minifloat_levels(exp_bits: int, man_bits: int, special: str) -> list[float]:
    """All finite values of a sign + ``exp_bits`` + ``man_bits`` minifloat, sorted, one zero.

    Value of exponent field ``E`` and mantissa ``M`` with bias ``2^(e-1) - 1``:
    ``2^(E - bias) * (1 + M / 2^m)`` for ``E > 0`` and ``2^(1 - bias) * M / 2^m`` (subnormal) for ``E = 0``.

    Args:
        exp_bits: exponent bits ``e``.
        man_bits: mantissa bits ``m``.
        special: ``"ieee"`` (top exponent is inf/NaN), ``"e4m3"`` (only all-ones is NaN, OCP FP8 E4M3), or
            ``"none"`` (every pattern is finite: OCP FP6 and FP4).
    """
    bias = 2 ** (exp_bits - 1) - 1
    pos: set[float] = set()
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            if special == "ieee" and e == 2**exp_bits - 1:
                continue
            if special == "e4m3" and e == 2**exp_bits - 1 and m == 2**man_bits - 1:
                continue
            if e == 0:
                v = 2.0 ** (1 - bias) * (m / 2**man_bits)
            else:
                v = 2.0 ** (e - bias) * (1 + m / 2**man_bits)
            pos.add(v)
    vals = sorted(pos)
    return [-v for v in reversed(vals[1:])] + vals


def apot_levels(bits: int) -> list[float]:
    """Additive powers-of-two levels (Li, Dong, Wang, ICLR 2020), signed, normalized to max 1.

    With ``m = b - 1`` magnitude bits split into ``n = ceil(m / 2)`` additive terms of ``k_i = 2`` bits (the last
    one of 1 bit when ``m`` is odd), term ``i`` takes a value in ``{0} U {2^-(i + j n) : j < 2^k_i - 1}`` (the
    paper's ``p_i in {0, 2^-i, 2^-(i+n), ..., 2^-(i+(2^k-2)n)}``) and a magnitude is the sum of the terms:
    ``2^m`` magnitudes including 0, mirrored to ``2^b - 1`` signed levels and normalized to a largest level of 1.
    """
    if not 2 <= bits <= 8:
        raise ConfigError(f"APoT grids exist for 2..8 bits, got {bits}")
    m = bits - 1
    n_terms = math.ceil(m / 2)
    term_bits = [2] * (m // 2) + [1] * (m % 2)
    sums = {0.0}
    for i, k in enumerate(term_bits):
        term = [0.0] + [2.0 ** -(i + j * n_terms) for j in range(2**k - 1)]
        sums = {a + t for a in sums for t in term}
    mags = sorted(sums)
    top = mags[-1]
    mags = [v / top for v in mags]
    return [-m for m in reversed(mags[1:])] + mags


@cache
def make_grid(family: str, bits: int | None = None) -> Grid:
    """Build (and cache) a grid of ``family`` at ``bits``.

    Args:
        family: one of :data:`FAMILIES`; a full name such as ``"int4-mr"`` or ``"lloyd-gaussian3"`` also works.
        bits: bits per code; fixed-width formats (minifloats, ``nf4``) accept ``None`` or their own width.

    Raises:
        ConfigError: unknown family, or bits outside what the family supports.
    """
    fam, b = _split_name(family, bits)
    if fam in MINIFLOATS:
        e, m, special = MINIFLOATS[fam]
        width = 1 + e + m
        if b not in (None, width):
            raise ConfigError(f"grid '{fam}' is {width} bits wide, got bits={b}")
        return Grid(fam, fam, "float", width, tuple(minifloat_levels(e, m, special)))
    if fam == "nf4":
        if b not in (None, 4):
            raise ConfigError(f"grid 'nf4' is 4 bits wide, got bits={b}")
        return Grid("nf4", "nf4", "codebook", 4, NF4_LEVELS)
    if fam == "iq4_nl":
        if b not in (None, 4):
            raise ConfigError(f"grid 'iq4_nl' is 4 bits wide, got bits={b}")
        return Grid("iq4_nl", "iq4_nl", "codebook", 4, tuple(float(v) for v in IQ4_NL_LEVELS))
    if b is None:
        raise ConfigError(f"grid family '{fam}' needs a bit-width")
    if not 1 <= b <= 8:
        raise ConfigError(f"bits must be in 1..8 for grid '{fam}', got {b}")
    if fam in INT_FAMILIES:
        suffix = {"int": "", "int-sym": "-sym", "int-mr": "-mr", "uint": ""}[fam]
        prefix = "uint" if fam == "uint" else "int"
        return Grid(f"{prefix}{b}{suffix}", fam, "int", b, tuple(_int_levels(fam, b)))
    if fam in ("lloyd-gaussian", "lloyd-laplace"):
        dist = fam.split("-")[1]
        lv = lloyd_max_table(dist, b).levels
        return Grid(f"{fam}{b}", fam, "codebook", b, tuple(float(v) for v in lv))
    if fam == "apot":
        return Grid(f"apot{b}", "apot", "codebook", b, tuple(apot_levels(b)))
    raise ConfigError(f"unknown grid family '{family}'; known: {', '.join(FAMILIES)}")


def _split_name(name: str, bits: int | None) -> tuple[str, int | None]:
    """Split names like ``int4-mr`` or ``lloyd-gaussian3`` into (family, bits)."""
    if name in FAMILIES:
        return name, bits
    import re

    m = re.fullmatch(r"(u?int)(\d+)(-sym|-mr)?", name)
    if m:
        fam = m.group(1) + (m.group(3) or "")
        b = int(m.group(2))
    else:
        m = re.fullmatch(r"(lloyd-gaussian|lloyd-laplace|apot)(\d+)", name)
        if not m:
            raise ConfigError(f"unknown grid '{name}'; known families: {', '.join(FAMILIES)}")
        fam, b = m.group(1), int(m.group(2))
    if bits is not None and bits != b:
        raise ConfigError(f"grid '{name}' is {b} bits, but bits={bits} was asked")
    return fam, b
