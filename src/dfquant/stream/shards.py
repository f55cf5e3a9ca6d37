"""Sharded ``.safetensors`` checkpoints: reading the input one tensor at a time, writing output shards.

Input: a folder in the Hugging Face layout, ``*.safetensors.index.json`` (``{"metadata": ..., "weight_map":
{tensor: shard file}}``) plus its shards, or a folder holding ``.safetensors`` files and no index (each file is a
shard). Only the headers are read up front (:func:`read_checkpoint`, checked with the same rules as
:func:`dfquant.io.load.load_quantized`: contiguous tensors covering the data exactly); a tensor's bytes are read when
it is processed, with positioned reads of that tensor's bytes only (:class:`ShardReader`).

Output: :class:`ShardWriter` appends each tensor's bytes to a scratch file as soon as it is made (so only the
tensor in hand is in memory), then :meth:`ShardWriter.finish` writes the safetensors file: an 8-byte header
length, the JSON header padded with spaces to a multiple of 8, and the data ordered as ``safetensors`` orders it
(larger item sizes first, then by name, which keeps every tensor aligned to its item size). The file appears
under its final name only when complete (written to a temporary name, flushed, renamed). The bytes depend only
on the tensors and their names, never on timing or on the process that wrote them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfquant.errors import FileFormatError, InputError
from dfquant.io.atomic import replace_atomic
from dfquant.io.manifest import ST_DTYPES, ST_SIZES, read_header

__all__ = ["Checkpoint", "InputShard", "ShardWriter", "read_checkpoint", "read_tensor"]

INDEX_SUFFIX = ".safetensors.index.json"
_ITEM_SIZES = ST_SIZES
_DTYPES = ST_DTYPES
_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class InputShard:
    """One input file: its name, size and ``{tensor: (dtype, shape)}`` in the order of its data."""

    name: str
    path: Path
    size: int
    tensors: dict[str, tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class Checkpoint:
    """A sharded checkpoint's layout (headers only)."""

    folder: Path
    shards: list[InputShard]
    index: str | None

    def entries(self) -> dict[str, tuple[str, tuple[int, ...], str]]:
        """``{tensor: (dtype, shape, shard name)}`` over all shards."""
        return {k: (dt, shape, s.name) for s in self.shards for k, (dt, shape) in s.tensors.items()}

    def fingerprint(self) -> list[list[Any]]:
        """Name, size and modification time of every shard (a resumed run must see the same input)."""
        return [[s.name, s.size, os.stat(s.path).st_mtime_ns] for s in self.shards]


