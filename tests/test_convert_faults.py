"""Faults injected into `reshard convert` for real: SIGKILL at random points, Ctrl-C, a full disk,
two runs at once, torn resume records, a failing worker, an --out that holds another checkpoint.

The invariant under every fault: an output directory is either finished (its manifest is
there and every file checks out) or it is refused by every reader as unfinished; a re-run
finishes it, keeping the rank files that were complete, and leaves no temp files.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_cli import assert_session_gone, load_benchmark, one_error_line, reshard_cmd

from reshard.checkpoint import ShardedCheckpoint
from reshard.errors import CheckpointError, OutputError
from reshard.verify import check_files

bench = load_benchmark("convert_memory")

# ~100 MiB of bf16 in 7 files: a conversion takes a few seconds here, so kills land mid-write.
SIZE = bench.Size(
    hidden=512,
    layers=6,
    experts=32,
    moe_intermediate=256,
    vocab=8192,
    heads=8,
    kv_heads=4,
    head_dim=64,
)
KILLS = 12


def _convert_cmd(src: Path, out: Path, layout: str = "ep2tp2") -> list[str]:
    return [*reshard_cmd(), "convert", "--src", str(src), "--layout", layout, "--out", str(out)]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*cmd, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"convert did not finish in {timeout}s")
    assert_session_gone(proc.pid)
    return proc.returncode, err


def _temp_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))


def _complete_ranks(out: Path) -> dict[str, tuple[int, int]]:
    """Rank files an earlier run finished (its completion record names their size): inode, mtime."""
    stamps = {}
    for record in sorted((out / ".reshard").glob("rank-*.json")):
        try:
            files = json.loads(record.read_text())["files"]
        except (ValueError, KeyError):
            continue
        for f in files:
            path = out / f["file"]
            if path.is_file() and path.stat().st_size == f["bytes"]:
                stamps[path.name] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return stamps


def _assert_finished_or_refused(out: Path) -> bool:
    """Either every reader refuses the directory, or it is a finished checkpoint whose files check out."""
    if not (out / "reshard.json").exists():
        with pytest.raises(CheckpointError, match="not a finished sharded checkpoint"):
            ShardedCheckpoint(out)
        return False
    ckpt = ShardedCheckpoint(out)
    bad = [f.what for f in check_files(ckpt) if not f.ok]
    assert bad == [], bad
    return True


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("faults") / "src"
    bench.write_checkpoint(src, SIZE)
    yield src
    shutil.rmtree(src, ignore_errors=True)


def test_sigkill_at_random_points_then_resume(synthetic, tmp_path):
    """SIGKILL at 12 random moments: never a half-written checkpoint that looks finished."""
    reference = tmp_path / "reference"
    start = time.monotonic()
    code, err = _finish(_start(_convert_cmd(synthetic, reference)))
    full_run_s = time.monotonic() - start
    assert code == 0, err

    out, rng = tmp_path / "out", random.Random(6)
    outcomes = {"killed": 0, "finished": 0}
    world = len(list(reference.glob("rank-*.safetensors")))
    for i in range(KILLS):
        kept = _complete_ranks(out) if out.exists() else {}
        workers = ["--workers", "2"] if i % 3 == 2 else []
        proc = _start([*_convert_cmd(synthetic, out), *workers])
        # A resumed run skips the ranks already complete: aim within what is left of it.
        left = 0.3 + 0.7 * (world - len(kept)) / world
        time.sleep(rng.uniform(0.0, full_run_s * left))
        # The main process only: with --workers its pool must die with it (PR_SET_PDEATHSIG).
        proc.send_signal(signal.SIGKILL)
        code, err = _finish(proc)
        outcomes["killed" if code == -signal.SIGKILL else "finished"] += 1
        assert code in (0, -signal.SIGKILL), err
        if not out.exists():
            continue
        finished = _assert_finished_or_refused(out)
        assert code != 0 or finished
        for name, stamp in kept.items():  # complete rank files are kept, never rewritten
            path = out / name
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, (i, name)
        if finished:
            shutil.rmtree(out)  # start over, so later kills land mid-conversion again
    assert outcomes["killed"] >= KILLS // 2, outcomes

    # Kill once more mid-way, then let a re-run finish: it resumes and ends verified.
    proc = _start(_convert_cmd(synthetic, out))
    time.sleep(full_run_s / 2)
    proc.send_signal(signal.SIGKILL)
    _finish(proc)
    kept = _complete_ranks(out)
    code, err = _finish(_start(_convert_cmd(synthetic, out)))
    assert code == 0, err
    for name, stamp in kept.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp, name
    assert _temp_files(out) == []
    for name in (p.name for p in reference.glob("rank-*.safetensors")):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    verify = subprocess.run(
        [*reshard_cmd(), "verify", str(out), "--against", str(synthetic), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    print(f"full run {full_run_s:.1f}s; {outcomes}; kept {len(kept)} ranks on the final resume")


def _wait_for_temp_file(out: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (out.exists() and any(out.glob(".rank-*.tmp"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no rank file was ever being written"
        time.sleep(0.01)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_exits_cleanly_without_temp_files(synthetic, tmp_path, workers):
    out = tmp_path / "out"
    proc = _start([*_convert_cmd(synthetic, out), "--workers", workers])
    _wait_for_temp_file(out, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole group
    code, err = _finish(proc, timeout=60)
    assert code == 130, err
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == ["aborted"], err
    assert _temp_files(out) == []
    assert not (out / "reshard.json").exists()


def test_sigterm_exits_cleanly_without_temp_files(synthetic, tmp_path):
    out = tmp_path / "out"
    proc = _start(_convert_cmd(synthetic, out))
    _wait_for_temp_file(out, proc)
    proc.terminate()
    code, err = _finish(proc, timeout=60)
    assert code == 128 + signal.SIGTERM, err
    assert _temp_files(out) == []
    assert not (out / "reshard.json").exists()


# A signal that lands inside safetensors' or torch's C code can come back out as another
# exception (seen in CI: a TypeError from safetensors' get_slice). It is still the stop.
_SWALLOWED_SIGNAL = """
import os, signal, click
from reshard import cli

