"""Peak RSS of `reshard convert` is bounded by one output tensor shard, not by model size.

A CI-sized run of benchmarks/convert_memory.py: a ~270 MiB synthetic Qwen3-MoE
checkpoint whose largest output tensor shard is a few MiB. Every figure is the
peak RSS of a subprocess; the import-only baseline (imports + plan) is measured
in the same test and subtracted. The naive full load is measured too, to prove
the measurement sees a whole-model load when there is one.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys

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


ARENAS = """
import ctypes, sys, tempfile, threading
from reshard.machine import share_malloc_arenas
if sys.argv[1] == "capped":
    assert share_malloc_arenas(2)
go = threading.Barrier(8)
def allocate():
    go.wait()  # all at once, so none can take another's free arena
    keep = [bytearray(1000) for _ in range(1000)]
    go.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile() as f:
    stream = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(open(f.name).read().count("<heap nr="))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc arenas are glibc's",
)
def test_share_malloc_arenas_caps_the_arenas_glibc_makes():
    """glibc's own count of its heaps (malloc_info): 8 threads allocating at once make an arena
    each, unless the command capped them first, as `reshard` does before its threads start."""

    def heaps(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, check=True
        )
        return int(done.stdout)

    assert heaps("free") >= 8
    assert heaps("capped") <= 2
