"""Fuzzing the readers of untrusted safetensors headers (sources and rank files); manifests are
fuzzed in test_fuzz_manifest.py. Thousands of mutated inputs; only the tool's own error may escape, never
another exception and never a hang, and whatever is accepted is really usable.

Oracle for headers: safetensors' own `safe_open`, which must accept every file we accept
and report the same tensors.
"""

from __future__ import annotations

import copy
import json
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
from reshard.safetensors_header import read_header
from reshard.sources import open_source

FUZZ = settings(
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same inputs on every run: a failure is reproducible
)

# --- safetensors headers ----------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["F32", "BF16", "U16", "F8_E4M3", "I64", "", "BOOL", "F4"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> tuple[dict, bytes]:
    """A small valid safetensors file, as (parsed header, data bytes)."""
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    save_file(
        {
            "w": torch.randn(4, 6),
            "b": torch.randn(6).to(torch.bfloat16),
            "i": torch.arange(5, dtype=torch.int32),
            "e": torch.zeros(0, 3),
        },
        str(path),
        metadata={"format": "pt"},
    )
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _mutate_json(header: dict, data: st.DataObject) -> dict:
    header = copy.deepcopy(header)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(header)))
        action = data.draw(st.sampled_from(["replace", "delete", "field", "insert"]))
        if action == "replace":
            header[name] = data.draw(json_value)
        elif action == "delete":
            del header[name]
        elif action == "insert":
            header[data.draw(st.text(max_size=8))] = data.draw(json_value)
        elif isinstance(header[name], dict) and header[name]:
            field = data.draw(st.sampled_from(sorted(header[name])))
            header[name][field] = data.draw(json_value)
    return header


def _serialize(header: dict, data_bytes: bytes, data: st.DataObject) -> bytes:
    blob = json.dumps(header).encode()
    length = len(blob)
    if data.draw(st.booleans()):
        length = data.draw(st.sampled_from([0, 1, length - 1, length + 1, 2**63, 2**40]))
    raw = struct.pack("<Q", length % 2**64) + blob + data_bytes
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    if data.draw(st.booleans()) and raw:
        raw = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(raw)
    return raw


def _check_against_safetensors(path: Path) -> str:
    """read_header's verdict; when it accepts, safetensors must accept the same tensors."""
    try:
        header = read_header(path)
    except SourceError:
        return "refused"
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(header.tensors)
        for name, info in header.tensors.items():
            assert tuple(f.get_slice(name).get_shape()) == info.shape, name
            assert f.get_tensor(name).dtype == info.dtype, name
    return "accepted"


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_read_header_fuzz(valid_file, tmp_path, data):
    header, data_bytes = valid_file
    path = tmp_path / "m.safetensors"
    path.write_bytes(_serialize(_mutate_json(header, data), data_bytes, data))
    _check_against_safetensors(path)


def test_read_header_accepts_the_unmutated_file(valid_file, tmp_path):
    header, data_bytes = valid_file
    path = tmp_path / "ok.safetensors"
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data_bytes)
    assert _check_against_safetensors(path) == "accepted"


@pytest.fixture(scope="module")
def source_copy(tiny_dir, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path_factory.mktemp("fuzz-src") / "src"))


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_open_source_fuzz(source_copy, data):
    """Mutated headers in a real checkpoint directory: open_source refuses with SourceError."""
    target = source_copy / "model-00002-of-00002.safetensors"
    original = target.read_bytes()
    (n,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8 : 8 + n])
    try:
        target.write_bytes(_serialize(_mutate_json(header, data), original[8 + n :], data))
        try:
            open_source(str(source_copy))
        except SourceError:
            pass
    finally:
        target.write_bytes(original)
