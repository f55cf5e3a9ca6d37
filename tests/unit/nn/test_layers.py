"""Quantized layers: QTensor <-> term round trips, forwards against the float functional ops, several terms,
channel-subset terms, the weight cache, and rebuilding from metadata."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfquant.errors import ConfigError, InputError
from dfquant.nn.base import QuantModule, is_hf_conv1d, layer_kind, oriented_weight
from dfquant.nn.layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantHFConv1D, QuantLinear
from dfquant.nn.terms import QuantTerm, term_layout
from dfquant.quantizers import Granularity, QTensor, available, get_quantizer


class Conv1D(nn.Module):
    """A stand-in for transformers' GPT-2 ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.shape[:-1], self.nf)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(size_out)


def _quantize(layer: nn.Module, rule: str = "minmax", bits: int = 4, gran: str = "channel", **opts) -> QuantModule:
    w = oriented_weight(layer).detach()
    qt = get_quantizer(rule, bits, **opts).quantize(w, gran)
    return QuantModule.from_float(layer, [QuantTerm.from_qtensor(qt, options=opts)])


RULES = [("minmax", {}), ("minmax", {"grid": "uint"}), ("mse", {"grid": "int"})]
if "lloyd-max" in available():
    RULES.append(("lloyd-max", {}))


@pytest.mark.parametrize(("rule", "opts"), RULES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group:16", "channel:1"])
def test_term_round_trip(rule: str, opts: dict, bits: int, gran: str) -> None:
    w = torch.randn(6, 40)
    qt = get_quantizer(rule, bits, **opts).quantize(w, gran)
    term = QuantTerm.from_qtensor(qt, options=opts)
    back = term.to_qtensor()
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(term.dequantize(), qt.dequantize(torch.float32))
    assert term.packed.dtype == torch.uint8 and term.packed.numel() == -(-w.numel() * bits // 8)
    assert term.storage_bits() == sum(qt.storage_bits().values())
    specs = QuantTerm.buffer_specs(term.meta())
    assert {k: (t.dtype, tuple(t.shape)) for k, t in term.named_buffers()} == specs
    assert term_layout(w.shape, gran)[2] == qt.scale.shape[1]


def test_linear_forward_matches_functional() -> None:
    lin = nn.Linear(32, 12)
    q = _quantize(lin, "minmax", 4)
    assert isinstance(q, QuantLinear)
    x = torch.randn(5, 3, 32)
    w_hat = q.terms[0].dequantize()
    assert torch.equal(q(x), F.linear(x, w_hat, lin.bias))
    assert (q.in_features, q.out_features) == (32, 12)
    assert torch.equal(q.weight, w_hat)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4, bias=False),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 4, (3, 1), padding="same", dilation=(2, 1)),
        nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 4, 3, padding=2, padding_mode="circular"),
        nn.Conv1d(8, 6, 5, padding=2, groups=2),
        nn.Conv1d(8, 6, 3, padding="same", padding_mode="replicate"),
    ],
)
def test_conv_forward_matches_float_layer_with_dequantized_weight(conv: nn.Module) -> None:
    q = _quantize(conv, "mse", 4, "channel")
    assert isinstance(q, QuantConv2d if isinstance(conv, nn.Conv2d) else QuantConv1d)
    x = torch.randn(2, 8, 11, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 8, 13)
    with torch.no_grad():
        conv.weight.copy_(q.terms[0].dequantize())
        torch.testing.assert_close(q(x), conv(x), atol=1e-6, rtol=1e-6)


def test_hf_conv1d() -> None:
    layer = Conv1D(12, 20)
    assert is_hf_conv1d(layer) and layer_kind(layer) == "hf-conv1d"
    assert oriented_weight(layer).shape == (12, 20)
    q = _quantize(layer, "minmax", 8, "channel")
    assert isinstance(q, QuantHFConv1D)
    assert q.weight.shape == (20, 12)  # the (in, out) layout Conv1D code expects
    x = torch.randn(3, 4, 20)
    with torch.no_grad():
        layer.weight.copy_(q.weight)
        torch.testing.assert_close(q(x), layer(x), atol=1e-5, rtol=1e-5)

    class NotConv1D(nn.Module):
        pass

    fake = NotConv1D()
    type(fake).__name__ = "Conv1D"  # a Conv1D by name only: no nf, no weight
    assert not is_hf_conv1d(fake)


