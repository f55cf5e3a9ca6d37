"""Pack and unpack k-bit codes (k = 1..8) into a uint8 bit stream.

Codes are laid out little-endian: code ``i`` occupies bits ``[k*i, k*(i+1))`` of the stream, bit 0 being the
least significant bit of byte 0. Eight codes fill exactly ``k`` bytes, so packing works on blocks of eight codes
(one 64-bit word each); only the stream is padded (to a whole byte), and the caller records ``numel`` to undo
the padding. The packed size is ``ceil(numel * k / 8)`` bytes.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError, InputError


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of the packed stream of ``numel`` codes at ``bits`` each."""
    return math.ceil(numel * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in ``[0, 2^bits)``) into a 1-D uint8 tensor.

    Args:
        codes: integer tensor; flattened in row-major order.
        bits: bits per code, 1..8.

    Returns:
        uint8 tensor of ``ceil(numel * bits / 8)`` bytes.

    Raises:
        ConfigError: bits outside 1..8.
        InputError: a code does not fit in ``bits``.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if flat.is_floating_point():
        raise InputError(f"codes must be integers, got {flat.dtype}")
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 2**bits:
        raise InputError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing, found [{lo}, {hi}]")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    blocks = -(-n // 8)
    c = torch.zeros(blocks * 8, dtype=torch.int64)
    c[:n] = flat.to(torch.int64)
    c = c.view(blocks, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=1)  # at most 64 bits; codes occupy disjoint bit ranges
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)].contiguous()


def unpack(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes of the stream, as uint8.

    Raises:
        ConfigError: bits outside 1..8.
        InputError: the stream is shorter (or longer) than ``ceil(numel * bits / 8)`` bytes.
    """
    _check_bits(bits)
    need = packed_nbytes(numel, bits)
    flat = data.reshape(-1)
    if flat.dtype != torch.uint8 or flat.numel() != need:
        raise InputError(
            f"a packed stream of {numel} codes at {bits} bits must be {need} uint8 bytes, "
            f"got {flat.numel()} of {flat.dtype}"
        )
    if numel == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if bits == 8:
        return flat.clone()
    blocks = -(-numel // 8)
    b = torch.zeros(blocks * bits, dtype=torch.int64)
    b[:need] = flat.to(torch.int64)
    b = b.view(blocks, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = ((word[:, None] >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(-1)
    return codes[:numel].contiguous()


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"bits per code must be an integer in 1..8, got {bits!r}")
