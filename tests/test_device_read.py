"""`reshard.device_read`: a safetensors file's tensors read through staging buffers by several
threads give what safetensors itself loads (the CUDA path, pinned buffers and streams, is
checked in test_cuda.py; this is the same code on the CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import reshard.device_read as device_read
from reshard.errors import CheckpointError
from reshard.safetensors_header import read_header

CPU = torch.device("cpu")


@pytest.fixture
def file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(37, 129, generator=g).to(torch.bfloat16),
        "b.odd_bytes": torch.randint(0, 255, (1001,), generator=g, dtype=torch.uint8),
        "c.f32": torch.randn(3, 5, 7, generator=g),
        "d.scalar": torch.tensor(2.5),
        "e.empty": torch.empty(0, 4),
        "f.bool": torch.rand(333, generator=g) > 0.5,
        "g.i64": torch.randint(-(2**40), 2**40, (17,), generator=g),
        "h.f16": torch.randn(64, 64, generator=g).to(torch.float16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("chunk, threads", [(64 << 20, 4), (1000, 3), (64, 4), (7, 2), (1, 1)])
def test_read_tensors_equals_safetensors(file, chunk, threads, monkeypatch):
    """Chunks much larger than the file (one read for all), chunks that cut tensors and hold
    several, down to one byte per read; any number of threads."""
    monkeypatch.setattr(device_read, "CHUNK", chunk)
    monkeypatch.setattr(device_read, "THREADS", threads)
    want = load_file(str(file))
    header = read_header(file)
    got = device_read.read_tensors(file, header, list(header.tensors), CPU)
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_read_some_tensors(file, monkeypatch):
    monkeypatch.setattr(device_read, "CHUNK", 100)
    want = load_file(str(file))
    names = ["h.f16", "b.odd_bytes", "d.scalar"]
    got = device_read.read_tensors(file, read_header(file), names, CPU)
    assert sorted(got) == sorted(names)
    for name in names:
        assert torch.equal(got[name], want[name]), name


def test_a_file_cut_short_is_one_error_naming_it(file):
    header = read_header(file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])  # after the header was read: changed under us
    with pytest.raises(CheckpointError, match=rf"{file}: cannot read \(the file ends at byte"):
        device_read.read_tensors(file, header, list(header.tensors), CPU)
