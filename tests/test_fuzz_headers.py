"""Fuzzing `read_header` and `open_source` with targeted damage to a valid safetensors file.

Each example takes a file written by safetensors' own `save_file` and damages it the way
files really break, or the way an attacker would: bytes flipped in the header, cut short,
a wrong header length, and the JSON edited field by field (names removed, renamed,
duplicated; dtypes swapped for random strings; shapes and offsets replaced by negative,
huge or non-integer numbers, or by nested junk). test_fuzz_readers.py throws random JSON
values at the same readers; these mutations aim at one field at a time, so most examples
get past the JSON parser and exercise the checks behind it.

Two properties: only `SourceError` (the tool's own error) ever escapes, and whatever
`read_header` accepts, safetensors' `safe_open` accepts too and reads as the same tensors
with the same bytes (we never accept what the reference refuses).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from reshard.errors import SourceError
from reshard.safetensors_header import MAX_HEADER_BYTES, read_header
from reshard.sources import open_source

FUZZ = settings(
    deadline=5000,  # ms; an example takes a few, a hang or a quadratic blow-up fails
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same inputs on every run: a failure is reproducible
    database=None,
)

Pairs = list[tuple[str, object]]  # a JSON object as written, so duplicate keys can be made

# --- what the damage is made of -----------------------------------------------------------------

names = st.one_of(
    st.sampled_from(["w", "b", "__metadata__", "", "dtype", "a\nb", "\ud800", "\udc00x"]),
    st.text(max_size=10),
)
dtype_strings = st.one_of(
    st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2"]),
    st.sampled_from(["U16", "U32", "U64", "F4", "F8_E8M0", "C64", "bf16", "f32", " F32", ""]),
    st.text(max_size=8),
)
ints = st.one_of(
    st.integers(-3, 300),
    st.sampled_from([-1, 2**31, 2**32, 2**62, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63)]),
    st.integers(-(2**80), 2**80),
)
json_leaf = st.one_of(
    st.none(), st.booleans(), ints, st.floats(), st.text(max_size=6), dtype_strings
)
junk = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=8,
)
int_lists = st.lists(ints, max_size=4)
# Number spellings Python's json and serde_json read differently, or that are not integers.
NUMBER_TOKENS = "-0 0 -1 1.0 1e2 0.5 18446744073709551615 18446744073709551616".split()


# --- the valid file and its damage ----------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[Pairs, bytes]:
    """A small valid file from safetensors itself: (header as pairs, data section)."""
    path = tmp_path_factory.mktemp("fuzz-headers") / "valid.safetensors"
    tensors = {
        "w": torch.randn(4, 6),
        "b": torch.randn(6).to(torch.bfloat16),
        "i": torch.arange(5, dtype=torch.int64),
        "e": torch.zeros(0, 3),
        "f8": torch.randn(3).to(torch.float8_e4m3fn),
        "s": torch.tensor(True),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return list(json.loads(raw[8 : 8 + n]).items()), raw[8 + n :]


def _edit_entry(pairs: Pairs, data: st.DataObject) -> None:
    """One field of one tensor entry: replaced, removed, renamed or shifted."""
    i = data.draw(st.sampled_from([i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]))
    name, entry = pairs[i]
    entry = dict(entry) if isinstance(entry, dict) else {}
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    action = data.draw(st.sampled_from(["dtype", "ints", "shift", "junk", "drop", "rename", "add"]))
    if action == "dtype":
        entry["dtype"] = data.draw(dtype_strings)
    elif action == "ints":
        entry[field] = data.draw(int_lists)
    elif action == "shift":  # the same size elsewhere: gaps, overlaps, past the end
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and all(isinstance(o, int) for o in offsets):
            entry["data_offsets"] = [o + data.draw(ints) for o in offsets]
    elif action == "junk":
        entry[field] = data.draw(junk)
    elif action == "drop":
        entry.pop(field, None)
    elif action == "rename" and field in entry:
        entry[data.draw(names)] = entry.pop(field)
    else:
        entry[data.draw(names)] = data.draw(junk)
    pairs[i] = (name, entry)


def _edit_object(pairs: Pairs, data: st.DataObject) -> None:
    """The top level: a tensor removed, renamed (perhaps onto another), added or replaced."""
    i = data.draw(st.integers(0, len(pairs) - 1))
    action = data.draw(st.sampled_from(["remove", "rename", "duplicate", "replace", "add", "meta"]))
    if action == "remove":
        del pairs[i]
    elif action == "rename":
        pairs[i] = (data.draw(names | st.sampled_from([k for k, _ in pairs])), pairs[i][1])
    elif action == "duplicate":
        pairs.append(pairs[i])
    elif action == "replace":
        pairs[i] = (pairs[i][0], data.draw(junk))
    elif action == "add":
        pairs.insert(i, (data.draw(names), data.draw(junk)))
    else:
        pairs[:] = [(k, v) for k, v in pairs if k != "__metadata__"]
        pairs.insert(i, ("__metadata__", data.draw(junk | st.dictionaries(names, names))))


def _is_shape(shape: object) -> bool:
    return isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)


SAME_SIZE = [["F32", "I32"], ["BF16", "F16", "I16"], ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"]]


def _keep_valid(pairs: Pairs, data: st.DataObject) -> None:
    """Edits a valid file survives (reorder, rename, retype, reshape, swap), so acceptance is tested."""
    tensors = [i for i, (k, v) in enumerate(pairs) if k != "__metadata__" and isinstance(v, dict)]
    if not tensors:
        return
    i = data.draw(st.sampled_from(tensors))
    name, entry = pairs[i][0], dict(pairs[i][1])
    action = data.draw(st.sampled_from(["reorder", "rename", "retype", "reshape", "swap", "meta"]))
    if action == "reorder":
        pairs[:] = data.draw(st.permutations(pairs))
        return
    if action == "rename":
        name = data.draw(names.filter(lambda n: n not in {k for k, _ in pairs}))
    elif action == "retype":
        group = next((g for g in SAME_SIZE if entry.get("dtype") in g), [entry.get("dtype")])
        entry["dtype"] = data.draw(st.sampled_from(group))
    elif action == "reshape" and _is_shape(entry.get("shape")):
        numel = math.prod(entry["shape"])
        same = [[numel], [1, numel], [numel, 1]] + ([[]] if numel == 1 else [])
        empty = st.lists(ints, max_size=3).map(lambda dims: [0, *dims])  # huge dims too
        entry["shape"] = data.draw(st.sampled_from(same) if numel else empty)
    elif action == "swap":
        j = data.draw(st.sampled_from(tensors))
        other = dict(pairs[j][1])
        entry["data_offsets"], other["data_offsets"] = (
            other.get("data_offsets"),
            entry.get("data_offsets"),
        )
        pairs[j] = (pairs[j][0], other)
    else:
        pairs[:] = [(k, v) for k, v in pairs if k != "__metadata__"]
        if data.draw(st.booleans()):
            pairs.insert(0, ("__metadata__", data.draw(st.dictionaries(names, names, max_size=3))))
        return
    pairs[i] = (name, entry)


def _dump(pairs: Pairs) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"


def _respell_a_number(text: str, data: st.DataObject) -> str:
    numbers = list(re.finditer(r"(?<![\w.\"])-?\d+(?![\w.\"])", text))
    if not numbers:
        return text
    m = data.draw(st.sampled_from(numbers))
    return text[: m.start()] + data.draw(st.sampled_from(NUMBER_TOKENS)) + text[m.end() :]


def _damaged(valid: tuple[Pairs, bytes], data: st.DataObject) -> bytes:
    """A damaged copy of the valid file: JSON edits, then perhaps byte-level damage."""
    pairs, data_bytes = list(valid[0]), valid[1]
    for _ in range(data.draw(st.integers(0, 3))):
        edit = data.draw(st.sampled_from([_keep_valid, _keep_valid, _edit_entry, _edit_object]))
        if edit is _edit_entry and not any(k != "__metadata__" for k, _ in pairs):
            edit = _edit_object
        if pairs:
            edit(pairs, data)
    text = _dump(pairs)
    if data.draw(st.integers(0, 3)) == 0:
        text = _respell_a_number(text, data)
    if data.draw(st.integers(0, 7)) == 0:  # whitespace around the object (safetensors pads)
        text = (
            data.draw(st.sampled_from(["", " ", "\n", "\t"]))
            + text
            + " " * data.draw(st.integers(0, 7))
        )
    blob = text.encode()  # ASCII: json.dumps escapes the rest, lone surrogates included
    length = len(blob)
    damage = data.draw(st.sampled_from(["none", "length", "flip", "truncate", "pad"]))
    if damage == "length":
        length = data.draw(
            st.sampled_from([0, 1, 7, length - 1, length + 1, MAX_HEADER_BYTES + 1, 2**63])
            | st.integers(0, 2**64 - 1)
        )
    raw = bytearray(struct.pack("<Q", length) + blob + data_bytes)
    if damage == "flip":  # inside the length field and the header, where parsing happens
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, 8 + len(blob) - 1))] = data.draw(st.integers(0, 255))
    elif damage == "truncate":
        del raw[data.draw(st.integers(0, len(raw))) :]
    elif damage == "pad":
        raw += bytes(data.draw(st.integers(1, 16)))
    return bytes(raw)


# --- the properties ----------------------------------------------------------------------------------


def _same_as_safetensors(path: Path) -> bool:
    """read_header's verdict (True: accepted); when it accepts, safe_open reads the same tensors."""
    try:
        header = read_header(path)
    except SourceError as e:
        assert "\n" not in str(e), str(e)
        return False
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:  # raises if the reference refuses
        assert sorted(f.keys()) == sorted(header.tensors)
        assert (f.metadata() or {}) == header.metadata
        for name, info in header.tensors.items():
            tensor = f.get_tensor(name)
            assert (tensor.dtype, tuple(tensor.shape)) == (info.dtype, info.shape), name
            stored = raw[header.data_start + info.start : header.data_start + info.stop]
            assert bytes(tensor.reshape(-1).view(torch.uint8).tolist()) == stored, name
    return True


