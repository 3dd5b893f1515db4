"""One conversion written by several processes: `--ranks A-B` runs and torchrun (gloo, CPU).

Oracle: the single-process conversion of the same source and layout; every rank file and
the manifest must be byte-identical to it, and `reshard verify --against` must pass.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cli import one_error_line, reshard_cmd

SRC, LAYOUT = "tiny:qwen3_moe", "ep2tp2"  # 4 ranks


def _convert(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*reshard_cmd(), "convert", "--src", SRC, "--layout", LAYOUT, "--out", str(out), "-q"]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300)


def _rank_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("rank-*.safetensors"))}


def _assert_same_checkpoint(out: Path, reference: Path) -> None:
    assert _rank_files(out) == _rank_files(reference)
    assert json.loads((out / "reshard.json").read_text()) == json.loads(
        (reference / "reshard.json").read_text()
    )
    verify = subprocess.run(
        [*reshard_cmd(), "verify", str(out), "--against", SRC, "-q"], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr


def test_ranks_runs_one_after_another_the_last_writes_the_manifest(tmp_path, convert_tiny):
    out = tmp_path / "out"
    first = _convert(out, "--ranks", "0-1")
    assert first.returncode == 0, first.stderr
    assert "the run that finishes the last rank writes the manifest" in first.stdout
    assert not (out / "reshard.json").exists()  # not finished: ranks 2 and 3 are missing
    assert sorted(_rank_files(out)) == [
        "rank-00000-of-00004.safetensors",
        "rank-00001-of-00004.safetensors",
    ]
    second = _convert(out, "--ranks", "2-3")
    assert second.returncode == 0, second.stderr
    assert "wrote 2 of 4 rank files" in second.stdout
    _assert_same_checkpoint(out, convert_tiny(LAYOUT))


def test_ranks_runs_at_the_same_time_finish_with_one_manifest(tmp_path, convert_tiny):
    out = tmp_path / "out"
    cmds = [
        [*reshard_cmd(), "convert", "--src", SRC, "--layout", LAYOUT, "--out", str(out), "-q"]
        + ["--ranks", r]
        for r in ("0", "1-2", "3")
    ]
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _assert_same_checkpoint(out, convert_tiny(LAYOUT))


@pytest.mark.parametrize(
    "ranks, fragment",
    [("4", "the layout has ranks 0-3"), ("2-1", "the layout has ranks 0-3"), ("a-b", "write A-B")],
)
def test_bad_ranks_are_one_line(tmp_path, ranks, fragment):
    result = _convert(tmp_path / "out", "--ranks", ranks)
    one_error_line(result.returncode, result.stderr, f"--ranks {ranks}", fragment)
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(
    out: Path, *, nproc: int, nnodes: int = 1, node_rank: int = 0, port: int
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "reshard.cli",
            "convert",
            "--src",
            SRC,
            "--layout",
            LAYOUT,
            "--out",
            str(out),
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_torchrun_processes_split_the_ranks_into_a_shared_out(tmp_path, convert_tiny):
    """3 processes for 4 ranks (an uneven split); rank 0 writes the manifest after the exchange."""
    out = tmp_path / "out"
    proc = _torchrun(out, nproc=3, port=_free_port())
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "wrote 1 of 4 rank files" in stdout  # process 0 of 3: rank 0 (then 1, then 2-3)
    _assert_same_checkpoint(out, convert_tiny(LAYOUT))


def test_torchrun_on_two_nodes_with_node_local_outs(tmp_path, convert_tiny):
    """Two torchrun 'nodes' on this machine, each with its own --out: each directory holds its
    node's ranks, and both get the manifest of all four."""
    port = _free_port()
    outs = [tmp_path / "node0", tmp_path / "node1"]
    procs = [_torchrun(outs[n], nproc=2, nnodes=2, node_rank=n, port=port) for n in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
    reference = convert_tiny(LAYOUT)
    want = _rank_files(reference)
    assert sorted(_rank_files(outs[0])) == sorted(want)[:2]
    assert sorted(_rank_files(outs[1])) == sorted(want)[2:]
    assert {**_rank_files(outs[0]), **_rank_files(outs[1])} == want
    manifest = json.loads((reference / "reshard.json").read_text())
    for out in outs:
        assert json.loads((out / "reshard.json").read_text()) == manifest


def _gather_in_process(rank: int, world: int, port: int, errors: dict, results) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    from reshard.cluster import Exchange
    from reshard.errors import ReshardError
    from reshard.manifest import FileEntry, RankEntry

    exchange = Exchange()
    try:
        entry = RankEntry(
            rank=rank,
            coords={"tp": rank},
            files=[FileEntry(file=f"f{rank}", bytes=rank, sha256="0" * 64)],
        )
        try:
            got = exchange.gather([entry], errors.get(rank))
            results.put((rank, [e.rank for e in got]))
        except ReshardError as e:
            results.put((rank, str(e)))
    finally:
        exchange.close()


@pytest.mark.parametrize("errors", [{}, {1: "disk full"}])
def test_the_exchange_gives_every_entry_or_every_process_the_failure(errors):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_gather_in_process, args=(r, 3, port, errors, results)) for r in range(3)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    if errors:
        assert got == {r: "torchrun process 1 failed: disk full" for r in range(3)}
    else:
        assert got == {r: [0, 1, 2] for r in range(3)}
