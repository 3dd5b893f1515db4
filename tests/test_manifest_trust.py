"""`reshard.json` is checked, never trusted: every reader refuses a damaged or edited manifest in
one line naming the field, and a rank file must say itself which rank and layout it holds.

Each case starts from a real converted checkpoint (conftest's `convert_tiny`) and damages a
private copy; the readers are the API (`ShardedCheckpoint`, `load_local_tensors`) and the CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers_cli import one_error_line, reshard_cmd

from reshard.checkpoint import ShardedCheckpoint
from reshard.errors import CheckpointError
from reshard.runtime import load_local_tensors
from reshard.writer import sha256_file

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture
def ckpt(convert_tiny, tmp_path) -> Path:
    return Path(shutil.copytree(convert_tiny("ep2tp2"), tmp_path / "ep2tp2"))


def _edit(directory: Path, change: Callable[[dict], object]) -> None:
    path = directory / "reshard.json"
    data = json.loads(path.read_text())
    replaced = change(data)
    path.write_text(json.dumps(data if replaced is None else replaced))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*reshard_cmd(), *args], capture_output=True, text=True, timeout=120)


def _assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    one_error_line(result.returncode, result.stderr, *fragments)


def _assert_verify_fails(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """verify prints one FAIL line per failed check and exits 1."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    fails = [line for line in result.stderr.splitlines() if line.startswith("FAIL ")]
    assert any(all(f in line for f in fragments) for line in fails), result.stderr


def _swap_rank_entries(m: dict) -> None:
    m["ranks"][0], m["ranks"][1] = m["ranks"][1], m["ranks"][0]


