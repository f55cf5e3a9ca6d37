"""Backward compatibility: every released file-format version has a saved model in ``tests/data`` that must
reload to bit-identical outputs forever, and a newer version than this library reads is refused by name.

The files of versions >= 2 were written by ``tests/data/make_compat_files.py`` (minmax per channel, lloyd-max
with stacked tables, nf4 with bfloat16 scales, statq on FP4 E2M1, an order-2 residual expansion, a quantized
embedding with float16 scales, a folded BatchNorm); version 1's by dfquant 0.1.0 (see ``tests/unit/test_io.py``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dfquant.errors import FileFormatError
from dfquant.io import FORMAT_VERSION, METADATA_KEY, READ_VERSIONS, load_quantized, read_manifest
from dfquant.nn import QuantModule

DATA = Path(__file__).resolve().parents[1] / "data"


def _maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dfquant_make_compat_files", DATA / "make_compat_files.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MAKER = _maker()


def _kept(version: int) -> tuple[Path, Path]:
    if version == 1:
        return DATA / "format_v1.safetensors", DATA / "format_v1_expected.safetensors"
    return DATA / f"format_v{version}_compat.safetensors", DATA / f"format_v{version}_compat_expected.safetensors"


@pytest.mark.parametrize("version", list(READ_VERSIONS))
def test_every_readable_version_has_a_kept_file(version: int) -> None:
    """A new format version must come with its compatibility file (run ``make_compat_files.py``)."""
    model, expected = _kept(version)
    assert model.is_file() and expected.is_file(), f"no compatibility file for format version {version}"
    assert read_manifest(model)["format_version"] == version
    assert model.stat().st_size < 16_000 and expected.stat().st_size < 4_000  # kept tiny


@pytest.mark.parametrize("version", [v for v in READ_VERSIONS if v >= 2])
def test_kept_file_reloads_bit_identical(version: int) -> None:
    path, expected_path = _kept(version)
    model, manifest = load_quantized(path, build=MAKER.build)
    expected = load_file(expected_path)
    with torch.no_grad():
        out = model(expected["ids"], expected["image"])
    assert out.dtype == expected["output"].dtype and torch.equal(out, expected["output"])
    # the features the file was made to cover are all still there
    quantizers = {t["quantizer"] for lay in manifest["layers"].values() for t in lay["terms"]}
    assert {"minmax", "lloyd-max", "nf4", "statq"} <= quantizers
    assert len(model.mix.terms) == 2  # residual expansion of order 2
    assert isinstance(model.emb, QuantModule) and model.emb.layer_type == "embedding"
    assert model.lloyd.terms[0].num_tables >= 2  # stacked level tables
    assert model.fp4.terms[0].grid == "fp4_e2m1"
    assert model.nf4.terms[0].scale.dtype == torch.bfloat16
    assert {(f["layer"], f["bn"]) for f in manifest["folded_bn"]} == {("conv", "bn")}
    # the weights decoded today are those of the day the file was written: re-running the same inputs through a
    # second load gives the same bits (no state kept between loads)
    again, _ = load_quantized(path, build=MAKER.build, cache_weight=False)
    with torch.no_grad():
        assert torch.equal(again(expected["ids"], expected["image"]), expected["output"])


def test_current_version_file_matches_a_fresh_quantization() -> None:
    """The kept file of the current version is what the current code writes for the same model and rules
    (so a change in a quantizer's output shows here, while old files must still load above)."""
    from dfquant.api import quantize_model

    path, expected_path = _kept(FORMAT_VERSION)
    q, _ = quantize_model(MAKER.trained(), MAKER.config())
    expected = load_file(expected_path)
    with torch.no_grad():
        fresh = q(expected["ids"], expected["image"])
    # not demanded bit-identical (quantizers may improve); the kept file must stay close to what they give now
    assert torch.allclose(fresh, expected["output"], atol=0.2), (fresh - expected["output"]).abs().max()
    saved = load_file(path)
    assert saved["mix.terms.1.packed"].numel() == q.mix.terms[1].packed.numel()


@pytest.mark.parametrize("version", [v for v in READ_VERSIONS if v >= 2])
def test_newer_version_than_known_names_both(version: int, tmp_path: Path) -> None:
    path, _ = _kept(version)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    man = json.loads(meta[METADATA_KEY])
    newer = FORMAT_VERSION + 1
    man["format_version"] = newer
    bad = tmp_path / "newer.safetensors"
    save_file(load_file(path), str(bad), metadata={METADATA_KEY: json.dumps(man)})
    for call in (lambda: read_manifest(bad), lambda: load_quantized(bad, build=MAKER.build)):
        with pytest.raises(FileFormatError) as e:
            call()
        msg = str(e.value)
        assert f"version {newer}" in msg and f"version {FORMAT_VERSION}" in msg and "upgrade" in msg