def test_the_undamaged_file_is_accepted(valid, tmp_path):
    path = tmp_path / "ok.safetensors"
    blob = _dump(valid[0]).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + valid[1])
    assert _same_as_safetensors(path)


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_read_header_refuses_with_source_error_or_agrees_with_safetensors(valid, tmp_path, data):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(_damaged(valid, data))
    _same_as_safetensors(path)


@pytest.fixture(scope="module")
def source_copy(tiny_dir, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path_factory.mktemp("fuzz-src") / "src"))


def _damage_index(text: str, data: st.DataObject) -> str:
    index = json.loads(text)
    weight_map = index["weight_map"]
    name = data.draw(st.sampled_from(sorted(weight_map)))
    action = data.draw(st.sampled_from(["file", "remove", "add", "junk", "map"]))
    if action == "file":
        weight_map[name] = data.draw(
            st.sampled_from(["../x.safetensors", "/x.safetensors", "pytorch_model.bin", ""])
            | st.sampled_from(sorted(set(weight_map.values())))
            | names
        )
    elif action == "remove":
        del weight_map[name]
    elif action == "add":
        weight_map[data.draw(names)] = data.draw(st.sampled_from(sorted(set(weight_map.values()))))
    elif action == "junk":
        weight_map[name] = data.draw(junk)
    else:
        index["weight_map"] = data.draw(junk)
    return json.dumps(index)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_open_source_refuses_with_source_error_or_reads_what_safetensors_reads(source_copy, data):
    """A real checkpoint directory with one damaged weight file or a damaged index."""
    index = source_copy / "model.safetensors.index.json"
    target = source_copy / data.draw(
        st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    )
    original_file, original_index = target.read_bytes(), index.read_text()
    try:
        if data.draw(st.booleans()):
            (n,) = struct.unpack("<Q", original_file[:8])
            pairs = list(json.loads(original_file[8 : 8 + n]).items())
            target.write_bytes(_damaged((pairs, original_file[8 + n :]), data))
        else:
            index.write_text(_damage_index(original_index, data))
        try:
            source = open_source(str(source_copy))
        except SourceError as e:
            assert "\n" not in str(e), str(e)
            return
        # Accepted: safetensors must read every file with the same tensors.
        for path in source.files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensor, stored = source.tensors[name], f.get_tensor(name)
                    assert tensor.path == str(path), name
                    assert (tensor.shape, tensor.dtype) == (tuple(stored.shape), stored.dtype), name
        assert len(source.tensors) == sum(len(read_header(p).tensors) for p in source.files)
    finally:
        target.write_bytes(original_file)
        index.write_text(original_index)
