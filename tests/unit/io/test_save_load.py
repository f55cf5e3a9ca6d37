"""The file format: bit-exact round trips, the manifest, atomic writes, file size arithmetic, and refusals of
truncated, tampered, foreign and mismatched files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dfquant.config import LayerRule, PatternRule, QuantConfig
from dfquant.errors import FileFormatError
from dfquant.io.load import load_quantized
from dfquant.io.manifest import FORMAT_VERSION, METADATA_KEY, read_manifest
from dfquant.io.save import save_quantized
from dfquant.nn.base import QuantModule
from dfquant.pipeline.quantize import quantize_model
from dfquant.quantizers import available
from shared_models import trained_like

SOURCE = {"zoo": "unit-test", "width": 8}


class Conv1D(nn.Module):
    """A stand-in for transformers' ``Conv1D`` (weight ``(in, out)``)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Mixed(nn.Module):
    """Every layer type, a folded BN, an unfolded BN, an embedding and tied weights."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm1d(width)
        self.proj = Conv1D(width, width)
        self.img = nn.Conv2d(3, width, 3, padding=1)
        self.img_bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 11)
        self.tied = nn.Linear(width, 11, bias=False)
        self.tied.weight = self.emb.weight  # tied: both float in most tests below (stored once), or quantized

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).transpose(1, 2)  # (N, C, L)
        h = torch.relu(self.bn(self.conv(h))).transpose(1, 2)  # (N, L, C)
        h = self.proj(h)
        g = torch.relu(self.img_bn(self.img(image))).mean((2, 3))
        return self.head(h + g[:, None]) + self.tied(h)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 11, (2, 6), generator=g), torch.randn(2, 3, 8, 8, generator=g)


def _quantized(rule: LayerRule | None = None) -> tuple[nn.Module, object]:
    cfg = QuantConfig(rule or LayerRule("minmax", 4), rules=(PatternRule("re:emb|tied", skip=True, reason="tied"),))
    with pytest.warns(UserWarning, match="tied"):
        return quantize_model(trained_like(Mixed()), cfg)


RULES = [
    LayerRule("minmax", 4),
    LayerRule("minmax", 3, "group:5", {"grid": "uint"}),
    LayerRule("mse", 2, "tensor"),
]
if "lloyd-max" in available():
    RULES.append(LayerRule("lloyd-max", 3, "group:4"))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.quantizer}-{r.bits}-{r.granularity}")
def test_round_trip_is_bit_exact(tmp_path: Path, rule: LayerRule) -> None:
    q, report = _quantized(rule)
    path = save_quantized(q, tmp_path / "m.safetensors", source=SOURCE, report=report)
    loaded, manifest = load_quantized(path, build=lambda src: Mixed(src["width"]))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(*x), q(*x))
    assert loaded.tied.weight is loaded.emb.weight  # the tie survives
    assert manifest["source"] == SOURCE
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, QuantModule)) == [
        "conv",
        "head",
        "img",
        "proj",
    ]
    # saving the loaded model again gives the same tensors
    path2 = save_quantized(loaded, tmp_path / "again.safetensors", source=SOURCE)
    a, b = load_file(path), load_file(path2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_manifest_contents(tmp_path: Path) -> None:
    q, report = _quantized()
    path = save_quantized(q, tmp_path / "m.safetensors", source=SOURCE, report=report)
    man = read_manifest(path)
    assert man["format"] == "dfquant" and man["format_version"] == FORMAT_VERSION
    assert isinstance(man["library_version"], str)
    assert {(f["layer"], f["bn"]) for f in man["folded_bn"]} == {("conv", "bn"), ("img", "img_bn")}
    conv = man["layers"]["conv"]
    assert conv["type"] == "conv1d" and conv["weight_shape"] == [8, 4, 3] and conv["dtype"] == "float32"
    assert conv["bias"] is True  # folding gave it one
    assert conv["module"]["groups"] == 2
    term = conv["terms"][0]
    assert (term["quantizer"], term["bits"], term["granularity"], term["shape"]) == (
        "minmax",
        4,
        "channel",
        [8, 4, 3],
    )
    assert term["grid"] == "int4-mr"
    assert man["layers"]["proj"]["type"] == "hf-conv1d" and man["layers"]["proj"]["weight_shape"] == [8, 8]
    assert man["aliases"] == {"tied.weight": "emb.weight"}
    assert man["tensors"]["conv.terms.0.packed"] == {"dtype": "U8", "shape": [48]}
    assert "head.weight" not in man["tensors"] and "emb.weight" in man["tensors"]
    assert man["report"]["totals"]["quantized_params"] == report.quantized_params


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q, _ = _quantized()
    dest = tmp_path / "m.safetensors"
    dest.write_bytes(b"previous")

    def boom(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"half")  # type: ignore[arg-type]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dfquant.io.save.save_file", boom)
    with pytest.raises(FileFormatError, match="No space left"):
        save_quantized(q, dest, source=SOURCE)
    assert dest.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["m.safetensors"]
    monkeypatch.undo()
    save_quantized(q, dest, source=SOURCE)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    with pytest.raises(FileFormatError, match="does not exist"):
        save_quantized(q, tmp_path / "no" / "m.safetensors", source=SOURCE)


def test_file_size_matches_bits_per_weight(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    q, report = quantize_model(model, QuantConfig(LayerRule("minmax", 4, "group:128")))
    path = save_quantized(q, tmp_path / "m.safetensors", source=SOURCE, report=report)
    float_rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("bias"))
    arithmetic = report.bits_per_weight * report.quantized_params / 8 + float_rest
    size = path.stat().st_size
    assert abs(size - arithmetic) / arithmetic < 0.02
    assert report.bits_per_weight == pytest.approx(4 + 32 / 128)
    float_size = sum(p.numel() * 4 for p in model.parameters())
    assert float_size / size > 6


# -- refusals ----------------------------------------------------------------------------------------------


def _rewrite(path: Path, out: Path, edit_manifest=None, edit_tensors=None) -> Path:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    man = json.loads(meta[METADATA_KEY])
    if edit_manifest:
        edit_manifest(man)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(man)})
    return out


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    q, _ = _quantized()
    return save_quantized(q, tmp_path / "m.safetensors", source=SOURCE)


def _load(path: Path):
    return load_quantized(path, build=lambda src: Mixed(src["width"]))


def test_truncated_files(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    n = int.from_bytes(data[:8], "little")
    for cut in (0, 5, 8 + n // 2, 8 + n + 10, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(FileFormatError, match=r"truncated|too short|not valid JSON"):
            _load(bad)
        with pytest.raises(FileFormatError):
            read_manifest(bad)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="cannot read"):
        _load(tmp_path / "nothing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(FileFormatError, match="not a file written by dfquant"):
        _load(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        _load(junk)


def _term(man: dict) -> dict:
    return man["layers"]["conv"]["terms"][0]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: _term(m).update(shape=[8, 4, 4]), "conv.terms.0"),
        (lambda m: _term(m).update(quantizer="evil.module:Class"), "unknown quantizer 'evil.module:Class'"),
        (lambda m: _term(m).update(bits=9), "bits"),
        (lambda m: _term(m).update(granularity="group:0"), "granularity 'group:0'"),
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), f"version {FORMAT_VERSION + 1} is newer"),
        (lambda m: m.update(format="other"), "format is 'other'"),
        (lambda m: m.pop("layers"), "missing ['layers']"),
        (lambda m: m.update(extra=1), "unknown ['extra']"),
        (lambda m: m["layers"]["conv"].update(type="conv3d"), "unknown layer type 'conv3d'"),
        (lambda m: m["layers"]["conv"]["module"].update(groups=3), "groups"),
        (lambda m: m["tensors"]["emb.weight"].update(shape=[8, 11]), "emb.weight"),
        (lambda m: m["aliases"].update({"x.weight": "nowhere"}), "alias"),
        (lambda m: m["folded_bn"].append({"layer": "conv"}), "folded_bn"),
    ],
)
def test_tampered_manifest(saved: Path, tmp_path: Path, edit, needle: str) -> None:
    bad = _rewrite(saved, tmp_path / "bad.safetensors", edit_manifest=edit)
    with pytest.raises(FileFormatError) as e:
        _load(bad)
    assert needle in str(e.value)
    assert "bad.safetensors" in str(e.value)


def test_newer_version_names_both_versions(saved: Path, tmp_path: Path) -> None:
    bad = _rewrite(saved, tmp_path / "new.safetensors", edit_manifest=lambda m: m.update(format_version=7))
    with pytest.raises(FileFormatError, match=f"version 7 is newer.*version {FORMAT_VERSION}"):
        read_manifest(bad)


def test_tampered_tensors(saved: Path, tmp_path: Path) -> None:
    def shrink(t: dict) -> None:
        t["conv.terms.0.packed"] = t["conv.terms.0.packed"][:-1].clone()

    bad = _rewrite(saved, tmp_path / "t1.safetensors", edit_tensors=shrink)
    with pytest.raises(FileFormatError, match=r"conv.terms.0.packed"):
        _load(bad)

    def extra(t: dict) -> None:
        t["sneaky"] = torch.zeros(2)

    bad = _rewrite(saved, tmp_path / "t2.safetensors", edit_tensors=extra)
    with pytest.raises(FileFormatError, match="sneaky"):
        _load(bad)

    def nan_scale(t: dict) -> None:
        t["head.terms.0.scale"][0, 0] = float("nan")

    bad = _rewrite(saved, tmp_path / "t3.safetensors", edit_tensors=nan_scale)
    with pytest.raises(FileFormatError, match=r"layer 'head'.*NaN"):
        _load(bad)


def test_skeleton_mismatch(saved: Path) -> None:
    with pytest.raises(FileFormatError, match="layer 'img'"):
        load_quantized(saved, build=lambda src: _with(Mixed(8), "img", nn.Conv2d(3, 8, 5, padding=2)))
    with pytest.raises(FileFormatError, match="no layer 'head'"):
        load_quantized(saved, build=lambda src: _without(Mixed(8), "head"))
    with pytest.raises(FileFormatError, match=r"missing.*extra"):
        load_quantized(saved, build=lambda src: _with(Mixed(8), "extra", nn.Linear(2, 2)))
    with pytest.raises(FileFormatError, match=r"shape differs.*emb.weight"):
        load_quantized(saved, build=lambda src: _with(Mixed(8), "emb", nn.Embedding(12, 8)))
    with pytest.raises(FileFormatError, match="not a BatchNorm"):
        load_quantized(saved, build=lambda src: _with(Mixed(8), "bn", nn.ReLU()))


def _with(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    setattr(model, name, module)
    return model


def _without(model: nn.Module, name: str) -> nn.Module:
    delattr(model, name)
    return model


def _small_cnn(_: object = None) -> nn.Module:
    torch.manual_seed(0)
    return trained_like(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 8, 3),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 10),
        )
    )


@pytest.mark.parametrize("name", available())
def test_every_registered_quantizer_round_trips(tmp_path: Path, name: str) -> None:
    from dfquant.quantizers import quantizer_class

    bits = 4 if 4 in quantizer_class(name).supported_bits else quantizer_class(name).supported_bits[0]
    gran = "group:16" if name == "nvfp4" else "group:32"  # the block formats fix their block size
    q, _ = quantize_model(_small_cnn(), QuantConfig(LayerRule(name, bits, gran)))
    path = save_quantized(q, tmp_path / "m.safetensors", source={})
    loaded, manifest = load_quantized(path, build=_small_cnn)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert {t["quantizer"] for layer in manifest["layers"].values() for t in layer["terms"]} == {name}


# -- tied embeddings, scale dtypes, format versions ------------------------------------------------------


def test_tied_embedding_and_head_share_one_quantization(tmp_path: Path) -> None:
    model = trained_like(Mixed())
    q, report = quantize_model(model, QuantConfig(LayerRule("minmax", 4, "group:4")))
    assert type(q.emb).__name__ == "QuantEmbedding" and q.tied.terms[0] is q.emb.terms[0]
    tied = {r.name: r.tied_to for r in report.layers}
    assert tied["tied"] == "emb" and tied["emb"] == ""
    assert report.quantized_params == sum(r.params for r in report.layers if r.name != "tied")
    assert "tied to emb" in report.to_text()
    path = save_quantized(q, tmp_path / "m.safetensors", source=SOURCE, report=report)
    man = read_manifest(path)
    assert man["layers"]["emb"]["type"] == "embedding" and man["layers"]["tied"]["type"] == "linear"
    assert man["aliases"] == {
        f"tied.terms.0.{b}": f"emb.terms.0.{b}" for b in ("packed", "scale", "levels")
    }  # the codes are stored once
    loaded, _ = load_quantized(path, build=lambda src: Mixed(src["width"]))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(*x), q(*x))
    assert loaded.tied.terms[0] is loaded.emb.terms[0]
    # the tie is kept through a second save
    path2 = save_quantized(loaded, tmp_path / "again.safetensors", source=SOURCE)
    assert read_manifest(path2)["aliases"] == man["aliases"]


def test_tied_weights_with_different_rules_are_untied_with_a_warning() -> None:
    cfg = QuantConfig(LayerRule("minmax", 4), rules=(PatternRule("tied", bits=8),))
    with pytest.warns(UserWarning, match=r"tied weights no longer shared.*emb / tied"):
        q, report = quantize_model(trained_like(Mixed()), cfg)
    assert q.tied.terms[0] is not q.emb.terms[0] and q.tied.terms[0].bits == 8
    assert all(not r.tied_to for r in report.layers)


@pytest.mark.parametrize("sdtype", ["float16", "bfloat16"])
def test_half_precision_scales_round_trip_bit_exact(tmp_path: Path, sdtype: str) -> None:
    q, report = quantize_model(
        trained_like(Mixed()),
        QuantConfig(LayerRule("minmax", 3, "group:4", {"grid": "uint"}, scale_dtype=sdtype)),
    )
    path = save_quantized(q, tmp_path / "m.safetensors", source=SOURCE, report=report)
    man = read_manifest(path)
    st = {"float16": "F16", "bfloat16": "BF16"}[sdtype]
    assert man["tensors"]["conv.terms.0.scale"]["dtype"] == st and man["tensors"]["conv.terms.0.offset"]["dtype"] == st
    assert {t["scale_dtype"] for lay in man["layers"].values() for t in lay["terms"]} == {sdtype}
    loaded, _ = load_quantized(path, build=lambda src: Mixed(src["width"]))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(*x), q(*x))
    assert loaded.conv.terms[0].scale.dtype == getattr(torch, sdtype)


@pytest.mark.parametrize(("sdtype", "bpw"), [("float32", 4 + 32 / 128), ("float16", 4 + 16 / 128)])
def test_file_size_with_scale_dtypes(tmp_path: Path, sdtype: str, bpw: float) -> None:
    model = nn.Sequential(nn.Linear(512, 1024, bias=False), nn.ReLU(), nn.Linear(1024, 512, bias=False))
    q, report = quantize_model(model, QuantConfig(LayerRule("minmax", 4, "group:128", scale_dtype=sdtype)))
    assert report.bits_per_weight == pytest.approx(bpw)
    path = save_quantized(q, tmp_path / "m.safetensors", source=SOURCE)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    levels = 2 * 16 * 4  # each layer's shared int4 levels (16 float32): stored, not counted in bits/weight
    assert path.stat().st_size == report.bits_per_weight * report.quantized_params / 8 + header + levels


def test_saved_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    q, _ = _quantized()
    mask = os.umask(0o027)
    try:
        path = save_quantized(q, tmp_path / "m.safetensors", source=SOURCE)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o640  # as open() would create it, not mkstemp's 0600


def test_term_keys_follow_the_format_version(saved: Path, tmp_path: Path) -> None:
    def drop(m: dict) -> None:
        del _term(m)["scale_dtype"]

    bad = _rewrite(saved, tmp_path / "v3.safetensors", edit_manifest=drop)
    with pytest.raises(FileFormatError, match=rf"scale_dtype.*format version {FORMAT_VERSION}"):
        _load(bad)
    v1 = _rewrite(saved, tmp_path / "v1.safetensors", edit_manifest=lambda m: m.update(format_version=1))
    with pytest.raises(FileFormatError, match=r"format version 1"):
        _load(v1)
    v1_ok = _rewrite(
        saved,
        tmp_path / "v1ok.safetensors",
        edit_manifest=lambda m: (
            [t.pop("scale_dtype") for lay in m["layers"].values() for t in lay["terms"]] and m.update(format_version=1)
        ),
    )
    model, _ = _load(v1_ok)
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), _load(saved)[0](*_inputs()))