def test_several_terms_sum_and_residual_lowers_error() -> None:
    lin = nn.Linear(64, 16)
    w = lin.weight.detach()
    q1 = get_quantizer("minmax", 3).quantize(w, "channel")
    r = w - q1.dequantize()
    q2 = get_quantizer("minmax", 3).quantize(r, "channel")
    q = QuantModule.from_float(lin, [QuantTerm.from_qtensor(q1)])
    err1 = float((q.weight - w).pow(2).sum())
    q.add_term(QuantTerm.from_qtensor(q2))
    err2 = float((q.weight - w).pow(2).sum())
    assert err2 < err1 / 8
    assert torch.equal(q.weight, q1.dequantize(torch.float32) + q2.dequantize(torch.float32))
    assert q.storage_bits() == sum(q1.storage_bits().values()) + sum(q2.storage_bits().values())


def test_channel_subset_term() -> None:
    lin = nn.Linear(16, 8)
    w = lin.weight.detach()
    base = get_quantizer("minmax", 2).quantize(w, "channel")
    q = QuantModule.from_float(lin, [QuantTerm.from_qtensor(base)])
    idx = torch.tensor([5, 1])
    resid = (w - base.dequantize())[idx]
    sub = QuantTerm.from_qtensor(get_quantizer("minmax", 4).quantize(resid, "channel"), channels=idx)
    before = q.weight.clone()
    q.add_term(sub)
    changed = (q.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) <= {1, 5} and changed
    with pytest.raises(InputError, match="does not fit"):
        q.add_term(QuantTerm.from_qtensor(get_quantizer("minmax", 4).quantize(torch.randn(2, 15), "channel")))


def test_cache_behaviour() -> None:
    lin = nn.Linear(16, 4)
    q = _quantize(lin)
    w1 = q.quantized_weight()
    assert q.quantized_weight() is w1
    q.clear_cache()
    w2 = q.quantized_weight()
    assert w2 is not w1 and torch.equal(w1, w2)
    q.load_state_dict(q.state_dict())
    assert q._cached is None
    nocache = QuantModule.from_float(lin, [QuantTerm.from_qtensor(q.terms[0].to_qtensor())], cache_weight=False)
    assert nocache.quantized_weight() is not nocache.quantized_weight()
    x = torch.randn(3, 16)
    assert torch.equal(nocache(x), q(x))


def test_from_meta_rebuilds_identical_layer() -> None:
    for layer in (nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.Linear(9, 3, bias=False), Conv1D(5, 7)):
        q = _quantize(layer, "minmax", 3, "group:4", grid="uint")
        empty = QuantModule.from_meta(q.layer_meta())
        assert type(empty) is type(q)
        empty.load_state_dict(q.state_dict(), strict=True)
        for t in empty.terms:
            t.validate(empty.weight_shape)
        x = torch.randn(2, 4, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, oriented_weight(layer).shape[1])
        assert torch.equal(empty(x), q(x))
        assert empty.layer_meta() == q.layer_meta()
        assert q.matches_float(layer)


def test_from_meta_refuses_bad_metadata() -> None:
    meta = _quantize(nn.Linear(8, 4)).layer_meta()
    with pytest.raises(ConfigError, match="unknown quantized layer type"):
        QuantModule.from_meta({**meta, "type": "conv3d"})
    with pytest.raises(ConfigError, match="weight_shape"):
        QuantModule.from_meta({**meta, "weight_shape": [4, 9]})
    with pytest.raises(ConfigError, match="in_features"):
        QuantModule.from_meta({**meta, "module": {"in_features": 8}})
    bad_term = {**meta["terms"][0], "num_levels": 17}
    with pytest.raises(ConfigError, match="num_levels"):
        QuantModule.from_meta({**meta, "terms": [bad_term]})


def test_validate_catches_codes_beyond_levels() -> None:
    w = torch.randn(4, 8)
    qt = get_quantizer("minmax", 3, grid="int-sym").quantize(w, "channel")  # 7 levels for 8 codes
    term = QuantTerm.from_qtensor(qt)
    term.validate()
    term.packed.fill_(0xFF)
    with pytest.raises(InputError, match="levels"):
        term.validate()


