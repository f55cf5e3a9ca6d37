"""Fuzzing the loader: every file is hostile.

Hypothesis mutates valid dfquant files (the kept compatibility file of the current format version and a small
model with channel-subset expansion terms): the 8-byte header length, the safetensors header (tensor dtypes,
shapes, byte offsets, entries added or dropped), every field of the JSON manifest (format version, layer types,
dtypes, shapes, bit-widths, level and table counts, granularities, quantizer names, layer names, aliases, module
arguments, the tensor table), truncations, flipped bytes and random bytes. Each case asserts that
:func:`dfquant.io.load.load_quantized` either loads a model or raises :class:`~dfquant.errors.FileFormatError`, and

* no other exception escapes (a bug in the checks shows as KeyError, TypeError, RecursionError, ...);
* no case hangs: each runs under a wall-clock alarm of :data:`CASE_SECONDS`;
* no case blows up memory: the process's peak resident size may not grow by more than :data:`RSS_MARGIN_MB`
  over the whole run (a declared shape of 2^40 elements must be refused before anything is allocated);
* no code runs: names in the mutated manifest point at a module on ``sys.path`` whose import would write a
  marker file; the marker never appears and the module is never imported.

The number of examples per test is modest so that the suite stays fast; ``DFQUANT_FUZZ_EXAMPLES`` raises it
(``benchmarks/fuzz_loader.py`` runs a long campaign and reports the number of cases). When
``DFQUANT_FUZZ_REPORT`` names a file, the counts of cases and outcomes are written there as JSON.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dfquant.errors import FileFormatError
from dfquant.io.load import load_quantized

DATA = Path(__file__).resolve().parents[1] / "data"
EXAMPLES = int(os.environ.get("DFQUANT_FUZZ_EXAMPLES", "40"))
CASE_SECONDS = 10.0
RSS_MARGIN_MB = 256
EVIL = "dfquant_fuzz_evil"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

STATS: Counter[str] = Counter()


def _maker() -> Any:
    spec = importlib.util.spec_from_file_location("dfquant_make_compat_files", DATA / "make_compat_files.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MAKER = _maker()


def _sparse_net(_source: object = None) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()


# ------------------------------------------------------------------------------------------------------------
# Seeds and the raw file layout


class Seed:
    """A valid file split into its parts: the parsed header (manifest decoded) and the tensor data."""

    def __init__(self, data: bytes, build: Callable[[Any], nn.Module]) -> None:
        n = int.from_bytes(data[:8], "little")
        self.data = data
        self.header: dict[str, Any] = json.loads(data[8 : 8 + n])
        self.manifest: dict[str, Any] = json.loads(self.header["__metadata__"]["dfquant"])
        self.body = data[8 + n :]
        self.build = build

    def encode(self, header: dict[str, Any], manifest: Any = None, raw_manifest: str | None = None) -> bytes:
        header = dict(header)
        meta = dict(header.get("__metadata__") or {})
        if raw_manifest is not None:
            meta["dfquant"] = raw_manifest
        elif manifest is not None:
            meta["dfquant"] = json.dumps(manifest)
        header["__metadata__"] = meta
        return _pack(json.dumps(header).encode(), self.body)


def _pack(head: bytes, body: bytes) -> bytes:
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + body


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    from dfquant.config import LayerRule, QuantConfig
    from dfquant.io.save import save_quantized
    from dfquant.pipeline.quantize import quantize_model

    folder = tmp_path_factory.mktemp("fuzz-seeds")
    q, report = quantize_model(_sparse_net(), QuantConfig(LayerRule("minmax", 2, expand=3, sparsity=0.5)))
    sparse = save_quantized(q, folder / "sparse.safetensors", source={"zoo": "fuzz"}, report=report)
    out = [
        Seed((DATA / "format_v2_compat.safetensors").read_bytes(), MAKER.build),
        Seed(sparse.read_bytes(), _sparse_net),
    ]
    assert any(t["channels"] for lay in out[1].manifest["layers"].values() for t in lay["terms"])
    return out


# ------------------------------------------------------------------------------------------------------------
# Running one case under the guards


class HangError(Exception):
    """A case ran past :data:`CASE_SECONDS`."""


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory, seeds: list[Seed]) -> Iterator[Callable[[bytes, Seed, str], str]]:
    folder = tmp_path_factory.mktemp("fuzz")
    marker = folder / "code-ran"
    (folder / f"{EVIL}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "def run(*a, **k):\n    Path(" + repr(str(marker)) + ").write_text('called')\n"
        "class Evil:\n    def __init__(self, *a, **k):\n        run()\n"
    )
    sys.path.insert(0, str(folder))
    for s in seeds:  # warm up every code path a good load takes before measuring memory
        p = folder / "warm.safetensors"
        p.write_bytes(s.data)
        load_quantized(p, build=s.build)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    path = folder / "case.safetensors"

    def on_alarm(signum: int, frame: object) -> None:
        raise HangError(f"a case ran longer than {CASE_SECONDS} s")

    def run(data: bytes, seed: Seed, kind: str) -> str:
        path.write_bytes(data)
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        t0 = time.perf_counter()
        try:
            load_quantized(path, build=seed.build)
            outcome = "loaded"
        except FileFormatError:
            outcome = "refused"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        STATS["cases"] += 1
        STATS[f"{kind}:{outcome}"] += 1
        STATS["max_ms"] = max(STATS["max_ms"], round(1000 * (time.perf_counter() - t0)))
        assert not marker.exists(), f"a file made dfquant run code ({marker.read_text()})"
        assert EVIL not in sys.modules, "a file made dfquant import a module it names"
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        assert grown < RSS_MARGIN_MB, f"peak memory grew by {grown:.0f} MiB while loading a {len(data)}-byte file"
        return outcome

    yield run
    sys.path.remove(str(folder))
    report = os.environ.get("DFQUANT_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(sorted(STATS.items())), indent=1))


# ------------------------------------------------------------------------------------------------------------
# Strategies

HOSTILE_STRINGS = [
    "",
    "evil.module:Class",
    f"{EVIL}:run",
    f"{EVIL}.Evil",
    f"__import__('{EVIL}')",
    "os:system",
    "builtins.eval",
    "../../etc/passwd",
    "a..b",
    ".",
    "__class__",
    "terms.0",
    "\x00",
    "é" * 3,
    "x" * 5000,
]
SPECIAL_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 9, 16, 255, 256, 2**31 - 1, 2**31, 2**32, 2**40, 2**63 - 1, 2**64, 10**30]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(SPECIAL_INTS),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=12),
    st.sampled_from(["float32", "float16", "bfloat16", "int8", "F32", "U8", "I64", "BOOL", "F64"]),
    st.sampled_from(["tensor", "channel", "channel:1", "channel:-7", "group:0", "group:3", "group:2:1", "group:-4"]),
    st.sampled_from(["minmax", "lloyd-max", "nf4", "statq", "linear", "conv2d", "embedding", "hf-conv1d"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(HOSTILE_STRINGS[:12]), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=8,
)
shapes = st.one_of(
    st.lists(st.sampled_from([*SPECIAL_INTS, 5, 6, 12, 16, 24]), min_size=0, max_size=5),
    st.lists(st.integers(-3, 40), min_size=0, max_size=4),
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> None:
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


seed_index = st.integers(0, 1)


# ------------------------------------------------------------------------------------------------------------
# The properties


@FUZZ
@given(seed_index, st.data())
def test_manifest_field_mutations(seeds: list[Seed], guard: Any, i: int, data: st.DataObject) -> None:
    """Any field of the manifest replaced by any JSON value, or deleted."""
    seed = seeds[i]
    man = copy.deepcopy(seed.manifest)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = _paths(man)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        if data.draw(st.booleans(), label="delete"):
            _set(man, path, None, delete=True)
        else:
            _set(man, path, data.draw(json_values, label="value"))
    guard(seed.encode(seed.header, man), seed, "manifest-field")


TERM_FIELDS = ["bits", "shape", "num_levels", "num_tables", "channels", "granularity", "quantizer", "scale_dtype"]
LAYER_FIELDS = ["type", "dtype", "weight_shape", "bias", "module"]


@FUZZ
@given(seed_index, st.data())
def test_targeted_manifest_mutations(seeds: list[Seed], guard: Any, i: int, data: st.DataObject) -> None:
    """The fields that size buffers or name code: bit-widths, shapes, level/table counts, dtypes, versions,
    layer and quantizer names, module arguments, aliases, the tensor table."""
    seed = seeds[i]
    man = copy.deepcopy(seed.manifest)
    layers = list(man["layers"])
    what = data.draw(
        st.sampled_from(["version", "term", "layer", "module", "rename", "tensor-table", "alias", "source"]),
        label="what",
    )
    name = data.draw(st.sampled_from(layers), label="layer")
    layer = man["layers"][name]
    if what == "version":
        man["format_version"] = data.draw(st.one_of(st.sampled_from([0, 1, 2, 3, 99, -1, 2**64]), json_values))
    elif what == "term":
        term = data.draw(st.sampled_from(layer["terms"]), label="term")
        key = data.draw(st.sampled_from(TERM_FIELDS), label="field")
        term[key] = data.draw(shapes if key == "shape" else st.one_of(st.sampled_from(SPECIAL_INTS), json_values))
    elif what == "layer":
        key = data.draw(st.sampled_from(LAYER_FIELDS), label="field")
        layer[key] = data.draw(shapes if key == "weight_shape" else json_values)
    elif what == "module":
        args = layer["module"]
        key = data.draw(st.sampled_from(sorted(args)), label="arg")
        args[key] = data.draw(st.one_of(st.sampled_from(SPECIAL_INTS), shapes, json_values), label="value")
        if data.draw(st.booleans(), label="grow weight_shape too"):  # a consistent huge declaration
            layer["weight_shape"] = [a if isinstance(a, int) else 2**40 for a in layer["weight_shape"]]
            layer["weight_shape"][0] = args[key] if isinstance(args[key], int) else 2**40
    elif what == "rename":
        new = data.draw(st.sampled_from(HOSTILE_STRINGS), label="new name")
        man["layers"][new] = man["layers"].pop(name)
    elif what == "tensor-table":
        key = data.draw(st.sampled_from(sorted(man["tensors"])), label="tensor")
        man["tensors"][key] = data.draw(
            st.one_of(st.fixed_dictionaries({"dtype": scalars, "shape": shapes}), json_values), label="entry"
        )
    elif what == "alias":
        man["aliases"][data.draw(st.sampled_from(HOSTILE_STRINGS), label="alias")] = data.draw(
            st.one_of(st.sampled_from(sorted(man["tensors"])), json_values), label="target"
        )
    else:
        man["source"] = data.draw(
            st.one_of(st.fixed_dictionaries({"builder": st.sampled_from(HOSTILE_STRINGS)}), json_values)
        )
    guard(seed.encode(seed.header, man), seed, f"targeted-{what}")


@FUZZ
@given(seed_index, st.data())
def test_safetensors_header_mutations(seeds: list[Seed], guard: Any, i: int, data: st.DataObject) -> None:
    """Tensor entries of the safetensors header: dtype, shape and byte offsets changed, entries dropped or
    added, the metadata replaced."""
    seed = seeds[i]
    header = copy.deepcopy(seed.header)
    keys = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(keys), label="tensor")
    what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add", "entry", "metadata"]), label="what")
    if what == "dtype":
        header[key]["dtype"] = data.draw(scalars, label="dtype")
    elif what == "shape":
        header[key]["shape"] = data.draw(shapes, label="shape")
    elif what == "offsets":
        start, end = header[key]["data_offsets"]
        delta = st.sampled_from([-(2**40), -8, -1, 1, 8, 2**40, 2**64])
        header[key]["data_offsets"] = data.draw(
            st.one_of(
                st.tuples(st.just(start), st.builds(lambda d: end + d, delta)).map(list),
                st.tuples(st.builds(lambda d: start + d, delta), st.just(end)).map(list),
                json_values,
            ),
            label="offsets",
        )
    elif what == "drop":
        del header[key]
    elif what == "add":
        header[data.draw(st.sampled_from(HOSTILE_STRINGS), label="new key")] = data.draw(
            st.one_of(
                st.fixed_dictionaries({"dtype": scalars, "shape": shapes, "data_offsets": st.lists(scalars)}),
                json_values,
            ),
            label="entry",
        )
    elif what == "entry":
        header[key] = data.draw(json_values, label="entry")
    else:
        header["__metadata__"] = data.draw(json_values, label="metadata")
        guard(_pack(json.dumps(header).encode(), seed.body), seed, "header-metadata")
        return
    guard(seed.encode(header, seed.manifest), seed, f"header-{what}")


@FUZZ
@given(seed_index, st.data())
def test_raw_byte_mutations(seeds: list[Seed], guard: Any, i: int, data: st.DataObject) -> None:
    """Bytes of the file: the header length, truncations, flipped bytes anywhere, random files, hostile JSON
    text (deep nesting, huge numbers) in the header or the manifest."""
    seed = seeds[i]
    raw = seed.data
    what = data.draw(
        st.sampled_from(["length", "truncate", "flip", "random", "json-text", "manifest-text"]), label="what"
    )
    if what == "length":
        n = data.draw(
            st.one_of(
                st.integers(0, 2**64 - 1), st.integers(-16, 16).map(lambda d: int.from_bytes(raw[:8], "little") + d)
            )
        )
        out = (n % 2**64).to_bytes(8, "little") + raw[8:]
    elif what == "truncate":
        out = raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]
    elif what == "flip":
        buf = bytearray(raw)
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8), label="positions"):
            buf[pos] = data.draw(st.integers(0, 255), label="byte")
        out = bytes(buf)
    elif what == "random":
        out = data.draw(st.binary(max_size=600), label="bytes")
        if data.draw(st.booleans(), label="plausible length"):
            out = len(out).to_bytes(8, "little") + out
    else:
        depth = data.draw(st.integers(1, 200_000), label="depth")
        hostile = data.draw(
            st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth, "1" * 5000, "9e99999"]),
            label="text",
        )
        if what == "json-text":
            out = _pack(hostile.encode(), seed.body)
        else:
            out = seed.encode(seed.header, raw_manifest=hostile)
    guard(out, seed, f"raw-{what}")


# ------------------------------------------------------------------------------------------------------------
# Regressions: cases the fuzzer found, kept as plain tests


def _edit_first(seed: Seed, edit: Callable[[dict[str, Any]], None]) -> bytes:
    man = copy.deepcopy(seed.manifest)
    edit(man)
    return seed.encode(seed.header, man)


def _huge_out(seed: Seed, bias: Any) -> bytes:
    """A layer declared with 2^40 output channels whose terms all cover a few channels (their data is small): the
    dense first term is dropped and the others renumbered, in the manifest and in the header alike."""
    man = copy.deepcopy(seed.manifest)
    header = copy.deepcopy(seed.header)
    name = next(n for n, lay in man["layers"].items() if any(t["channels"] for t in lay["terms"]))
    lay = man["layers"][name]
    lay["terms"] = lay["terms"][1:]
    lay["module"]["out_features"] = 2**40
    lay["weight_shape"][0] = 2**40
    lay["bias"] = bias
    dense = f"{name}.terms.0."
    for table in (header, man["tensors"]):
        for key in [k for k in table if k.startswith(f"{name}.terms.")]:
            value = table.pop(key)
            if not key.startswith(dense):
                _, _, i, buf = key.rsplit(".", 3)
                table[f"{name}.terms.{int(i) - 1}.{buf}"] = value
    kept = {k: v for k, v in header.items() if k != "__metadata__"}
    body, pos = b"", 0  # rebuild the data section for the kept tensors, in their order
    for v in sorted(kept.values(), key=lambda e: e["data_offsets"][0]):
        start, end = v["data_offsets"]
        v["data_offsets"] = [pos, pos + end - start]
        body += seed.body[start:end]
        pos += end - start
    man_text = json.dumps(man)
    return _pack(json.dumps({**kept, "__metadata__": {"dfquant": man_text}}).encode(), body)


REGRESSIONS: dict[str, Callable[[Seed], bytes]] = {
    "unhashable layer type": lambda s: _edit_first(s, lambda m: next(iter(m["layers"].values())).update(type=[1])),
    "deeply nested header": lambda s: _pack(b"[" * 100_000 + b"]" * 100_000, s.body),
    "deeply nested manifest": lambda s: s.encode(s.header, raw_manifest="[" * 100_000 + "]" * 100_000),
    "5000-digit number in the header": lambda s: _pack(b"1" * 5000, s.body),
    "5000-digit number in the manifest": lambda s: s.encode(s.header, raw_manifest="1" * 5000),
    "granularity not a string": lambda s: _edit_first(
        s, lambda m: next(iter(m["layers"].values()))["terms"][0].update(granularity=7)
    ),
    "huge layer, bias flag 1": lambda s: _huge_out(s, 1),
    "huge layer, bias true": lambda s: _huge_out(s, True),
    "huge layer, no bias": lambda s: _huge_out(s, False),
    "weight_shape a dict": lambda s: _edit_first(
        s, lambda m: next(lay for lay in m["layers"].values() if lay["bias"]).update(weight_shape={"": None})
    ),
    "weight_shape a bool": lambda s: _edit_first(
        s, lambda m: next(lay for lay in m["layers"].values() if lay["bias"]).update(weight_shape=True)
    ),
    "layer named __class__": lambda s: _edit_first(
        s, lambda m: m["layers"].update({"__class__": m["layers"].pop(next(iter(m["layers"])))})
    ),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regressions(seeds: list[Seed], guard: Any, case: str) -> None:
    assert guard(REGRESSIONS[case](seeds[1]), seeds[1], "regression") == "refused"


def test_guards_catch_what_they_should(seeds: list[Seed], guard: Any) -> None:
    """The guards themselves work: the good file loads and counts as loaded."""
    assert guard(seeds[0].data, seeds[0], "fuzz-selfcheck") == "loaded"
    assert guard(seeds[0].data[:-1], seeds[0], "fuzz-selfcheck") == "refused"