@cli.cli.command("stop-inside-c")
def stop_inside_c():
    try:
        os.kill(os.getpid(), signal.{name})
    except BaseException:
        raise TypeError("could not determine the shape of object type 'UntypedStorage'")

cli.main()
"""


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_swallowed_by_c_code_still_exits_as_the_signal(name, code):
    script = _SWALLOWED_SIGNAL.format(name=name)
    proc = subprocess.run(
        [sys.executable, "-c", script, "stop-inside-c"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == code, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == ["aborted"], proc.stderr


def test_a_second_convert_into_the_same_out_is_refused(synthetic, tmp_path):
    out = tmp_path / "out"
    first = _start(_convert_cmd(synthetic, out))
    _wait_for_temp_file(out, first)
    first.send_signal(signal.SIGSTOP)  # holds the lock, however fast the conversion is
    second = subprocess.run(
        [*_convert_cmd(synthetic, out), "--quiet"], capture_output=True, text=True, timeout=120
    )
    error = one_error_line(second.returncode, second.stderr)
    assert error == (
        f"error: --out {out}: another reshard convert (pid {first.pid}) is writing there; "
        "wait for it to finish"
    )
    first.send_signal(signal.SIGKILL)  # the kernel drops the lock with the process
    _finish(first)
    code, err = _finish(_start(_convert_cmd(synthetic, out)))
    assert code == 0, err
    assert _assert_finished_or_refused(out)


def test_full_disk_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    """A real size-limited tmpfs, mounted in a private mount namespace (unshare)."""
    if shutil.which("unshare") is None:
        pytest.fail("this test needs util-linux's unshare (a private tmpfs)")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    convert = " ".join(_convert_cmd(tiny_dir, out))
    script = (
        f"mount -t tmpfs -o size=512k tmpfs {disk} && {convert} --quiet; echo rc=$?; ls -A {out}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "rc=1" in result.stdout, (result.stdout, result.stderr)
    error = one_error_line(1, result.stderr, "bytes for the rank files, only", "free on its disk")
    assert error.startswith(f"error: --out {out}: needs "), error
    listed = result.stdout.split("rc=1", 1)[1].split()
    assert listed == [".reshard"], listed  # no rank file, no temp file, no manifest


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The disk fills after 200 kB: pwrite raises ENOSPC, as the kernel would."""
    import reshard.cli

    room = [200_000]
    real_pwrite = os.pwrite

    def fills_up(fd, data, offset):
        if room[0] < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room[0] -= len(data)
        return real_pwrite(fd, data, offset)

    out = tmp_path / "out"
    monkeypatch.setattr(os, "pwrite", fills_up)
    args = ["reshard", "convert", "--src", "tiny:qwen3_moe", "--layout", "tp2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*args, "--quiet"])
    with pytest.raises(SystemExit) as e:
        reshard.cli.main()
    error = one_error_line(e.value.code, capsys.readouterr().err, "disk full (")
    assert error.startswith(f"error: {out}/rank-0000"), error
    assert "more bytes needed for this file" in error, error
    assert _temp_files(out) == []
    assert not (out / "reshard.json").exists()


def test_torn_records_and_stray_files_in_the_progress_dir(convert_tiny, tmp_path):
    from reshard.convert import convert, make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source

    out = Path(shutil.copytree(convert_tiny("ep2"), tmp_path / "ep2"))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("rank-*.safetensors")}
    (out / ".reshard" / "rank-00000.json").write_text('{"fingerprint": "ab')  # torn write
    (out / ".reshard" / "rank-00001.json").write_text("[1, 2]")  # valid JSON, not a record
    (out / ".reshard" / "notes.txt").write_text("a user's file")
    (out / ".reshard" / "rank-xyz.json").write_text("{}")
    (out / ".rank-00001-of-00002.safetensors.4242.tmp").write_bytes(b"killed mid-write")
    (out / "reshard.json").unlink()
    plan = make_plan(open_source("tiny:qwen3_moe"), Layout.parse("ep2"))
    convert(plan, out, progress=False)
    assert _assert_finished_or_refused(out)
    assert _temp_files(out) == []
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in out.glob("rank-*.safetensors"))