def test_dtype_casts_keep_term_buffers_float32() -> None:
    lin = nn.Linear(16, 4)
    q = _quantize(lin)
    w32 = q.weight.clone()
    q.to(torch.float64)
    assert q.dtype == torch.float64 and q.bias.dtype == torch.float64
    assert q.terms[0].scale.dtype == torch.float32 and q.terms[0].packed.dtype == torch.uint8
    x = torch.randn(2, 16, dtype=torch.float64)
    assert q(x).dtype == torch.float64
    assert torch.equal(q.weight, w32.double())
    assert QuantModule.from_meta(q.layer_meta()).dtype == torch.float64


def test_shared_layer_is_replaced_under_every_name(tmp_path) -> None:
    from dfquant.io.load import load_quantized
    from dfquant.io.save import save_quantized
    from dfquant.pipeline.quantize import quantize_model

    def build(_: object = None) -> nn.Module:
        shared = nn.Linear(8, 8)
        return nn.ModuleDict({"a": shared, "b": shared, "c": nn.Linear(8, 2)})

    model = build()
    q, report = quantize_model(model)
    assert [r.name for r in report.layers] == ["a", "c"]
    assert q["a"] is q["b"] and isinstance(q["b"], QuantLinear)
    path = save_quantized(q, tmp_path / "m.safetensors", source={})
    loaded, _ = load_quantized(path, build=build)
    assert loaded["a"] is loaded["b"] and isinstance(loaded["b"], QuantLinear)
    x = torch.randn(3, 8)
    assert torch.equal(loaded["c"](loaded["b"](x)), q["c"](q["b"](x)))


@pytest.mark.parametrize("tables", [2, 5, 300])
def test_stacked_level_tables(tables: int) -> None:
    """Levels given as T tables plus a per-group table index (packed when it fits 8 bits, else int32)."""
    rows, groups, G, bits = 20, 16, 4, 3
    g = torch.Generator().manual_seed(0)
    levels = torch.sort(torch.randn(tables, 2**bits, generator=g), dim=1).values
    index = torch.randint(0, tables, (rows, groups), generator=g)
    qt = QTensor(
        codes=torch.randint(0, 2**bits, (rows, groups * G), generator=g, dtype=torch.uint8),
        scale=torch.rand(rows, groups, generator=g),
        offset=torch.randn(rows, groups, generator=g),
        levels=levels,
        bits=bits,
        shape=(rows, groups * G),
        granularity=Granularity.parse(f"group:{G}"),
        dtype=torch.float32,
        quantizer="minmax",
        grid="test",
        table_index=index,
    )
    term = QuantTerm.from_qtensor(qt)
    assert term.table_index is not None
    assert term.table_index.dtype == (torch.int32 if tables > 256 else torch.uint8)
    assert torch.equal(term.table_indices(), index)
    assert torch.equal(term.dequantize(), qt.dequantize(torch.float32))
    assert term.storage_bits() == sum(qt.storage_bits().values())
    assert term.meta()["num_tables"] == tables
    specs = QuantTerm.buffer_specs(term.meta())
    assert {k: (t.dtype, tuple(t.shape)) for k, t in term.named_buffers()} == specs
    term.validate()
    if tables <= 256 and tables & (tables - 1):  # all-ones indices exceed a table count not a power of 2
        term.table_index.fill_(0xFF)
        with pytest.raises(InputError, match="table indices"):
            term.validate()


# -- embeddings ----------------------------------------------------------------------------------------------


