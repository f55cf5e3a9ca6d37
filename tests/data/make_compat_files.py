"""Write the backward-compatibility files of the current file format version into this folder.

Run once per released file-format version (``python tests/data/make_compat_files.py``); the files are then
kept forever and never regenerated: ``tests/unit/io/test_compat_files.py`` demands that every kept file still loads
and computes bit-identical outputs. The script refuses to overwrite a file that exists.

For each version ``V`` it writes:

* ``format_vV_compat.safetensors``: :class:`CompatNet` quantized with one rule per layer, covering
  ``minmax`` (integer grid, per channel), ``lloyd-max`` with stacked per-group tables (Gaussian and Laplace
  groups mixed), ``nf4`` in groups, ``statq`` on the FP4 E2M1 grid, a residual expansion of order 2 (REx),
  and a quantized token embedding, with a folded BatchNorm; from version 3, rotated layers (a convolution
  whose fan-in 27 takes blocks 16, 8, 2 and 1, and a ``lloyd-max`` head in blocks of 8); from version 4, balanced
  layers (the ``minmax`` REx layer, and the ``nf4`` layer also rotated);
* ``format_vV_compat_expected.safetensors``: fixed inputs (``ids``, ``image``) and the quantized model's
  ``output`` on them.

Files of format version 1 (``format_v1.safetensors``, ``format_v1_expected.safetensors``) were written by
dfquant 0.1.0 with its own model (:class:`V1Net`, built by :func:`build_v1`); they are kept as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class CompatNet(nn.Module):
    """A tiny model with every layer kind a compatibility file should exercise."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 16)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Linear(16 + 8, 16)
        self.lloyd = nn.Linear(16, 16)
        self.nf4 = nn.Linear(16, 16)
        self.fp4 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        tokens = self.emb(ids).mean(1)
        pix = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        h = torch.tanh(self.mix(torch.cat([tokens, pix], 1)))
        h = torch.tanh(self.lloyd(h))
        h = torch.tanh(self.nf4(h))
        h = torch.tanh(self.fp4(h))
        return self.head(h)


class V1Net(nn.Module):
    """The model of ``format_v1.safetensors`` (written by dfquant 0.1.0, file format version 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)
        h = torch.relu(self.bn(self.conv(h))).transpose(1, 2)
        return self.fc(h)


def build_v1(_source: object = None) -> V1Net:
    """The float skeleton of the format-1 file."""
    return V1Net().eval()


def build(_source: object = None) -> CompatNet:
    """The float skeleton (any weights: loading replaces them)."""
    return CompatNet().eval()


def trained() -> CompatNet:
    """Deterministic float weights with some heavy-tailed rows, so that ``lloyd-max`` mixes its tables.

    The global random state is forked and seeded with 0 inside, so the weights do not depend on what the caller
    drew before, and every draw is made in float64 (rounded to float32), so they do not depend on the CPU either.
    Files of format versions 2 and 3 were written from float32 draws (the same seeds); only the current version's
    file is compared with a fresh quantization.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _trained()


def _trained() -> CompatNet:
    # Drawn in float64 and rounded to float32: torch's float32 normal sampler takes a vectorized path whose last
    # bits depend on the CPU's vector kernels (ATEN_CPU_CAPABILITY), and weights must be the same everywhere.
    g = torch.Generator().manual_seed(2024)
    model = CompatNet()
    f64 = torch.float64
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=f64) * 0.3).to(torch.float32))
            if name == "lloyd.weight":  # half the rows Laplace-like: the fit picks both tables
                lap = torch.distributions.Laplace(torch.tensor(0.0, dtype=f64), torch.tensor(0.2, dtype=f64))
                p[8:] = lap.sample((8, 16)).to(torch.float32)
        model.bn.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
        model.bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return model.eval()


def config() -> object:
    """The rules: one feature of the format per layer."""
    from dfquant.config import LayerRule, PatternRule, QuantConfig

    return QuantConfig(
        LayerRule("minmax", 4, "channel"),
        rules=(
            PatternRule("emb", quantizer="minmax", bits=4, granularity="group:8", scale_dtype="float16"),
            PatternRule("mix", quantizer="minmax", bits=3, expand=2),
            PatternRule("lloyd", quantizer="lloyd-max", bits=3, granularity="group:8"),
            PatternRule("nf4", quantizer="nf4", bits=4, granularity="group:8", scale_dtype="bfloat16"),
            PatternRule("fp4", quantizer="statq", bits=4, options={"format": "fp4_e2m1"}),
            # format 3: rotated layers (fan-in 27 = 16 + 8 + 2 + 1 blocks; 16 = 8 + 8)
            PatternRule("conv", rotate="hadamard:16"),
            PatternRule("head", quantizer="lloyd-max", bits=3, rotate="hadamard:8"),
            # format 4: balanced layers (a column scale; one with a residual expansion, one also rotated)
            PatternRule("mix", balance=True),
            PatternRule("nf4", balance=True, rotate="hadamard:8"),
        ),
    )


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"ids": torch.randint(0, 12, (3, 5), generator=g), "image": torch.randn(3, 3, 6, 6, generator=g)}


def main() -> int:
    from safetensors.torch import save_file

    from dfquant.io.manifest import FORMAT_VERSION
    from dfquant.io.save import save_quantized
    from dfquant.pipeline.quantize import quantize_model

    model_path = HERE / f"format_v{FORMAT_VERSION}_compat.safetensors"
    expected_path = HERE / f"format_v{FORMAT_VERSION}_compat_expected.safetensors"
    for p in (model_path, expected_path):
        if p.exists():
            sys.stderr.write(f"{p.name} exists: compatibility files are never regenerated\n")
            return 1
    q, report = quantize_model(trained(), config())  # type: ignore[arg-type]
    save_quantized(q, model_path, source={"zoo": "compat-test"}, report=report)
    x = inputs()
    with torch.no_grad():
        out = q(x["ids"], x["image"])
    save_file({**x, "output": out.contiguous()}, str(expected_path))
    print(f"wrote {model_path.name} ({model_path.stat().st_size} bytes) and {expected_path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
