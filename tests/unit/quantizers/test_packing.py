"""pack/unpack work in bounded chunks; the bytes must not depend on where the chunks fall."""

from __future__ import annotations

import pytest
import torch

from dfquant.quantizers import packing


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 7])
@pytest.mark.parametrize("n", [1, 8 * 37, 8 * 37 + 5])
def test_chunked_pack_equals_one_chunk(monkeypatch: pytest.MonkeyPatch, bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    whole = packing.pack(codes, bits)
    monkeypatch.setattr(packing, "_PACK_BLOCKS", 3)  # many chunks, the last one ragged
    chunked = packing.pack(codes, bits)
    assert torch.equal(chunked, whole)
    assert chunked.numel() == packing.packed_nbytes(n, bits)
    assert torch.equal(packing.unpack(chunked, bits, n), codes)
