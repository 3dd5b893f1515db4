"""benchmarks/column_slices.py: its torch-free column slices are the bytes torch cuts.

Oracle: torch's own column slicing of the tensor read with safetensors.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers_cli import load_benchmark
from safetensors.torch import load_file, save_file

bench = load_benchmark("column_slices")
NAME = "model.layers.0.mlp.experts.0.down_proj.weight"


@pytest.fixture
def src(tmp_path):
    torch.manual_seed(0)
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(16, 48, dtype=torch.bfloat16),
            NAME: torch.randn(64, 48, dtype=torch.bfloat16),
            NAME.replace("experts.0", "experts.1"): torch.randn(64, 48, dtype=torch.bfloat16),
        },
        tmp_path / "model.safetensors",
    )
    return tmp_path


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_the_scatter_cuts_the_slices_torch_cuts(src, tp):
    tensors = bench.down_projs(src)
    assert len(tensors) == 2
    want = load_file(src / "model.safetensors")[NAME]
    f, offset, (rows, cols) = next(t for t in tensors if t[2] == [64, 48])
    fd = os.open(f, os.O_RDONLY)
    try:
        got = bench.Scatter(rows, cols, tp).cut(fd, offset)
    finally:
        os.close(fd)
    w = cols // tp
    for t in range(tp):
        piece = want[:, t * w : (t + 1) * w].contiguous()
        assert bytes(got[t]) == piece.view(torch.uint8).numpy().tobytes(), t


def test_the_benchmark_stops_when_the_scatter_is_wrong(src, monkeypatch, capsys):
    """A timing of wrong bytes means nothing: the run checks them first."""
    assert bench.main(["--src", str(src), "--tp", "2,4"]) == 0
    assert "| 4 |" in capsys.readouterr().out
    real = bench.Scatter.cut
    monkeypatch.setattr(bench.Scatter, "cut", lambda self, fd, off: real(self, fd, off)[::-1])
    with pytest.raises(SystemExit, match="differs from torch"):
        bench.main(["--src", str(src), "--tp", "2"])
