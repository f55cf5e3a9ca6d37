"""The no-cache decode path: fast unpacking, table decode of terms, and row-only decode of embeddings.

Every fast path must give the reference values bit for bit (compared as raw bits, so ``-0.0`` and ``+0.0``
differ): the general unpacker, ``QTensor.dequantize`` of the unpacked term, and the full dequantized table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfquant.quantizers.codes as qbase
from dfquant.methods.outliers import split_outliers
from dfquant.nn.base import QuantModule, oriented_weight
from dfquant.nn.layers import QuantEmbedding, QuantLinear
from dfquant.nn.rex import SparseTerm
from dfquant.nn.terms import QuantTerm
from dfquant.quantizers import Granularity, QTensor, get_quantizer, packing
from dfquant.quantizers.codes import decode_codes, gather_levels
from dfquant.quantizers.qtensor import from_rows


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bit patterns (``-0.0 != +0.0``; float32 compared through an int32 view)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.contiguous(), b.contiguous()
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


# -- unpack ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [1, 3, 7, 8, 9, 333, 4097])
def test_unpack_fast_paths_match_general_path(bits: int, numel: int) -> None:
    g = torch.Generator().manual_seed(100 * bits + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.uint8)
    stream = packing.pack(codes, bits)
    fast = packing.unpack(stream, bits, numel)
    assert fast.dtype == torch.uint8 and fast.shape == (numel,)
    assert torch.equal(fast, codes)
    if bits < 8:
        assert torch.equal(packing._unpack_general(stream, bits, numel), codes)
        # any byte pattern, not only streams made by pack(): fast and general paths agree on every bit
        raw = torch.randint(0, 256, (packing.packed_nbytes(numel, bits),), generator=g, dtype=torch.uint8)
        assert torch.equal(packing.unpack(raw, bits, numel), packing._unpack_general(raw, bits, numel))


def test_unpack_4bit_layout_low_nibble_first() -> None:
    """Byte 0x3A holds code 0 = 0xA (low nibble) and code 1 = 0x3 (high nibble); 2 bits: 0b11_10_01_00."""
    assert packing.unpack(torch.tensor([0x3A, 0x05], dtype=torch.uint8), 4, 3).tolist() == [10, 3, 5]
    assert packing.unpack(torch.tensor([0b11100100], dtype=torch.uint8), 2, 4).tolist() == [0, 1, 2, 3]
    assert packing.unpack(torch.tensor([0b10000101], dtype=torch.uint8), 1, 8).tolist() == [1, 0, 1, 0, 0, 0, 0, 1]


def test_unpack_odd_numel_result_is_compact() -> None:
    out = packing.unpack(packing.pack(torch.tensor([1, 2, 3]), 4), 4, 3)
    assert out.tolist() == [1, 2, 3] and out.untyped_storage().nbytes() == 3


# -- term decode ----------------------------------------------------------------------------------------------

TERM_CASES = [
    ("lloyd-max", {}, 4, "group:64", torch.float16),
    ("lloyd-max", {}, 3, "group:16", torch.float32),
    ("lloyd-max", {}, 2, "channel", torch.bfloat16),
    ("minmax", {}, 4, "group:24", torch.float16),  # 40 columns: groups of 24 and a tail of 16
    ("minmax", {"grid": "uint"}, 5, "channel:1", torch.float32),
    ("minmax", {"grid": "uint"}, 8, "group:16", torch.float32),  # 256 levels > 16 codes: the direct path
    ("minmax", {}, 1, "tensor", torch.float32),
    ("mse", {"grid": "int"}, 6, "group:8:1", torch.float16),
    ("nf4", {}, 4, "group:32", torch.float32),
    ("lloyd-optimal", {}, 3, "group:16", torch.float32),  # one codebook per group
    ("mxfp4", {}, 4, "group:32", torch.float32),  # float8 (E8M0) scales
]


@pytest.mark.parametrize(("rule", "opts", "bits", "gran", "sdtype"), TERM_CASES)
@pytest.mark.parametrize("shape", [(24, 64), (8, 40), (6, 4, 3, 3)])
def test_term_decode_matches_qtensor_dequantize(
    rule: str, opts: dict, bits: int, gran: str, sdtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=g) * 0.2 + 0.01
    q = get_quantizer(rule, bits, **opts)
    kw = {} if rule == "mxfp4" else {"scale_dtype": sdtype}
    qt = q.quantize(w, gran, **kw)
    term = QuantTerm.from_qtensor(qt)
    ref = _reference_dequantize(term.to_qtensor(torch.float32))
    got = term.dequantize()
    assert _bits_equal(got, ref)
    assert _bits_equal(qt.dequantize(torch.float32), _reference_dequantize(qt))
    # the layer's weight: the float32 sum started from zero (0 + term), no zero tensor built
    zero_sum = torch.zeros(shape) + ref
    assert _bits_equal(term._decode(from_zero=True), zero_sum)
    if rule != "mxfp4" and len(shape) == 2:
        lin = nn.Linear(shape[1], shape[0])
        mod = QuantModule.from_float(lin, [term], cache_weight=False)
        assert _bits_equal(mod.dequantize_weight(), zero_sum)


def _reference_dequantize(qt: QTensor) -> torch.Tensor:
    """The plain decode ``levels[t][code] * scale + offset`` (int64 gather, then two broadcast passes)."""
    rows, n = qt.codes.shape
    G, ngr = qt.group_len, qt.scale.shape[1]
    codes = F.pad(qt.codes.long(), (0, ngr * G - n)).view(rows, ngr, G)
    vals = gather_levels(qt.levels, qt.table_index, codes) * qt.scale.to(torch.float32)[..., None]
    if qt.offset is not None:
        vals = vals + qt.offset.to(torch.float32)[..., None]
    return from_rows(vals.reshape(rows, ngr * G)[:, :n], qt.shape, qt.granularity)


def _qtensor(codes: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, gran: str, **kw: object) -> QTensor:
    return QTensor(
        codes=codes,
        scale=scale,
        offset=kw.get("offset"),  # type: ignore[arg-type]
        levels=levels,
        bits=int(kw.get("bits", 4)),  # type: ignore[call-overload]
        shape=tuple(codes.shape),
        granularity=Granularity.parse(gran),
        dtype=torch.float32,
        quantizer="minmax",
        grid="test",
        table_index=kw.get("table_index"),  # type: ignore[arg-type]
    )


def test_negative_zero_kept_by_dequantize_and_cleared_by_the_weight_sum() -> None:
    """A zero scale times a negative level is ``-0.0``: a term decodes it as such (as QTensor.dequantize
    does), the layer weight ``0 + term`` holds ``+0.0``, exactly as the zero-started sum did."""
    levels = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    codes = torch.tensor([[0, 1, 2, 3, 0, 3], [3, 2, 1, 0, 1, 1]], dtype=torch.uint8)
    scale = torch.tensor([[0.0, 2.0], [0.5, 0.0]])
    term = QuantTerm.from_qtensor(_qtensor(codes, scale, levels, "group:3", bits=2))
    vals = term.dequantize()
    assert vals.tolist() == [[-0.0, -0.0, 0.0, 3.0, -3.0, 3.0], [0.75, 0.25, -0.25, -0.0, -0.0, -0.0]]
    assert torch.signbit(vals).tolist() == [[True, True, False, False, True, False], [False, False, True] + [True] * 3]
    w = QuantLinear.from_float(nn.Linear(6, 2), [term]).dequantize_weight()
    assert not bool(torch.signbit(w[vals == 0]).any())
    assert _bits_equal(w, torch.zeros(2, 6) + vals)


def test_decode_codes_table_and_direct_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacked tables, a padded last group, offsets: both evaluation orders give ``levels[t][c] * s + o``."""
    levels = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [-3.0, -1.0, 1.0, 3.0]])
    codes = torch.tensor([[0, 1, 2, 3, 3], [1, 1, 0, 2, 3]], dtype=torch.uint8)
    scale = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    offset = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    table = torch.tensor([[1, 0], [0, 1]])
    # groups of 3 (the last one 2 long) and of 4 (the last one 1 long)
    expect3 = [[-1.5, -0.5, 0.5, 5.0, 5.0], [-1.0, -1.0, -2.0, 0.75, 1.25]]
    expect4 = [[-1.5, -0.5, 0.5, 1.5, 5.0], [-1.0, -1.0, -2.0, 0.0, 1.25]]
    shared4 = [[-1.5, -0.5, 0.5, 1.5, 6.0], [-1.0, -1.0, -3.0, 1.0, 0.75]]
    for ratio in (0.0, 1.0):  # gather the levels then scale and shift / per-group decode table then gather
        monkeypatch.setattr(qbase, "_TABLE_RATIO", ratio)
        assert decode_codes(codes, scale, offset, levels, table, 3).tolist() == expect3
        assert decode_codes(codes, scale, offset, levels, table, 4).tolist() == expect4
        assert decode_codes(codes, scale, None, levels[1], None, 4).tolist() == shared4