def _set(path: list, value) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _delete(key: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        del m[key]

    return change


CASES = {
    "a JSON list": (lambda m: [m], "expected dict"),
    "swapped rank entries": (_swap_rank_entries, "ranks[0].rank: is 1, must be 0"),
    "a parent-directory file": (_set(["ranks", 1, "file"], "../x.safetensors"), "ranks[1].file"),
    "an absolute file": (_set(["ranks", 1, "file"], "/etc/passwd"), "ranks[1].file"),
    "a wrong coordinate": (_set(["ranks", 2, "coords"], {"ep": 0, "tp": 0}), "ranks[2].coords"),
    "Shard(zero)": (
        _set(["params", GATE_UP, "placements", 1], "Shard(zero)"),
        f"params[\"{GATE_UP}\"].placements[1]: unknown placement 'Shard(zero)'",
    ),
    "an unknown dtype": (_set(["params", GATE_UP, "dtype"], "F128"), "is not a known dtype"),
    "a list as a dtype": (_set(["params", GATE_UP, "dtype"], ["F32"]), "is not a known dtype"),
    "a list as the --dtype": (_set(["dtype"], ["bf16"]), 'dtype: ["bf16"] is not one of'),
    "an integer layout": (_set(["layout"], 4), "layout: expected str"),
    "a layout that does not parse": (_set(["layout"], "ep2xp2"), "does not parse"),
    "a mesh that disagrees": (_set(["mesh"], {"ep": 4}), "mesh: {'ep': 4} is not layout"),
    "too few placements": (
        _set(["params", GATE_UP, "placements"], ["Shard(0)"]),
        "1 entries for layout ep2tp2's 2 mesh dims",
    ),
    "a placement dim out of range": (
        _set(["params", GATE_UP, "placements", 0], "Shard(7)"),
        "does not fit a 3-D tensor",
    ),
    "a strided shard that does not divide": (
        _set(["params", GATE_UP, "placements", 1], "_StridedShard(1, split_factor=3)"),
        "not divisible by tp=2 x 3 blocks",
    ),
    "a negative shape": (_set(["params", GATE_UP, "shape", 0], -16), "non-negative ints"),
    "a missing field": (_delete("ranks"), "missing ranks"),
    "an unknown field": (_set(["extra"], 1), "unknown field extra"),
    "a bad sha256": (_set(["ranks", 0, "sha256"], "xyz"), "ranks[0].sha256"),
    "format_version 1": (_set(["format_version"], 1), "re-run `reshard convert`"),
    "an unknown --dtype": (_set(["dtype"], "int4"), 'dtype: "int4" is not one of'),
    "one rank too many": (
        lambda m: m["ranks"].append(dict(m["ranks"][0], rank=4)),
        "ranks: 5 entries, layout ep2tp2 has 4",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_manifest_is_refused_by_every_reader(ckpt, case):
    change, fragment = CASES[case]
    _edit(ckpt, change)
    with pytest.raises(CheckpointError) as e:
        ShardedCheckpoint(ckpt)
    assert fragment in str(e.value) and "reshard.json" in str(e.value), str(e.value)
    with pytest.raises(CheckpointError):
        load_local_tensors(ckpt, rank=0)
    if case in ("swapped rank entries", "a parent-directory file", "Shard(zero)", "a JSON list"):
        for command in ("inspect", "verify"):
            _assert_one_line(_cli(command, str(ckpt)), "reshard.json", fragment)


def _swap_files_and_fix_the_manifest(directory: Path) -> None:
    """Swap rank 0's and rank 1's files on disk and edit the hashes to match: only the files'
    own headers can tell."""
    a, b = (directory / f"rank-0000{r}-of-00004.safetensors" for r in (0, 1))
    tmp = directory / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)

    def fix(m: dict) -> None:
        for entry in m["ranks"]:
            path = directory / entry["file"]
            entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size

    _edit(directory, fix)


def test_swapped_rank_files_are_caught_by_their_own_headers(ckpt):
    _swap_files_and_fix_the_manifest(ckpt)
    with pytest.raises(CheckpointError, match="header says rank 1 of layout ep2tp2, but it is"):
        load_local_tensors(ckpt, rank=0)
    _assert_verify_fails(_cli("verify", str(ckpt)), "rank-00000-of-00004.safetensors", "swapped")
    load_local_tensors(ckpt, rank=2)  # the untouched ranks still load


def test_a_rank_file_copied_from_another_layout_is_caught(convert_tiny, ckpt):
    """Same rank number, same world size, other layout: the header's layout gives it away."""
    other = convert_tiny("tp4") / "rank-00003-of-00004.safetensors"
    shutil.copyfile(other, ckpt / other.name)
    _edit(ckpt, _set(["ranks", 3, "sha256"], sha256_file(other)))
    _edit(ckpt, _set(["ranks", 3, "bytes"], other.stat().st_size))
    with pytest.raises(CheckpointError, match="rank 3 of layout tp4, but it is listed as rank 3"):
        load_local_tensors(ckpt, rank=3)


def test_a_symlink_out_of_the_directory_is_refused(ckpt, tmp_path):
    path = ckpt / "rank-00001-of-00004.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    path.rename(outside)
    path.symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_local_tensors(ckpt, rank=1)
    _assert_verify_fails(_cli("verify", str(ckpt)), "outside the checkpoint")


def test_a_symlink_is_followed_only_within_the_directory(ckpt):
    path = ckpt / "rank-00001-of-00004.safetensors"
    inside = ckpt / "data" / path.name
    inside.parent.mkdir()
    path.rename(inside)
    path.symlink_to(inside)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_local_tensors(ckpt, rank=1)  # a sub-directory is not the checkpoint directory
    path.unlink()
    path.symlink_to(Path(path.name).with_suffix(".real"))
    inside.rename(ckpt / Path(path.name).with_suffix(".real"))
    assert sorted(load_local_tensors(ckpt, rank=1)) == sorted(ShardedCheckpoint(ckpt).params)


def test_a_rank_file_with_an_extra_tensor_is_refused(ckpt):
    from safetensors.torch import load_file, save_file

    path = ckpt / "rank-00002-of-00004.safetensors"
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        metadata = json.loads(f.read(length))["__metadata__"]
    tensors = load_file(str(path))
    tensors["model.extra.weight"] = next(iter(tensors.values())).clone()
    save_file(tensors, str(path), metadata=metadata)
    _edit(ckpt, _set(["ranks", 2, "sha256"], sha256_file(path)))
    _edit(ckpt, _set(["ranks", 2, "bytes"], path.stat().st_size))
    with pytest.raises(CheckpointError, match=r"holds unlisted tensors \['model.extra.weight'\]"):
        load_local_tensors(ckpt, rank=2)
