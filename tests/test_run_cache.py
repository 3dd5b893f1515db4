"""`reshard run SRC --layout L` converts into a cache keyed by what SRC is, not what it is called.

Each case used to run the old cached weights: two directories given by the same relative
path, a source rewritten in place, a cache entry whose manifest no longer matches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers_cli import reshard_cmd
from helpers_files import count_hashing
from safetensors.torch import load_file, save_file

from reshard.checkpoint import ShardedCheckpoint
from reshard.convert import convert_cached
from reshard.layout import Layout
from reshard.sources import open_source

NORM = "model.norm.weight"


def _rewrite_norm(src: Path, delta: float) -> None:
    """Change one tensor's values in place, keeping every size (what a re-download can do)."""
    file = next(f for f in src.glob("*.safetensors") if NORM in load_file(str(f)))
    tensors = load_file(str(file))
    tensors[NORM] = tensors[NORM] + delta
    save_file(tensors, str(file), metadata={"format": "pt"})


def _norm_in(directory: Path) -> torch.Tensor:
    ckpt = ShardedCheckpoint(directory)
    return ckpt.load_rank(0)[NORM]  # replicated: every rank holds all of it


def test_same_path_rewritten_in_place_is_converted_again(tiny_dir, tmp_path):
    src, cache, layout = tmp_path / "src", tmp_path / "cache", Layout.parse("tp2")
    shutil.copytree(tiny_dir, src)
    first = convert_cached(open_source(str(src)), layout, cache, progress=False)
    assert convert_cached(open_source(str(src)), layout, cache, progress=False) == first

    _rewrite_norm(src, 1.0)
    second = convert_cached(open_source(str(src)), layout, cache, progress=False)
    assert second != first
    want = load_file(str(next(f for f in src.glob("*.safetensors") if NORM in load_file(str(f)))))
    assert torch.equal(_norm_in(second), want[NORM])
    assert not torch.equal(_norm_in(first), want[NORM])


def test_two_directories_behind_one_relative_path(tiny_dir, tmp_path, monkeypatch):
    cache, layout = tmp_path / "cache", Layout.parse("tp2")
    for name, delta in (("a", 0.0), ("b", 2.0)):
        shutil.copytree(tiny_dir, tmp_path / name / "model")
        _rewrite_norm(tmp_path / name / "model", delta)
    monkeypatch.chdir(tmp_path / "a")
    in_a = convert_cached(open_source("model"), layout, cache, progress=False)
    monkeypatch.chdir(tmp_path / "b")
    in_b = convert_cached(open_source("model"), layout, cache, progress=False)
    assert in_a != in_b
    assert not torch.equal(_norm_in(in_a), _norm_in(in_b))


def test_a_cache_entry_that_no_longer_matches_is_replaced(tiny_dir, tmp_path):
    cache, layout = tmp_path / "cache", Layout.parse("tp2")
    entry = convert_cached(open_source(str(tiny_dir)), layout, cache, progress=False)
    manifest = json.loads((entry / "reshard.json").read_text())
    real = dict(manifest["source"]["files"])
    manifest["source"]["files"] = {name: "0" * 64 for name in real}
    (entry / "reshard.json").write_text(json.dumps(manifest))
    again = convert_cached(open_source(str(tiny_dir)), layout, cache, progress=False)
    assert again == entry
    assert ShardedCheckpoint(again).manifest.source["files"] == real


def test_run_uses_the_rewritten_source(tiny_dir, tmp_path):
    """Through the CLI: the second `reshard run src --layout tp2` converts the new weights."""
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    env = dict(os.environ, RESHARD_CACHE=str(tmp_path / "cache"))
    run = ["run", "src", "--layout", "tp2", "--prompt", "Why", "--max-new-tokens", "1"]
    cmd = [*reshard_cmd(), *run, "--device", "cpu", "--json", "--quiet"]
    for delta in (None, 1.0):
        if delta is not None:
            _rewrite_norm(src, delta)
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    entries = sorted((tmp_path / "cache" / "converted").iterdir())
    assert len(entries) == 2
    source_hashes = open_source(str(src)).file_hashes()
    assert [ShardedCheckpoint(e).manifest.source["files"] == source_hashes for e in entries].count(
        True
    ) == 1


def test_a_rank_file_is_hashed_once_and_its_hash_recorded(tmp_path, monkeypatch):
    """Integrity off the load's critical path: convert records each rank file's hash from its
    writer, so loading after converting reads nothing extra; a changed file is hashed again
    (and refused when damaged); `reshard verify` always reads."""
    import reshard.hash_cache
    from reshard.convert import convert, make_plan
    from reshard.errors import CheckpointError
    from reshard.layout import Layout
    from reshard.runtime import load_local_tensors
    from reshard.sources import open_source

    out = tmp_path / "ep2"
    convert(make_plan(open_source("tiny:qwen3_moe"), Layout.parse("ep2")), out, progress=False)
    hashed = count_hashing(monkeypatch, reshard.hash_cache)
    rank1 = out / "rank-00001-of-00002.safetensors"
    for rank in (0, 1, 0):
        load_local_tensors(out, rank=rank)
    assert hashed == []  # recorded by convert's writer
    rank1.write_bytes(rank1.read_bytes())  # same bytes, but rewritten: not provably unchanged
    load_local_tensors(out, rank=1)
    load_local_tensors(out, rank=1)
    assert hashed == [rank1.name]  # hashed once, then recorded again
    flip = bytearray(rank1.read_bytes())
    flip[-1] ^= 1
    rank1.write_bytes(bytes(flip))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_local_tensors(out, rank=1)
    hashed.clear()
    ShardedCheckpoint(out).check_rank_file(0)  # what `reshard verify` runs: always reads
    assert hashed == ["rank-00000-of-00002.safetensors"]


def test_prefetched_hashes_are_read_once_in_the_background_and_only_while_unchanged(
    tmp_path, monkeypatch
):
    """`prefetch` (what a command starts before `import torch`) hashes in its own threads; the
    command then takes that result without reading the file again, unless the file changed
    since, and a file the cache knows unchanged is not read at all."""
    import hashlib
    import time

    import reshard.hash_cache as hc

    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"a" * 100_000)
    b.write_bytes(b"b" * 100_000)
    hashed = count_hashing(monkeypatch, hc)
    hc.prefetch([a, b])
    deadline = time.monotonic() + 10
    while len(hashed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(hashed) == [a.name, b.name]  # on its own, before anyone asked
    assert hc.cached_sha256([a, b]) == {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)
    }
    assert sorted(hashed) == [a.name, b.name]  # taken from the prefetch, not read again
    hc.prefetch([a, b])
    time.sleep(0.3)
    assert len(hashed) == 2  # files the cache knows unchanged are not prefetched
    hc.prefetch([a], cached=False)
    a.write_bytes(b"c" * 100_001)  # changed after the prefetch started: its result is stale
    assert hc.sha256_of(a) == hashlib.sha256(b"c" * 100_001).hexdigest()
