"""Synthetic sharded checkpoints with LLaMA-like names, shapes and per-layer weight statistics.

:func:`make_checkpoint` writes a Hugging Face style folder (``config.json``, ``model.safetensors.index.json``,
``model-0000i-of-0000n.safetensors``) of a LLaMA-family causal LM with random weights, so tests and benchmarks
of the streaming path run anywhere. Each projection ``W`` (``q/k/v/o_proj``, ``gate/up/down_proj``, the token
embedding and the output head) is drawn per tensor from a seeded generator as

``W[o, i] = s_o * c_i * x[o, i]``, ``x ~ (1 - p) N(0, sigma^2) + p Laplace(0, sigma / sqrt 2)``,

with per-output-channel scales ``s_o = exp(0.25 z)`` (log-normal spread of row norms), ``c_i = 1`` except a
few input channels scaled by 4 to 8 (the outlier features of trained LLMs), a Laplace share ``p`` growing with
depth, and a fraction ``1e-4`` of single-weight outliers at 8 to 20 sigma; ``sigma = 0.02`` (``1 / sqrt(fan_in)``
for the output projections). RMSNorm weights are ``1 + N(0, 0.05^2)``. Values are stored in bfloat16.
The bytes depend only on the arguments.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dfquant.errors import ConfigError
from dfquant.io.atomic import write_atomic
from dfquant.stream.shards import ShardWriter

__all__ = ["SyntheticSpec", "make_checkpoint"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the synthetic model (LLaMA-2-7B widths by default; ``layers`` sets the total size)."""

    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 2
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 32

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes, in the order a LLaMA checkpoint lists them."""
        H, I_, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, H))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (H, H)),
                (p + "self_attn.k_proj.weight", (kv, H)),
                (p + "self_attn.v_proj.weight", (kv, H)),
                (p + "self_attn.o_proj.weight", (H, H)),
                (p + "mlp.gate_proj.weight", (I_, H)),
                (p + "mlp.up_proj.weight", (I_, H)),
                (p + "mlp.down_proj.weight", (H, I_)),
                (p + "input_layernorm.weight", (H,)),
                (p + "post_attention_layernorm.weight", (H,)),
            ]
        out += [("model.norm.weight", (H,)), ("lm_head.weight", (self.vocab, H))]
        return out

    def nbytes(self) -> int:
        """bfloat16 bytes of all tensors."""
        return sum(2 * math.prod(s) for _, s in self.tensors())

    def config(self) -> dict[str, object]:
        """A ``config.json`` for ``transformers``' ``LlamaForCausalLM``."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }


def layers_for_size(target_bytes: int, spec: SyntheticSpec) -> int:
    """The number of layers that brings ``spec``'s bfloat16 size closest to ``target_bytes`` (at least 1)."""
    one = SyntheticSpec(spec.hidden, spec.intermediate, 1, spec.vocab, spec.heads, spec.kv_heads).nbytes()
    two = SyntheticSpec(spec.hidden, spec.intermediate, 2, spec.vocab, spec.heads, spec.kv_heads).nbytes()
    per, base = two - one, 2 * one - two
    return max(1, round((target_bytes - base) / per))


def laplace_from_uniform(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """Laplace samples of standard deviation ``sigma`` from uniforms ``u`` in [0, 1) by the inverse cdf,
    ``x = -sign(u - 1/2) * log(1 - 2|u - 1/2|) * sigma / sqrt(2)``. ``torch.rand`` can return exactly 0, whose
    log would be infinite: ``2|u - 1/2|`` is kept below 1 (the largest magnitude is then ~11.8 sigma)."""
    tail = (2 * (u - 0.5).abs()).clamp(max=1 - 2**-24)
    return -torch.sign(u - 0.5) * torch.log1p(-tail) * (sigma / math.sqrt(2))


def _draw(name: str, shape: tuple[int, ...], depth: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    rows, cols = shape
    sigma = 1.0 / math.sqrt(cols) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
    p_laplace = 0.2 + 0.6 * depth
    out = torch.empty(shape, dtype=torch.bfloat16)
    row_scale = torch.exp(0.25 * torch.randn(rows, 1, generator=g))
    col_scale = torch.ones(1, cols)
    hot = torch.randint(0, cols, (max(1, cols // 512),), generator=g)
    col_scale[0, hot] = 4.0 + 4.0 * torch.rand(hot.numel(), generator=g)
    step = max(1, (1 << 22) // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = torch.randn(r1 - r0, cols, generator=g) * sigma
        u = torch.rand(r1 - r0, cols, generator=g)
        lap = laplace_from_uniform(u, sigma)
        x = torch.where(torch.rand(r1 - r0, cols, generator=g) < p_laplace, lap, x)
        spikes = torch.rand(r1 - r0, cols, generator=g) < 1e-4
        x = torch.where(spikes, sigma * (8 + 12 * torch.rand(r1 - r0, cols, generator=g)) * torch.sign(x), x)
        out[r0:r1] = (x * row_scale[r0:r1] * col_scale).to(torch.bfloat16)
    return out


def make_checkpoint(folder: str | Path, spec: SyntheticSpec, shards: int) -> Path:
    """Write the synthetic checkpoint of ``spec`` in ``shards`` files of about equal size into ``folder``.

    Raises:
        ConfigError: fewer than 1 shard, more shards than tensors, or a folder that is not empty.
    """
    out = Path(folder)
    items = spec.tensors()
    if not 1 <= shards <= len(items):
        raise ConfigError(f"shards must be in 1..{len(items)}, got {shards}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ConfigError(f"'{out}' is not empty")
    total = spec.nbytes()
    weight_map: dict[str, str] = {}
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    shard, done = 0, 0
    writer = ShardWriter(out / names[0], {"format": "pt"})
    n_layers = max(1, spec.layers - 1)
    for name, shape in items:
        if done >= total * (shard + 1) / shards and shard < shards - 1:
            writer.finish()
            shard += 1
            writer = ShardWriter(out / names[shard], {"format": "pt"})
        depth = int(name.split(".")[2]) / n_layers if name.startswith("model.layers.") else 0.5
        writer.add(name, _draw(name, shape, depth))
        weight_map[name] = names[shard]
        done += 2 * math.prod(shape)
    writer.finish()
    if shard != shards - 1:
        raise ConfigError(f"{len(items)} tensors of these sizes do not fill {shards} shards; use fewer")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(out / "model.safetensors.index.json", json.dumps(index, indent=1).encode("utf-8"))
    write_atomic(out / "config.json", json.dumps(spec.config(), indent=1).encode("utf-8"))
    return out