def is_sharded_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a safetensors index or ``.safetensors`` files."""
    p = Path(path)
    return p.is_dir() and (any(p.glob(f"*{INDEX_SUFFIX}")) or any(p.glob("*.safetensors")))


def _shard(path: Path) -> InputShard:
    header, size = read_header(path)
    entries = [(v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort()
    tensors = {k: (str(v["dtype"]), tuple(int(s) for s in v["shape"])) for _, k, v in entries}
    return InputShard(path.name, path, size, tensors)


def read_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """The layout of a sharded checkpoint, from its index and the shards' headers.

    Raises:
        InputError: not a folder, no shards, several indexes, an index that names missing files, or tensors
            listed twice or not where the index says.
        FileFormatError: a shard that is not a well-formed safetensors file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"'{root}' is not a folder of .safetensors shards")
    indexes = sorted(root.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        listed = ", ".join(i.name for i in indexes)
        raise InputError(f"'{root}' holds {len(indexes)} index files ({listed}); allowed: 1")
    if indexes:
        try:
            data = json.loads(indexes[0].read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read the index '{indexes[0]}': {e}") from None
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise InputError(f"index '{indexes[0].name}' has no 'weight_map' of tensor name -> shard file")
        names = sorted(set(wmap.values()))
        for n in names:
            if Path(n).name != n or not (root / n).is_file():
                raise InputError(f"index '{indexes[0].name}' names shard {n!r}, which is not a file in '{root}'")
        shards = [_shard(root / n) for n in names]
        for s in shards:
            for key in s.tensors:
                if wmap.get(key) != s.name:
                    raise InputError(f"tensor '{key}' is in shard '{s.name}' but the index says {wmap.get(key)!r}")
        held = {k for s in shards for k in s.tensors}
        missing = sorted(set(wmap) - held)
        if missing:
            raise InputError(f"index '{indexes[0].name}' lists tensors no shard holds: {missing[:5]}")
        index: str | None = indexes[0].name
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise InputError(f"'{root}' holds no .safetensors file and no '*{INDEX_SUFFIX}'")
        shards = [_shard(f) for f in files]
        seen: dict[str, str] = {}
        for s in shards:
            for key in s.tensors:
                if key in seen:
                    raise InputError(f"tensor '{key}' is in both '{seen[key]}' and '{s.name}'")
                seen[key] = s.name
        index = None
    return Checkpoint(root, shards, index)


class ShardReader:
    """Reads single tensors of one safetensors shard with positioned reads (``os.pread``).

    A memory map would do the same with less code, but every page of the shard that has been read stays in the
    process's resident set (file-backed pages count towards RSS until the kernel needs them), so a worker that
    walks a 2 GB shard ends at 2 GB resident whatever it keeps. Positioned reads put only the current tensor's
    bytes in the process; the page cache holds the rest outside it. The header is validated by
    :func:`dfquant.io.manifest.read_header` (offsets inside the file, sizes matching dtypes and shapes).

    Use as a context manager; :meth:`get_tensor` returns a tensor that owns its memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        header, _ = read_header(self.path)
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self._fd = os.open(self.path, os.O_RDONLY)
        self._base = 8 + int.from_bytes(os.pread(self._fd, 8, 0), "little")

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def get_tensor(self, key: str) -> torch.Tensor:
        """Tensor ``key`` (a fresh CPU tensor of the stored dtype and shape).

        Raises:
            InputError: no such tensor, or a dtype dfquant does not read.
            FileFormatError: the file changed or a read came back short.
        """
        entry = self._entries.get(key)
        if entry is None:
            raise InputError(f"tensor '{key}' is not in '{self.path.name}'")
        dt = str(entry["dtype"])
        dtype = next((d for d, name in _DTYPES.items() if name == dt), None)
        if dtype is None:
            raise InputError(f"tensor '{key}' in '{self.path.name}' has dtype {dt}, which dfquant does not read")
        start, end = (int(x) for x in entry["data_offsets"])
        shape = [int(x) for x in entry["shape"]]
        buf = bytearray(end - start)
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [view[done:]], self._base + start + done)
            if got <= 0:
                raise FileFormatError(f"'{self.path}': short read of tensor '{key}' (the file changed?)")
            done += got
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def read_tensor(handle: ShardReader, key: str) -> torch.Tensor:
    """One tensor from an open :class:`ShardReader` (only this tensor's bytes are read into memory)."""
    return handle.get_tensor(key)


def open_shard(path: Path) -> ShardReader:
    """A :class:`ShardReader` on a shard, for :func:`read_tensor`."""
    return ShardReader(path)


class ShardWriter:
    """Writes one safetensors file tensor by tensor with only the current tensor in memory.

    Args:
        dest: the final file name.
        metadata: string metadata for the header (``__metadata__``).
    """

    def __init__(self, dest: Path, metadata: dict[str, str] | None = None) -> None:
        self.dest = dest
        self.metadata = dict(metadata or {})
        self._scratch = dest.with_name(f".{dest.name}.data.tmp")
        self._f = open(self._scratch, "wb")  # noqa: SIM115 - closed in finish/abort
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}
        self._pos = 0

    def add(self, key: str, t: torch.Tensor) -> tuple[str, list[int]]:
        """Append tensor ``key``; returns its ``(safetensors dtype, shape)``.

        Raises:
            InputError: a key written twice, or a dtype the format does not hold.
        """
        if key in self._entries:
            raise InputError(f"tensor '{key}' written twice to '{self.dest.name}'")
        dt = _DTYPES.get(t.dtype)
        if dt is None:
            raise InputError(f"tensor '{key}' has dtype {t.dtype}, which safetensors does not hold")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else b""
        n = len(raw) if isinstance(raw, bytes) else int(raw.nbytes)
        if n:
            self._f.write(memoryview(raw))  # type: ignore[arg-type]
        shape = [int(s) for s in t.shape]
        if n != math.prod(shape) * _ITEM_SIZES[dt]:
            raise InputError(f"tensor '{key}': {n} bytes do not match {dt} {shape}")
        self._entries[key] = (dt, shape, self._pos, n)
        self._pos += n
        return dt, shape

    def finish(self) -> int:
        """Write the file (header, then data in safetensors order) atomically; returns its size."""
        self._f.close()
        order = sorted(self._entries, key=lambda k: (-_ITEM_SIZES[self._entries[k][0]], k))
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        pos = 0
        for k in order:
            dt, shape, _, n = self._entries[k]
            header[k] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as out, open(self._scratch, "rb") as src:
                out.write(len(text).to_bytes(8, "little"))
                out.write(text)
                for k in order:
                    _, _, start, n = self._entries[k]
                    src.seek(start)
                    while n:
                        chunk = src.read(min(n, _COPY_CHUNK))
                        if not chunk:
                            raise FileFormatError(f"scratch data of '{self.dest.name}' ended early")
                        out.write(chunk)
                        n -= len(chunk)

        try:
            replace_atomic(self.dest, write)
        finally:
            if self._scratch.exists():
                self._scratch.unlink()
        return 8 + len(text) + pos

    def abort(self) -> None:
        """Drop the scratch data (the final file is never created)."""
        self._f.close()
        if self._scratch.exists():
            self._scratch.unlink()

    def table(self) -> dict[str, dict[str, Any]]:
        """``{tensor: {"dtype", "shape"}}`` of what was written."""
        return {k: {"dtype": v[0], "shape": v[1]} for k, v in sorted(self._entries.items())}
