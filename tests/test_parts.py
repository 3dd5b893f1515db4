"""Ranks written as parts (`--max-file-size`, for the Hub's per-file limit) and every reader of them.

Oracle: the same conversion written as one file per rank (itself held to DTensor and
transformers elsewhere), and safetensors for every part written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers_files import flip_a_data_byte
from safetensors import safe_open
from safetensors.torch import load_file

from reshard.checkpoint import ShardedCheckpoint
from reshard.cli import cli
from reshard.errors import CheckpointError
from reshard.runtime import load_local_tensors
from reshard.verify import check_files

LIMIT = "200KB"  # tiny's ep2tp2 ranks are ~400 KB: three parts each


def run(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def parted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parts") / "ep2tp2"
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "ep2tp2", "--out", out,
        "--max-file-size", LIMIT, "-q")  # fmt: skip
    return out


@pytest.fixture
def copy(parted, tmp_path) -> Path:
    return Path(shutil.copytree(parted, tmp_path / "copy"))


def test_parts_hold_exactly_the_ranks_tensors(parted, convert_tiny):
    whole = convert_tiny("ep2tp2")
    manifest = json.loads((parted / "reshard.json").read_text())
    assert manifest["format_version"] == 3
    assert not list(parted.glob("rank-*-of-00004.safetensors"))
    for entry in manifest["ranks"]:
        rank = entry["rank"]
        assert "file" not in entry and len(entry["parts"]) >= 2
        with safe_open(str(whole / f"rank-{rank:05d}-of-00004.safetensors"), "pt") as f:
            want = {k: f.get_tensor(k) for k in f.keys()}
        got = {}
        for k, part in enumerate(entry["parts"], start=1):
            assert part["file"] == f"rank-{rank:05d}-of-00004-part-{k}.safetensors"
            path = parted / part["file"]
            assert path.stat().st_size == part["bytes"] <= 200_000 + 4096  # + header
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
                assert (meta["reshard_rank"], meta["reshard_part"]) == (
                    str(rank),
                    f"{k}/{len(entry['parts'])}",
                )
                assert sorted(f.keys()) == sorted(part["tensors"])
                got.update({key: f.get_tensor(key) for key in f.keys()})
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), rank


def test_verify_and_load_read_parts(parted, convert_tiny):
    run("verify", parted, "--against", "tiny:qwen3_moe")
    for rank in range(4):
        got = load_local_tensors(parted, rank)
        want = load_local_tensors(convert_tiny("ep2tp2"), rank)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_damaged_part_is_named(copy):
    flip_a_data_byte(copy / "rank-00002-of-00004-part-2.safetensors")
    bad = [f.what for f in check_files(ShardedCheckpoint(copy)) if not f.ok]
    assert len(bad) == 1 and "rank-00002-of-00004-part-2.safetensors: sha256" in bad[0]


def test_swapped_parts_are_refused_even_with_hashes_edited(copy):
    a, b = (
        copy / "rank-00001-of-00004-part-1.safetensors",
        copy / "rank-00001-of-00004-part-2.safetensors",
    )
    tmp = copy / "swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    manifest = json.loads((copy / "reshard.json").read_text())
    parts = manifest["ranks"][1]["parts"]
    for part in parts[:2]:  # make sizes and hashes match the swapped files
        data = (copy / part["file"]).read_bytes()
        part["bytes"], part["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (copy / "reshard.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"part-1.safetensors: its header says .*part 2/"):
        ShardedCheckpoint(copy).check_rank_file(1)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["parts"][1].update(file="rank-00000-of-00004-part-7.safetensors"), "must be"),
        (lambda r: r["parts"][0]["tensors"].pop(), "tensors missing"),
        (lambda r: r["parts"][1]["tensors"].append(r["parts"][0]["tensors"][0]), "two parts"),
        (lambda r: r.update(parts=r["parts"][:1]), "at least 2"),
    ],
)
def test_manifest_parts_are_checked(copy, edit, message):
    manifest = json.loads((copy / "reshard.json").read_text())
    edit(manifest["ranks"][0])
    (copy / "reshard.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        ShardedCheckpoint(copy)


def test_rerun_keeps_parts_and_rewriting_whole_removes_them(copy):
    stamps = {p.name: p.stat().st_mtime_ns for p in copy.glob("rank-*.safetensors")}
    args = ("convert", "--src", "tiny:qwen3_moe", "--layout", "ep2tp2", "--out", copy)
    run(*args, "--max-file-size", LIMIT, "-q")
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("rank-*.safetensors")} == stamps
    run(*args, "-q")  # the default limit: one file per rank, the parts are gone
    assert sorted(p.name for p in copy.glob("rank-*.safetensors")) == [
        f"rank-{r:05d}-of-00004.safetensors" for r in range(4)
    ]
    run("verify", copy, "--against", "tiny:qwen3_moe")


def test_reshard_and_export_from_parts(parted, tmp_path, convert_tiny, tiny_dir):
    run("convert", "--src", parted, "--layout", "tp2", "--out", tmp_path / "tp2", "-q")
    for r in range(2):
        name = f"rank-{r:05d}-of-00002.safetensors"
        assert (tmp_path / "tp2" / name).read_bytes() == (convert_tiny("tp2") / name).read_bytes()
    run("export", parted, "--out", tmp_path / "hf", "-q")
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    want = {}
    for f in tiny_dir.glob("*.safetensors"):
        want.update(load_file(str(f)))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
