"""`reshard.json` is checked, never trusted: every reader refuses a damaged or edited manifest in
one line naming the field, and a rank file must say itself which rank and layout it holds.

Each case starts from a real converted checkpoint (conftest's `convert_tiny`) and damages a
private copy; the readers are the API (`ShardedCheckpoint`, `load_local_tensors`) and the CLI.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers_cli import one_error_line, reshard_cmd

from reshard.checkpoint import ShardedCheckpoint
from reshard.errors import CheckpointError
from reshard.hash_cache import sha256_file
from reshard.runtime import load_local_tensors

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture
def ckpt(convert_tiny, tmp_path) -> Path:
    return Path(shutil.copytree(convert_tiny("ep2tp2"), tmp_path / "ep2tp2"))


def _edit(directory: Path, change: Callable[[dict], object]) -> None:
    """Apply `change` to the manifest: it edits the dict in place, or returns a replacement
    (any JSON value, or raw str/bytes written as they are)."""
    path = directory / "reshard.json"
    data = json.loads(path.read_text())
    replaced = change(data)
    if isinstance(replaced, str | bytes):
        path.write_bytes(replaced.encode() if isinstance(replaced, str) else replaced)
    else:
        path.write_text(json.dumps(data if replaced is None else replaced))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*reshard_cmd(), *args], capture_output=True, text=True, timeout=120)


def _assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    one_error_line(result.returncode, result.stderr, *fragments)


def _main(capsys, *args: str) -> tuple[int, str]:
    """`reshard ARGS` through the real entry point, in this process (a subprocess per case would
    cost seconds of imports): (exit code, stderr)."""
    from reshard.cli import main

    argv, sigterm = sys.argv, signal.getsignal(signal.SIGTERM)  # main() installs a handler
    sys.argv = ["reshard", *args]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)
    return e.value.code, capsys.readouterr().err


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


def _swap_and_renumber(*fields: str) -> Callable[[dict], None]:
    """Swap ranks[0] and ranks[1], then give each back rank 0's and rank 1's `fields`: only the
    fields left swapped (and the hashes) still tell."""

    def change(m: dict) -> None:
        a, b = m["ranks"][0], m["ranks"][1]
        for key in fields:
            a[key], b[key] = b[key], a[key]
        _swap_rank_entries(m)

    return change


def _rename_param(new: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        m["params"][new] = m["params"].pop(GATE_UP)

    return change


CASES = {
    "a JSON list": (lambda m: [m], "the manifest: expected dict"),
    "swapped rank entries": (_swap_rank_entries, "ranks[0].rank: is 1, must be 0"),
    "swapped rank entries, renumbered": (
        _swap_and_renumber("rank"),
        """ranks[0].coords: {"ep": 0, "tp": 1} is not rank 0's coordinates {"ep": 0, "tp": 0}""",
    ),
    "swapped rank entries, renumbered with their coords": (
        _swap_and_renumber("rank", "coords"),
        "ranks[0].file: 'rank-00001-of-00004.safetensors' must be 'rank-00000-of-00004",
    ),
    "a parent-directory file": (
        _set(["ranks", 1, "file"], "../x.safetensors"),
        "ranks[1].file: '../x.safetensors' must be 'rank-00001-of-00004.safetensors'",
    ),
    "an absolute file": (_set(["ranks", 1, "file"], "/etc/passwd"), "ranks[1].file: '/etc/passwd'"),
    "a wrong coordinate": (_set(["ranks", 2, "coords"], {"ep": 0, "tp": 0}), "ranks[2].coords"),
    "a boolean coordinate": (_set(["ranks", 1, "coords", "tp"], True), "ranks[1].coords"),
    "Shard(zero)": (
        _set(["params", GATE_UP, "placements", 1], "Shard(zero)"),
        f"params[\"{GATE_UP}\"].placements[1]: 'Shard(zero)' is not a placement",
    ),
    "a placement in another spelling": (
        _set(["params", GATE_UP, "placements", 0], "Shard(\u0660)"),  # an Arabic-Indic zero
        "placements[0]: 'Shard(\u0660)' is not a placement",
    ),
    "an unknown dtype": (
        _set(["params", GATE_UP, "dtype"], "F128"),
        f"params[\"{GATE_UP}\"].dtype: 'F128' is not a known dtype",
    ),
    "a list as a dtype": (_set(["params", GATE_UP, "dtype"], ["F32"]), "is not a known dtype"),
    "a list as the --dtype": (_set(["dtype"], ["bf16"]), 'dtype: ["bf16"] is not one of'),
    "an unknown --dtype": (_set(["dtype"], "int4"), "dtype: 'int4' is not one of"),
    "a --dtype the params contradict": (
        _set(["dtype"], "bf16"),
        "dtype: F32, but the manifest's dtype says every float is BF16",
    ),
    "an integer layout": (_set(["layout"], 4), "layout: expected str, got 4"),
    "a layout that does not parse": (_set(["layout"], "ep2xp2"), "layout: 'ep2xp2' does not parse"),
    "a 5000-digit layout": (_set(["layout"], "tp" + "9" * 5000), "layout: 'tp999"),
    "a layout not in canonical form": (
        _set(["layout"], "dp1EP2tp2"),
        "layout: 'dp1EP2tp2' is not in canonical form (reshard writes 'ep2tp2')",
    ),
    "a mesh that disagrees": (
        _set(["mesh"], {"ep": 4}),
        """mesh: {"ep": 4} is not layout ep2tp2's mesh {"ep": 2, "tp": 2}""",
    ),
    "a float in the mesh": (_set(["mesh", "ep"], 2.0), 'mesh: {"ep": 2.0, "tp": 2} is not'),
    "too few placements": (
        _set(["params", GATE_UP, "placements"], ["Shard(0)"]),
        "placements: 1 entries for layout ep2tp2's 2 mesh dims",
    ),
    "a placement dim out of range": (
        _set(["params", GATE_UP, "placements", 0], "Shard(7)"),
        "placements[0]: Shard(7) does not fit a 3-D tensor",
    ),
    "a strided shard that does not divide": (
        _set(["params", GATE_UP, "placements", 1], "_StridedShard(1, split_factor=3)"),
        "not divisible by tp=2 x 3 blocks",
    ),
    "a strided shard of split_factor 0": (
        _set(["params", GATE_UP, "placements", 1], "_StridedShard(1, split_factor=0)"),
        "placements[1]: _StridedShard(1, split_factor=0): split_factor must be at least 1",
    ),
    "a negative shape": (_set(["params", GATE_UP, "shape", 0], -16), "is not a list of ints in"),
    "a shape no JSON reader holds exactly": (
        _set(["params", GATE_UP, "shape", 0], 10**30),
        "shape: [1000000000000000000000000000000, 64, 64] is not a list of ints in [0, 2**53)",
    ),
    "a zero head_repeat": (_set(["params", GATE_UP, "head_repeat"], 0), "head_repeat: 0 is not"),
    "a parameter name with a newline": (
        _rename_param("model.a\nb"),
        'params["model.a\\nb"]: a parameter name must be non-empty and printable',
    ),
    "a missing field": (_delete("ranks"), "the manifest: missing ranks"),
    "a missing --dtype": (_delete("dtype"), "the manifest: missing dtype"),
    "an unknown field": (_set(["extra"], 1), "the manifest: unknown field 'extra'"),
    "a bad sha256": (_set(["ranks", 0, "sha256"], "xyz"), "ranks[0].sha256: 'xyz' is not 64"),
    "an uppercase sha256": (
        lambda m: m["ranks"][0].update(sha256=m["ranks"][0]["sha256"].upper()),
        "ranks[0].sha256",
    ),
    "format_version 1": (
        _set(["format_version"], 1),
        "format_version: 1 is an old or unknown format (this reshard reads 2 and 3); "
        "re-run `reshard convert` to rewrite this checkpoint",
    ),
    "format_version 2.0": (_set(["format_version"], 2.0), "format_version: 2.0 is an old"),
    "a newer format_version": (_set(["format_version"], 4), "upgrade reshard"),
    "one rank too many": (
        lambda m: m["ranks"].append(dict(m["ranks"][0], rank=4)),
        "ranks: 5 entries, layout ep2tp2 has 4",
    ),
    "a duplicate key": (
        lambda m: json.dumps(m)[:-1] + ', "ranks": []}',
        "the manifest: names 'ranks' twice in one object",
    ),
    "nested too deeply": (lambda m: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "not UTF-8": (lambda m: b'{"layout": "\xff"}', "not valid JSON ('utf-8' codec"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_manifest_is_refused_by_every_reader(ckpt, case, capsys):
    change, fragment = CASES[case]
    _edit(ckpt, change)
    where = re.escape(f"{ckpt / 'reshard.json'}: ") + ".*" + re.escape(fragment)
    with pytest.raises(CheckpointError, match=where):
        ShardedCheckpoint(ckpt)
    with pytest.raises(CheckpointError, match=where):
        load_local_tensors(ckpt, rank=0)
    for command in ("inspect", "verify"):
        code, stderr = _main(capsys, command, str(ckpt))
        one_error_line(code, stderr, "reshard.json", fragment)


@pytest.mark.parametrize("case", ["swapped rank entries", "a parent-directory file", "Shard(zero)"])
def test_the_installed_command_refuses_a_damaged_manifest_in_one_line(ckpt, case):
    change, fragment = CASES[case]
    _edit(ckpt, change)
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
    def add(tensors: dict) -> None:
        tensors["model.extra.weight"] = next(iter(tensors.values())).clone()

    _rewrite_rank_file(ckpt, 2, add)
    with pytest.raises(CheckpointError, match=r"holds unlisted tensors \['model.extra.weight'\]"):
        load_local_tensors(ckpt, rank=2)


def _rewrite_rank_file(directory: Path, rank: int, edit: Callable[[dict], None]) -> Path:
    """Re-save rank `rank`'s file with its own metadata after `edit(tensors)`, and put its new
    hash and size in the manifest: only the header check can tell."""
    from safetensors.torch import load_file, save_file

    path = directory / f"rank-{rank:05d}-of-00004.safetensors"
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        metadata = json.loads(f.read(length))["__metadata__"]
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)
    _edit(directory, _set(["ranks", rank, "sha256"], sha256_file(path)))
    _edit(directory, _set(["ranks", rank, "bytes"], path.stat().st_size))
    return path


def test_a_rank_file_with_another_dtype_is_refused(ckpt):
    def to_double(tensors: dict) -> None:
        tensors[GATE_UP] = tensors[GATE_UP].double()

    _rewrite_rank_file(ckpt, 2, to_double)
    with pytest.raises(CheckpointError, match=f"{GATE_UP} is torch.float64 .*, the manifest says"):
        load_local_tensors(ckpt, rank=2)


def test_the_header_is_checked_even_without_the_hash(ckpt):
    _swap_files_and_fix_the_manifest(ckpt)
    with pytest.raises(CheckpointError, match="header says rank 0 of layout ep2tp2"):
        ShardedCheckpoint(ckpt).load_rank(1, verify=False)


def test_a_symlink_loop_or_a_directory_is_one_line(ckpt):
    path = ckpt / "rank-00001-of-00004.safetensors"
    path.unlink()
    path.symlink_to(path.name)
    with pytest.raises(CheckpointError, match="a symlink that leads nowhere"):
        load_local_tensors(ckpt, rank=1)
    path.unlink()
    path.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a regular file")):
        load_local_tensors(ckpt, rank=1)


def test_safetensors_errors_name_the_rank_file(ckpt):
    """open_rank does not check the file (load_rank does first); what safetensors raises on a
    damaged one still comes out as one CheckpointError naming it."""
    path = ckpt / "rank-00003-of-00004.safetensors"
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: cannot read")):
        with ShardedCheckpoint(ckpt).open_rank(3):
            pass


def test_verify_reports_only_the_tools_own_errors_as_findings(ckpt, monkeypatch):
    from reshard.errors import LayoutError
    from reshard.verify import check_files

    checkpoint = ShardedCheckpoint(ckpt)

    def refuse(rank: int, **kwargs) -> None:
        if rank == 1:
            raise LayoutError("rank 1 does not fit")

    monkeypatch.setattr(checkpoint, "check_rank_file", refuse)
    assert [(f.ok, f.what) for f in check_files(checkpoint)][:2] == [
        (True, "rank-00000-of-00004.safetensors: sha256 ok"),
        (False, "rank 1 does not fit"),
    ]

    def crash(rank: int, **kwargs) -> None:
        raise KeyError("a bug, not a finding")

    monkeypatch.setattr(checkpoint, "check_rank_file", crash)
    with pytest.raises(KeyError):
        list(check_files(checkpoint))