def test_embedding_kind_and_forward() -> None:
    emb = nn.Embedding(50, 24, padding_idx=3)
    assert layer_kind(emb) == "embedding"
    assert layer_kind(nn.Embedding(5, 4, max_norm=1.0)) is None  # renormalizes rows in place: stays float
    assert layer_kind(nn.EmbeddingBag(5, 4)) is None
    q = _quantize(emb, "minmax", 4, "group:8")
    assert isinstance(q, QuantEmbedding) and q.bias is None and q.padding_idx == 3
    # channel axis 0 = the token: one row of 24 / 8 = 3 group scales per token
    assert tuple(q.terms[0].scale.shape) == (50, 3)
    ids = torch.randint(0, 50, (4, 7))
    w_hat = q.weight
    assert w_hat.shape == (50, 24) and torch.equal(q(ids), F.embedding(ids, w_hat))
    assert torch.equal(q(ids), w_hat[ids])
    assert q.matches_float(emb) and not q.matches_float(nn.Embedding(50, 24))
    empty = QuantModule.from_meta(q.layer_meta())
    assert isinstance(empty, QuantEmbedding) and empty.module_args() == q.module_args()
    empty.load_state_dict(q.state_dict(), strict=True)
    assert torch.equal(empty(ids), q(ids))
    nocache = QuantModule.from_meta(q.layer_meta(), cache_weight=False)
    nocache.load_state_dict(q.state_dict(), strict=True)
    assert torch.equal(nocache(ids), q(ids)) and nocache._cached is None


def test_embedding_metadata_refusals() -> None:
    meta = _quantize(nn.Embedding(10, 8), "minmax", 4, "channel").layer_meta()
    assert meta["type"] == "embedding" and meta["bias"] is False
    with pytest.raises(ConfigError, match="no bias"):
        QuantModule.from_meta({**meta, "bias": True})
    with pytest.raises(ConfigError, match="padding_idx"):
        QuantModule.from_meta({**meta, "module": {**meta["module"], "padding_idx": 10}})
    with pytest.raises(ConfigError, match="padding_idx"):
        QuantModule.from_meta({**meta, "module": {**meta["module"], "padding_idx": "0"}})
    with pytest.raises(ConfigError, match="embedding_dim"):
        QuantModule.from_meta({**meta, "module": {"num_embeddings": 10, "padding_idx": None}})


@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16])
def test_term_keeps_scale_storage_dtype(sdtype: torch.dtype) -> None:
    w = torch.randn(12, 64) * 0.05
    qt = get_quantizer("minmax", 4, grid="uint").quantize(w, "group:16", scale_dtype=sdtype)
    term = QuantTerm.from_qtensor(qt)
    assert term.scale.dtype == sdtype and term.offset is not None and term.offset.dtype == sdtype
    assert term.scale_dtype == sdtype
    assert torch.equal(term.dequantize(), qt.dequantize(torch.float32))
    assert term.storage_bits() == sum(qt.storage_bits().values()) == 12 * 64 * 4 + 2 * 16 * 12 * 4
    meta = term.meta()
    assert meta["scale_dtype"] == str(sdtype).removeprefix("torch.")
    specs = QuantTerm.buffer_specs(meta)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in term.named_buffers()} == specs
    assert QuantTerm.buffer_specs({k: v for k, v in meta.items() if k != "scale_dtype"})["scale"][0] == (
        torch.float32
    )  # metadata of format version 1: float32
    with pytest.raises(ConfigError, match="scale_dtype"):
        QuantTerm.buffer_specs({**meta, "scale_dtype": "float8"})
    # a float32 offset beside a float16 scale (a hand-made QTensor) is stored losslessly as float32
    mixed = QTensor(**{**qt.__dict__, "offset": qt.offset.float()})
    assert QuantTerm.from_qtensor(mixed).scale.dtype == torch.float32


def test_casts_leave_every_term_buffer_alone() -> None:
    """``.half()``/``.to()`` change the bias and the compute dtype only; stored scales keep their dtype and
    values (a float32 scale is not rounded through float16, a bfloat16 one not through float16)."""
    for sdtype in (torch.float32, torch.bfloat16):
        lin = nn.Linear(64, 8, bias=False)
        w = lin.weight.detach()
        qt = get_quantizer("minmax", 4).quantize(w, "group:16", scale_dtype=sdtype)
        q = QuantModule.from_float(lin, [QuantTerm.from_qtensor(qt)])
        before = {k: v.clone() for k, v in q.state_dict().items()}
        w32 = q.weight.clone()
        q.half()
        assert q.dtype == torch.float16 and q.weight.dtype == torch.float16
        q.float()
        after = q.state_dict()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
        assert torch.equal(q.weight, w32)
