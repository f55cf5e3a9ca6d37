"""Write a synthetic sharded bfloat16 checkpoint with LLaMA-like names, shapes and weight statistics.

    python benchmarks/make_synthetic_checkpoint.py /tmp/synth-8gb --size-gb 8 --shards 4

The number of layers is chosen to reach ``--size-gb`` (10^9 bytes) at the given widths; see
:mod:`dfquant.stream.synthetic` for the statistics. Write it outside the project and delete it afterwards.
"""

from __future__ import annotations

import argparse
import time

import torch

from dfquant.stream.synthetic import SyntheticSpec, layers_for_size, make_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = SyntheticSpec(args.hidden, args.intermediate, 1, args.vocab, args.heads, args.kv_heads)
    layers = layers_for_size(int(args.size_gb * 1e9), base)
    spec = SyntheticSpec(args.hidden, args.intermediate, layers, args.vocab, args.heads, args.kv_heads)
    t = time.perf_counter()
    make_checkpoint(args.folder, spec, args.shards)
    print(
        f"wrote {args.folder}: {layers} layers, {spec.nbytes() / 1e9:.2f} GB bf16 in {args.shards} shards "
        f"({time.perf_counter() - t:.0f} s)"
    )


if __name__ == "__main__":
    main()
