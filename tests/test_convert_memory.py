"""Peak RSS of `reshard convert` is bounded by one output tensor shard, not by model size.

A CI-sized run of benchmarks/convert_memory.py: a ~270 MiB synthetic Qwen3-MoE
checkpoint whose largest output tensor shard is a few MiB. Every figure is the
peak RSS of a subprocess; the import-only baseline (imports + plan) is measured
in the same test and subtracted. The naive full load is measured too, to prove
the measurement sees a whole-model load when there is one.
"""

from __future__ import annotations

import shutil

import pytest
from helpers_cli import load_benchmark

MiB = 1 << 20
K, CONSTANT = 4, 64 * MiB  # the bound: peak - import <= K * largest shard + CONSTANT


bench = load_benchmark("convert_memory")

# 10 layers x 32 experts of [256, 512] bf16 + 8192-token vocab: ~270 MiB in 11 files.
SIZE = bench.Size(
    hidden=512,
    layers=10,
    experts=32,
    moe_intermediate=256,
    vocab=8192,
    heads=8,
    kv_heads=4,
    head_dim=64,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """(source directory, model bytes); deleted after the module, it is large."""
    work = tmp_path_factory.mktemp("convert-memory")
    model_bytes = bench.write_checkpoint(work / "src", SIZE)
    yield work / "src", model_bytes
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def import_rss(checkpoint) -> int:
    """Peak RSS of a process that imports reshard + torch and plans the conversion."""
    src, _ = checkpoint
    return bench.measure_import(src, "tp4").peak_rss


def test_measurement_sees_a_full_load(checkpoint, import_rss):
    src, model_bytes = checkpoint
    naive = bench.measure_naive(src)
    figures = (
        f"naive load_file + fuse: peak {naive.peak_rss / MiB:.0f} MiB, import {import_rss / MiB:.0f} "
        f"MiB, model {model_bytes / MiB:.0f} MiB"
    )
    print(figures)
    assert naive.peak_rss - import_rss > model_bytes, figures


@pytest.mark.parametrize("layout", ["ep4", "tp4"])
def test_convert_peak_rss_is_bounded_by_one_shard(checkpoint, import_rss, tmp_path, layout):
    src, model_bytes = checkpoint
    shard = bench.largest_shard_bytes(src, layout)
    assert shard * 20 < model_bytes  # the bound must be far below the model for this to mean much
    out = tmp_path / "out"
    m = bench.measure_convert(src, layout, out)
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out)
    assert written >= model_bytes  # every byte of the model went through the converter

    extra = m.peak_rss - import_rss
    figures = (
        f"{layout}: peak {m.peak_rss / MiB:.0f} MiB - import {import_rss / MiB:.0f} MiB = "
        f"{extra / MiB:.0f} MiB; largest shard {shard / MiB:.0f} MiB, model {model_bytes / MiB:.0f} MiB"
    )
    print(figures)
    assert extra < model_bytes / 3, figures
    assert extra <= K * shard + CONSTANT, figures
