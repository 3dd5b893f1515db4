"""`hf:org/name[@rev]` sources, offline, from a Hub cache built in the test.

The cache has huggingface_hub's real layout (blobs named by sha256, snapshot
entries symlinked to them, refs/main), so `snapshot_download` with
HF_HUB_OFFLINE=1 resolves it exactly as it would a downloaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reshard.tiny import write_tiny_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    write_tiny_checkpoint("qwen3_moe", src)
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (src / "original").mkdir()  # another format's copy, as Llama repos ship: never read
    (src / "original" / "consolidated.safetensors").write_bytes(b"not for reshard")
    for f in src.rglob("*"):
        if f.is_dir():
            continue
        blob = repo / "blobs" / _sha256(f)
        blob.write_bytes(f.read_bytes())
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return cache


def _reshard(args: list[str], cache: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", RESHARD_CACHE=str(tmp / "rc")
    )
    return subprocess.run(
        [sys.executable, "-m", "reshard.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_convert_from_hub_cache_offline(hub_cache, tmp_path):
    out = tmp_path / "out"
    result = _reshard(
        ["convert", "--src", "hf:org/tiny", "--layout", "ep2", "--out", str(out), "-q"],
        hub_cache,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "reshard.json").read_text())
    assert manifest["source"]["repo"] == "org/tiny"
    assert manifest["source"]["revision"] == COMMIT  # `main` resolved to the commit it named
    snapshot = hub_cache / "models--org--tiny" / "snapshots" / COMMIT
    weights = sorted(snapshot.glob("*.safetensors"))
    assert len(weights) == 2
    # Hashes come free from the blob names; they must still be the files' real sha256.
    assert manifest["source"]["files"] == {f.name: _sha256(f.resolve()) for f in weights}
    verify = _reshard(["verify", str(out), "--against", "hf:org/tiny", "-q"], hub_cache, tmp_path)
    assert verify.returncode == 0, verify.stderr


def test_revision_is_recorded(hub_cache, tmp_path):
    out = tmp_path / "out"
    result = _reshard(
        ["convert", "--src", f"hf:org/tiny@{COMMIT}", "--layout", "tp2", "--out", str(out), "-q"],
        hub_cache,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "reshard.json").read_text())["source"]["revision"] == COMMIT


@pytest.mark.parametrize("src", ["hf:org/absent", "hf:org/tiny@no-such-revision"])
def test_missing_repo_offline_is_one_clear_line(hub_cache, tmp_path, src):
    result = _reshard(["plan", "--src", src, "--layout", "ep2"], hub_cache, tmp_path)
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"error: {src}: not in the local Hub cache")
    assert "HF_HUB_OFFLINE" in first
    assert "Traceback" not in result.stderr


def test_the_convert_benchmarks_hub_cache_converts_as_its_directory(tmp_path):
    """benchmarks/convert.py's `from hf:` rows: the directory laid out as a Hub cache gives
    the same rank files, and the manifest's source hashes (the blobs' names) are the files'."""
    from helpers_cli import load_benchmark

    src = tmp_path / "src"
    write_tiny_checkpoint("qwen3_moe", src)
    cache = tmp_path / "hub-cache"
    spec = load_benchmark("convert").hub_cache(src, cache)
    outs = {}
    for name, source in (("local", str(src)), ("hub", spec)):
        outs[name] = tmp_path / f"out-{name}"
        args = ["convert", "--src", source, "--layout", "ep2tp2", "--out", str(outs[name]), "-q"]
        result = _reshard(args, cache, tmp_path / f"work-{name}")
        assert result.returncode == 0, result.stderr
    local, hub = (json.loads((outs[k] / "reshard.json").read_text()) for k in ("local", "hub"))
    assert hub["source"]["repo"] == "reshard-bench/synth"
    weights = sorted(src.glob("*.safetensors"))
    assert (
        hub["source"]["files"] == {f.name: _sha256(f) for f in weights} == local["source"]["files"]
    )
    assert [r["sha256"] for r in hub["ranks"]] == [r["sha256"] for r in local["ranks"]]
    # The hashes came free: each snapshot entry leads to a blob named by the file's sha256.
    snapshot = cache / "models--reshard-bench--synth" / "snapshots" / hub["source"]["revision"]
    assert {(snapshot / f.name).resolve().name for f in weights} == {_sha256(f) for f in weights}