@pytest.mark.parametrize(("bits", "group_len", "tables"), [(4, 64, 5), (4, 8, 1), (8, 64, 3), (2, 3, 2)])
def test_decode_codes_both_orders_bit_identical(
    bits: int, group_len: int, tables: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(bits * group_len + tables)
    R, n = 33, 5 * group_len + group_len // 2 + 1
    ngr = -(-n // group_len)
    codes = torch.randint(0, 2**bits, (R, n), generator=g, dtype=torch.uint8)
    levels = torch.randn(tables, 2**bits, generator=g) if tables > 1 else torch.randn(2**bits, generator=g)
    index = torch.randint(0, tables, (R, ngr), generator=g) if tables > 1 else None
    scale = (torch.rand(R, ngr, generator=g) * (torch.rand(R, ngr, generator=g) > 0.2)).to(torch.float16)
    offset = torch.randn(R, ngr, generator=g).to(torch.bfloat16)
    out = []
    for ratio in (0.0, 1e9):
        monkeypatch.setattr(qbase, "_TABLE_RATIO", ratio)
        out += [decode_codes(codes, scale, None, levels, index, group_len, from_zero=z) for z in (False, True)]
        out.append(decode_codes(codes, scale, offset, levels, index, group_len))
    for a, b in zip(out[:3], out[3:], strict=True):
        assert _bits_equal(a, b)
    assert bool(torch.signbit(out[0][out[0] == 0]).any())  # zero scales times negative levels: -0.0 ...
    assert not bool(torch.signbit(out[1][out[1] == 0]).any())  # ... which the sum from zero turns into +0.0


# -- embeddings: decode only the rows looked up -----------------------------------------------------------------


def _embedding(
    rule: str,
    bits: int,
    gran: str,
    *,
    padding_idx: int | None = None,
    scale_dtype: torch.dtype = torch.float16,
    num: int = 50,
    dim: int = 24,
    **opts: object,
) -> tuple[nn.Embedding, QuantTerm, torch.Tensor]:
    g = torch.Generator().manual_seed(num * 31 + dim)
    emb = nn.Embedding(num, dim, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(num, dim, generator=g) * 0.3 + 0.05)
    w = oriented_weight(emb).detach()
    qt = get_quantizer(rule, bits, **opts).quantize(w, gran, scale_dtype=scale_dtype)
    return emb, QuantTerm.from_qtensor(qt, options=opts), w - qt.dequantize(torch.float32)


EMB_CASES = [
    ("lloyd-max", 4, "group:8", {}),
    ("lloyd-max", 4, "channel", {}),
    ("lloyd-max", 3, "group:16", {}),  # 24 * 3 bits = 9 bytes per row; groups of 16 and 8
    ("minmax", 4, "group:8", {"grid": "uint"}),  # offsets
    ("minmax", 5, "channel", {"grid": "uint"}),  # 24 * 5 bits = 15 bytes per row
    ("minmax", 3, "group:5", {"grid": "uint"}),  # 24 * 3 bits: rows on byte boundaries, groups not
    ("minmax", 8, "group:4", {}),  # direct path (256 levels > 4 codes per group)
    ("minmax", 2, "tensor", {"grid": "uint"}),  # one group for the whole table
    ("lloyd-optimal", 2, "group:12", {}),  # one codebook per group
]


def _ids(num: int, padding_idx: int | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, num, (4, 9), generator=g)
    ids[0, :3] = ids[1, 5]  # repeats
    if padding_idx is not None:
        ids[2, 2:4] = padding_idx
    return ids


@pytest.mark.parametrize(("rule", "bits", "gran", "opts"), EMB_CASES)
@pytest.mark.parametrize("dim", [24, 13])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_nocache_decodes_only_looked_up_rows(
    rule: str, bits: int, gran: str, opts: dict, dim: int, padding_idx: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    emb, term, _ = _embedding(rule, bits, gran, padding_idx=padding_idx, dim=dim, **opts)
    cached = QuantModule.from_float(emb, [term])
    nocache = QuantModule.from_float(emb, [term], cache_weight=False)
    assert isinstance(nocache, QuantEmbedding) and isinstance(cached, QuantEmbedding)
    ids = _ids(50, padding_idx)
    ref = cached(ids)
    assert _bits_equal(ref, F.embedding(ids, cached.weight))

    def refuse() -> torch.Tensor:
        raise AssertionError("the whole table was decoded")

    monkeypatch.setattr(nocache, "dequantize_weight", refuse)
    got = nocache(ids)
    assert _bits_equal(got, ref)
    assert nocache._cached is None
    rows = torch.tensor([7, 0, 49, 7, 3])
    assert _bits_equal(nocache.dequantize_weight_rows(rows), cached.weight[rows])
    assert _bits_equal(nocache(torch.tensor([5], dtype=torch.int32)), cached.weight[5:6])


def test_embedding_rows_with_channel_subset_term_and_outliers() -> None:
    """A residual term on some tokens (``channels``) and an outlier residual: rows carry exactly their share."""
    emb, base, resid = _embedding("lloyd-max", 2, "group:8")
    chans = torch.tensor([4, 17, 30, 31, 2])
    sub = QuantTerm.from_qtensor(
        get_quantizer("minmax", 4, grid="uint").quantize(resid[chans], "channel", scale_dtype=torch.float16),
        channels=chans,
    )
    bulk, res = split_outliers(oriented_weight(emb).detach(), get_quantizer("lloyd-max", 3), 0.02)
    cached = QuantModule.from_float(emb, [base, sub])
    nocache = QuantModule.from_float(emb, [base, sub], cache_weight=False)
    for m in (cached, nocache):
        m.outliers = SparseTerm.from_residual(res)
    assert nocache.outliers.count == round(0.02 * 50 * 24)
    ids = torch.tensor([[4, 5, 17, 2, 2], [30, 0, 49, 31, 4]])
    full = cached.weight
    assert _bits_equal(nocache(ids), cached(ids))
    assert _bits_equal(nocache(ids), full[ids])
    # the sub-term changes its rows only; the outliers touch the rows they fall in
    plain = QuantModule.from_float(emb, [base], cache_weight=False)
    differs = (nocache(torch.arange(50)) != plain(torch.arange(50))).any(dim=1)
    rows_out = set((res.index // 24).tolist())
    assert set(differs.nonzero().flatten().tolist()) <= set(chans.tolist()) | rows_out
    assert set(chans.tolist()) <= set(differs.nonzero().flatten().tolist())
    # a first term covering only some channels: the rest of the rows are 0 (+ outliers)
    only_sub = QuantModule.from_float(emb, [sub], cache_weight=False)
    rows = torch.tensor([0, 4, 31])
    assert _bits_equal(only_sub.dequantize_weight_rows(rows), only_sub.dequantize_weight()[rows])
    assert only_sub.dequantize_weight_rows(rows)[0].tolist() == [0.0] * 24
    del bulk


def test_embedding_falls_back_to_full_decode_where_rows_are_not_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """``channel:1`` scales run along the embedding dimension: a token's values come from every row of
    codes, so the layer decodes the whole table (and gives the same values)."""
    emb, term, _ = _embedding("minmax", 4, "channel:1")
    cached = QuantModule.from_float(emb, [term])
    nocache = QuantModule.from_float(emb, [term], cache_weight=False)
    assert nocache.dequantize_weight_rows(torch.tensor([1, 2])) is None
    calls = []
    full = nocache.dequantize_weight
    monkeypatch.setattr(nocache, "dequantize_weight", lambda: calls.append(1) or full())
    ids = _ids(50, None)
    assert _bits_equal(nocache(ids), cached(ids)) and calls == [1]


def test_embedding_nocache_keeps_errors_for_bad_ids() -> None:
    emb, term, _ = _embedding("lloyd-max", 4, "group:8")
    nocache = QuantModule.from_float(emb, [term], cache_weight=False)
    for bad in (torch.tensor([1, 50]), torch.tensor([-1, 3])):
        with pytest.raises(IndexError):
            nocache(bad)
    assert nocache(torch.zeros(0, dtype=torch.int64)).shape == (0, 24)


def test_embedding_nocache_matches_float16_layer() -> None:
    """The layer dtype cast applies to the rows as to the full table."""
    emb, term, _ = _embedding("lloyd-max", 4, "group:8")
    cached = QuantModule.from_float(emb, [term]).half()
    nocache = QuantModule.from_float(emb, [term], cache_weight=False).half()
    ids = _ids(50, None)
    out = nocache(ids)
    assert out.dtype == torch.float16 and torch.equal(out, cached(ids))