def test_a_failing_file_stops_the_others_at_once(tmp_path, monkeypatch):
    import threading

    import reshard.convert as convert_module
    from reshard.layout import Layout
    from reshard.sources import open_source

    real = convert_module._segments

    def segments(plan, tensors):
        for k, segment in enumerate(real(plan, tensors)):
            if threading.current_thread().name.startswith("reshard-file") and k == 3:
                if _is_rank(plan, tensors, 1):
                    raise OutputError("rank 1: injected failure")
            time.sleep(0.5)  # every other file would take minutes
            yield segment

    monkeypatch.setattr(convert_module, "_segments", segments)
    plan = convert_module.make_plan(open_source("tiny:qwen3_moe"), Layout.parse("ep2tp2"))
    start = time.monotonic()
    with pytest.raises(OutputError, match="rank 1: injected failure"):
        convert_module.convert(plan, tmp_path / "out", workers=4, progress=False)
    took = time.monotonic() - start
    assert took < 20
    print(f"a failing file stopped the conversion after {took:.1f}s")
    assert [t.name for t in threading.enumerate() if t.name.startswith("reshard-")] == []
    assert not (tmp_path / "out" / "reshard.json").exists()
    assert _temp_files(tmp_path / "out") == []


def _is_rank(plan, tensors, rank: int) -> bool:
    return [t.selection for t in tensors] == [t.selection for t in plan.rank_tensors(rank)]


def test_another_layout_in_a_finished_out_is_refused_unless_overwrite(convert_tiny, tmp_path):
    from click.testing import CliRunner

    from reshard.cli import cli

    out = Path(shutil.copytree(convert_tiny("tp4"), tmp_path / "tp4"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    args = ["convert", "--src", "tiny:qwen3_moe", "--layout", "tp2", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, OutputError)
    assert "holds a finished tp4 checkpoint" in str(result.exception)
    assert "--overwrite" in str(result.exception)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    result = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert ShardedCheckpoint(out).layout.name == "tp2"
    assert sorted(p.name for p in out.glob("rank-*")) == [
        "rank-00000-of-00002.safetensors",
        "rank-00001-of-00002.safetensors",
    ]
