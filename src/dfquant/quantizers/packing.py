"""Pack and unpack k-bit codes (k = 1..8) into a uint8 bit stream.

Codes are laid out little-endian: code ``i`` occupies bits ``[k*i, k*(i+1))`` of the stream, bit 0 being the
least significant bit of byte 0. Eight codes fill exactly ``k`` bytes, so packing works on blocks of eight codes
(one 64-bit word each); only the stream is padded (to a whole byte), and the caller records ``numel`` to undo
the padding. The packed size is ``ceil(numel * k / 8)`` bytes.
"""

from __future__ import annotations

import math

import torch

from dfquant.errors import ConfigError, InputError

#: Blocks of 8 codes packed per step by :func:`pack` (bounds its temporaries to a few tens of MB).
_PACK_BLOCKS = 1 << 19


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
        return torch.zeros(0, dtype=torch.uint8, device=flat.device)
    if flat.is_floating_point():
        raise InputError(f"codes must be integers, got {flat.dtype}")
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 2**bits:
        raise InputError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing, found [{lo}, {hi}]")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    # Blocks of 8 codes become `bits` bytes each, independently: pack a bounded number of blocks at a time so
    # that the int64 working copies stay small (a 131M-code tensor would otherwise need 2 GB of temporaries).
    blocks = -(-n // 8)
    dev = flat.device
    out = torch.empty(blocks * bits, dtype=torch.uint8, device=dev)
    shifts = torch.arange(8, dtype=torch.int64, device=dev) * bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=dev) * 8
    for b0 in range(0, blocks, _PACK_BLOCKS):
        b1 = min(blocks, b0 + _PACK_BLOCKS)
        part = flat[b0 * 8 : min(n, b1 * 8)].to(torch.int64)
        c = torch.zeros((b1 - b0) * 8, dtype=torch.int64, device=dev)
        c[: part.numel()] = part
        word = (c.view(-1, 8) << shifts).sum(dim=1)  # at most 64 bits; codes occupy disjoint bit ranges
        out[b0 * bits : b1 * bits] = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)].contiguous()


def unpack(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes of the stream, as uint8 (on ``data``'s device).

    For ``bits`` in 1, 2, 4 a byte holds ``p = 8 / bits`` whole codes: code ``i`` is
    ``(byte[i // p] >> (bits * (i % p))) & (2^bits - 1)`` (for 4 bits: the low nibble is code ``2j``, the high
    nibble code ``2j + 1``), computed with uint8 shifts and masks only. 8 bits is a copy; 3, 5, 6, 7 bits take
    the general path (blocks of 8 codes = ``bits`` bytes assembled into 64-bit words).

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
        return torch.zeros(0, dtype=torch.uint8, device=flat.device)
    if bits == 8:
        return flat.clone()
    if bits in (1, 2, 4):
        return _unpack_whole_bytes(flat, bits, numel)
    return _unpack_general(flat, bits, numel)


def _unpack_whole_bytes(flat: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """:func:`unpack` for ``bits`` dividing 8: column ``j`` of ``(bytes, 8 / bits)`` codes is
    ``(byte >> (bits * j)) & (2^bits - 1)``."""
    per = 8 // bits
    mask = (1 << bits) - 1
    codes = torch.empty(flat.numel(), per, dtype=torch.uint8, device=flat.device)
    for j in range(per):
        shifted = flat >> (bits * j) if j else flat
        if j == per - 1:
            codes[:, j] = shifted  # the top code of a byte needs no mask
        else:
            torch.bitwise_and(shifted, mask, out=codes[:, j])
    out = codes.view(-1)
    return out if out.numel() == numel else out[:numel].clone()


def _unpack_general(flat: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """:func:`unpack` for any ``bits`` in 1..7: each block of 8 codes is ``bits`` bytes, read as one
    little-endian word ``w = sum_b byte_b << 8b``; code ``j`` of the block is ``(w >> bits*j) & (2^bits - 1)``
    (int64 temporaries, bounded by :data:`_PACK_BLOCKS` blocks at a time)."""
    need = flat.numel()
    dev = flat.device
    blocks = -(-numel // 8)
    codes = torch.empty(blocks * 8, dtype=torch.uint8, device=dev)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=dev) * 8
    shifts = torch.arange(8, dtype=torch.int64, device=dev) * bits
    for b0 in range(0, blocks, _PACK_BLOCKS):  # bounded int64 temporaries, as in pack()
        b1 = min(blocks, b0 + _PACK_BLOCKS)
        part = flat[b0 * bits : min(need, b1 * bits)].to(torch.int64)
        b = torch.zeros((b1 - b0) * bits, dtype=torch.int64, device=dev)
        b[: part.numel()] = part
        word = (b.view(-1, bits) << byte_shifts).sum(dim=1)
        codes[b0 * 8 : b1 * 8] = ((word[:, None] >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(-1)
    return codes[:numel].contiguous()


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"bits per code must be an integer in 1..8, got {bits!r}")
