"""A fused decode-in-matmul kernel (Triton): ``y = x W_hat^T`` read from packed codes, for any codebook.

Batch-1 and small-batch inference is memory bound: the time goes into reading the weight. A quantized layer
pays off only when its matmul reads the packed codes and decodes them in registers,
``W_hat[n, k] = levels[t(n, g)][code[n, k]] * scale[n, g] (+ offset[n, g])`` with ``g = k // G``, instead of
materializing ``W_hat`` in memory first. This is the lookup-table matmul of FLUTE (Guo et al. 2024, "Fast Matrix
Multiplications for Lookup Table-Quantized LLMs"), written here for every term dfquant stores: 2- to 8-bit codes,
one level table per tensor or several picked by a per-group index (``lloyd-max``'s Gaussian and Laplace tables,
``nf4``, uniform and FP4 grids, per-group codebooks), per-channel or per-group scales with or without offsets.

Layout (built once per layer and device by :func:`pack_for_kernel`, from the file's layout): each output row's
codes are packed little-endian into int32 words of ``32 // bits`` codes (no code crosses a word; 3-bit codes
use 30 bits of each word), scales and offsets are float32 ``(N, groups)``, tables float32 ``(T, L)``, table
indices int32 ``(N, groups)``.

The kernel tiles the output ``(M, N)`` in ``BLOCK_M x BLOCK_N`` blocks and walks ``K`` in steps of ``BLOCK_K``:
it loads the words holding the tile's codes, shifts and masks each code out, gathers its level and its group's
scale (and offset), and accumulates ``x_tile @ w_tile^T`` in float32 with ``tl.dot``. The result is cast to
``x``'s dtype.

On a CUDA tensor it runs on the GPU. Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported) runs the same kernel on CPU tensors, which is how the tests check it on machines without a GPU.
Triton is optional (the ``kernels`` extra): without it, :func:`available` is False and layers decode.

On the CPU, uniform 4-bit terms (the ``uint4`` grid with offsets, or ``int4`` without, groups of 32 to 256) can run
in torch's own int4 kernel instead (:func:`pack_int4_cpu`, :func:`int4_cpu_matmul`; ``matmul="int4"`` on a layer):
it reads the packed codes, but takes its input and its scales in bfloat16, so its outputs differ from the decode
path's by bfloat16 rounding (about 3 significant digits), which is why a layer uses it only when asked.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from dfquant.errors import ConfigError
from dfquant.nn.terms import QuantTerm, term_layout
from dfquant.quantizers.packing import unpack

__all__ = [
    "INT4_CPU_GROUPS",
    "Int4CpuWeight",
    "KernelWeight",
    "available",
    "int4_cpu_matmul",
    "int4_cpu_reason",
    "interpreted",
    "lut_matmul",
    "pack_for_kernel",
    "pack_int4_cpu",
    "unsupported_reason",
]


def available() -> bool:
    """Whether Triton is installed (it is imported on the first kernel call, not with dfquant)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``): then on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class KernelWeight:
    """One term in the kernel's layout (see the module docstring).

    Attributes:
        words: int32 ``(N, ceil(K / per_word))`` packed codes. scale, offset: float32 ``(N, groups)``; offset None
            when the term has none. levels: float32 ``(T, L)``. table: int32 ``(N, groups)`` or None (one table).
        bits, group, n, k: code width, group length along ``K``, output and input sizes.
    """

    words: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    levels: torch.Tensor
    table: torch.Tensor | None
    bits: int
    group: int
    n: int
    k: int

    @property
    def per_word(self) -> int:
        return 32 // self.bits


def unsupported_reason(term: QuantTerm) -> str | None:
    """Why ``term`` cannot run in the kernel (None when it can): a 2-D weight with codes of 2 to 8 bits, groups
    along the input dimension (``channel`` or ``group:G`` on axis 0) and every output channel."""
    gran = term.granularity
    if len(term.shape) != 2:
        return f"a {len(term.shape)}-D weight (the kernel multiplies 2-D weights)"
    if term.channels is not None:
        return "a term of a subset of channels"
    if gran.kind == "tensor" or gran.axis != 0:
        return f"granularity {gran} (the kernel takes channel or group:G along the input dimension)"
    if not 2 <= term.bits <= 8:
        return f"{term.bits}-bit codes (the kernel takes 2 to 8)"
    return None


