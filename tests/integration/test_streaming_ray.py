"""Shards as Ray tasks on a local cluster of several worker processes: the bytes of the single-process run."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from conftest import require_module
from dfquant.config import LayerRule, QuantConfig
from dfquant.stream import quantize_sharded
from dfquant.stream.synthetic import SyntheticSpec, make_checkpoint

pytestmark = pytest.mark.slow
ray = require_module("ray")  # the optional extra 'distributed'


def test_local_ray_cluster_matches_single_process(tmp_path: Path) -> None:
    spec = SyntheticSpec(hidden=64, intermediate=160, layers=3, vocab=256, heads=4, kv_heads=2)
    ckpt = make_checkpoint(tmp_path / "in", spec, 4)
    cfg = QuantConfig(LayerRule("minmax", 4, "group:32"))
    one = quantize_sharded(ckpt, tmp_path / "one", cfg)
    dist = quantize_sharded(ckpt, tmp_path / "ray", cfg, workers=3, ray_address="local")
    assert dist.mode == "ray" and not ray.is_initialized()
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 5
    assert all(filecmp.cmp(tmp_path / "one" / n, tmp_path / "ray" / n, shallow=False) for n in names)
    assert dist.peak_rss_worker > 0 and dist.params == one.params