def pack_for_kernel(term: QuantTerm, device: torch.device | str | None = None) -> KernelWeight:
    """``term`` repacked for :func:`lut_matmul` on ``device`` (default: the term's).

    Raises:
        ConfigError: a term the kernel does not take (see :func:`unsupported_reason`).
    """
    why = unsupported_reason(term)
    if why is not None:
        raise ConfigError(f"the matmul kernel does not take {why}")
    dev = torch.device(device) if device is not None else term.scale.device
    rows, cols, _ = term_layout(term.shape, term.granularity)
    codes = unpack(term.packed, term.bits, term.numel).view(rows, cols).to(torch.int64)
    per_word = 32 // term.bits
    nwords = -(-cols // per_word)
    padded = torch.zeros(rows, nwords * per_word, dtype=torch.int64)
    padded[:, :cols] = codes.cpu()
    shifts = torch.arange(per_word, dtype=torch.int64) * term.bits
    words = (padded.view(rows, nwords, per_word) << shifts).sum(dim=2)  # < 2^32: exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed
    tables, levels = term.table_indices(), term.levels
    return KernelWeight(
        words=words.to(dev),
        scale=term.scale.to(device=dev, dtype=torch.float32).contiguous(),
        offset=None if term.offset is None else term.offset.to(device=dev, dtype=torch.float32).contiguous(),
        levels=(levels[None] if levels.dim() == 1 else levels).to(device=dev, dtype=torch.float32).contiguous(),
        table=None if tables is None else tables.to(device=dev, dtype=torch.int32).contiguous(),
        bits=term.bits,
        group=term.granularity.group_size or cols,
        n=rows,
        k=cols,
    )


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, defined on first use (Triton reads ``TRITON_INTERPRET`` then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _lut_matmul_kernel(
        x_ptr,
        words_ptr,
        scale_ptr,
        offset_ptr,
        levels_ptr,
        table_ptr,
        y_ptr,
        M,
        N,
        K,
        n_words,
        n_groups,
        n_levels,
        group,
        stride_xm,
        stride_ym,
        BITS: tl.constexpr,
        PER_WORD: tl.constexpr,
        HAS_OFFSET: tl.constexpr,
        HAS_TABLE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        mask_code = (1 << BITS) - 1
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wk_ok = n_ok[:, None] & k_ok[None, :]
            word = tl.load(words_ptr + rn[:, None] * n_words + (rk // PER_WORD)[None, :], mask=wk_ok, other=0)
            code = (word >> ((rk % PER_WORD) * BITS)[None, :]) & mask_code
            g = rk // group
            gi = rn[:, None] * n_groups + g[None, :]
            if HAS_TABLE:
                t = tl.load(table_ptr + gi, mask=wk_ok, other=0)
                level = tl.load(levels_ptr + t * n_levels + code, mask=wk_ok, other=0.0)
            else:
                level = tl.load(levels_ptr + code, mask=wk_ok, other=0.0)
            w = level * tl.load(scale_ptr + gi, mask=wk_ok, other=0.0)
            if HAS_OFFSET:
                w += tl.load(offset_ptr + gi, mask=wk_ok, other=0.0)
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    return _lut_matmul_kernel


def _blocks(m: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``: 16 rows of ``x`` for small batches (``tl.dot`` takes at least 16), 64
    for larger ones."""
    return (16 if m <= 16 else 64), 64, 64


def lut_matmul(x: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    """``x W_hat^T`` for ``x`` of shape ``(..., K)``, decoded inside the kernel; float32 accumulation, the result
    in ``x``'s dtype, shape ``(..., N)``.

    Raises:
        ConfigError: Triton missing, a CPU tensor outside the interpreter, or a mismatched width.
    """
    if not available():
        raise ConfigError("the matmul kernel needs Triton: pip install 'dfquant[kernels]'")
    if x.device.type != "cuda" and not interpreted():
        raise ConfigError(f"the matmul kernel runs on CUDA tensors (or under TRITON_INTERPRET=1), got {x.device}")
    if x.shape[-1] != kw.k:
        raise ConfigError(f"input of width {x.shape[-1]} for a weight of {kw.k} inputs")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kw.k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, kw.n, device=x.device, dtype=torch.float32)
    bm, bn, bk = _blocks(m)
    grid = (-(-kw.n // bn), -(-m // bm))
    dummy = kw.scale
    _kernel()[grid](
        x2,
        kw.words,
        kw.scale,
        kw.offset if kw.offset is not None else dummy,
        kw.levels,
        kw.table if kw.table is not None else kw.words,
        y,
        m,
        kw.n,
        kw.k,
        kw.words.shape[1],
        kw.scale.shape[1],
        kw.levels.shape[1],
        kw.group,
        x2.stride(0),
        y.stride(0),
        BITS=kw.bits,
        PER_WORD=kw.per_word,
        HAS_OFFSET=kw.offset is not None,
        HAS_TABLE=kw.table is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return y.to(x.dtype).reshape(*lead, kw.n)


def describe(kw: KernelWeight) -> dict[str, Any]:
    """JSON-ready summary of a packed weight (bytes the kernel reads per call)."""
    nbytes = sum(t.numel() * t.element_size() for t in (kw.words, kw.scale, kw.levels) if t is not None)
    nbytes += 0 if kw.offset is None else kw.offset.numel() * 4
    nbytes += 0 if kw.table is None else kw.table.numel() * 4
    return {"bits": kw.bits, "group": kw.group, "n": kw.n, "k": kw.k, "bytes": nbytes}


# -- the CPU path: torch's int4 kernel for uniform 4-bit grids ---------------------------------------------------

#: Group sizes torch's int4 CPU kernel takes.
INT4_CPU_GROUPS = (32, 64, 128, 256)


@dataclass
class Int4CpuWeight:
    """One term in the layout of ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (tinygemm's convention,
    ``w = (q - 8) * scale + zero`` per group), built by :func:`pack_int4_cpu`.

    Attributes:
        packed: the packed 4-bit codes. scale_zero: bfloat16 ``(K / G, N, 2)``. group, n, k: group length, sizes.
    """

    packed: torch.Tensor
    scale_zero: torch.Tensor
    group: int
    n: int
    k: int


def int4_cpu_reason(term: QuantTerm) -> str | None:
    """Why ``term`` cannot run in torch's int4 CPU kernel (None when it can): 4-bit codes on the ``uint4`` grid
    with offsets (``--options grid=uint``) or the ``int4`` grid without, in groups of 32 to 256 along the inputs."""
    why = unsupported_reason(term)
    if why is not None:
        return why
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "this torch has no int4 CPU kernel"
    if term.bits != 4 or term.levels.dim() != 1:
        return f"{term.bits}-bit codes with {'per-group tables' if term.levels.dim() != 1 else 'a table'}"
    levels = [float(v) for v in term.levels.tolist()]
    uint = levels == [float(v) for v in range(16)] and term.offset is not None
    sint = levels == [float(v) for v in range(-8, 8)] and term.offset is None
    if not (uint or sint):
        return "levels other than the uint4 grid with offsets or the int4 grid without (the int4 kernel's)"
    group = term.granularity.group_size or term.shape[1]
    if group not in INT4_CPU_GROUPS or term.shape[1] % group:
        return f"groups of {group} (the int4 kernel takes {', '.join(map(str, INT4_CPU_GROUPS))})"
    return None


def pack_int4_cpu(term: QuantTerm) -> Int4CpuWeight:
    """``term`` in the int4 CPU kernel's layout: codes ``q`` as they are (uint4: ``w = q s + o = (q - 8) s + (o +
    8 s)``; int4: code ``q`` is level ``q - 8``, so ``zero = 0``), scales and zeros in bfloat16 (the kernel's).

    Raises:
        ConfigError: a term the kernel does not take (see :func:`int4_cpu_reason`).
    """
    why = int4_cpu_reason(term)
    if why is not None:
        raise ConfigError(f"the int4 CPU kernel does not take {why}")
    rows, cols, _ = term_layout(term.shape, term.granularity)
    codes = unpack(term.packed, term.bits, term.numel).view(rows, cols).to(torch.int32).cpu()
    group = term.granularity.group_size or cols
    scale = term.scale.to(torch.float32).cpu()
    zero = torch.zeros_like(scale) if term.offset is None else term.offset.to(torch.float32).cpu() + 8 * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return Int4CpuWeight(packed=packed, scale_zero=scale_zero, group=group, n=rows, k=cols)


def int4_cpu_matmul(x: torch.Tensor, w: Int4CpuWeight) -> torch.Tensor:
    """``x W_hat^T`` by torch's int4 CPU kernel: ``x`` rounded to bfloat16 (the kernel's input), the result in
    ``x``'s dtype, shape ``(..., N)``."""
    lead = x.shape[:-1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.reshape(-1, w.k).to(torch.bfloat16), w.packed, w.group, w.scale_zero
    )
    return y.to(x.dtype).reshape(*lead, w.n)
