"""Bad input to `reshard run` / `reshard validate`, through the real command line.

Each mistake must end the command (and every rank it started) with exit code 1
and one clear `error:` line on stderr that names the problem; never a
traceback, never a hang. Every subprocess runs in its own session under a
timeout, and the tests check that no process of that session is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_cli import assert_session_gone, one_error_line, reshard_cmd
from helpers_files import flip_a_data_byte

LAUNCH_TIMEOUT_S = 180  # a launch that fails must still end well before this


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _run(cmd: list[str], *, timeout: float, env: dict | None = None) -> Finished:
    """Run `cmd` in a new session; fail the test if it, or anything it started, outlives `timeout`."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ... did not finish in {timeout}s:\n{err[-3000:]}")
    assert_session_gone(proc.pid)
    return Finished(proc.returncode, out, err)


def reshard(*args: str, timeout: float = 60) -> Finished:
    return _run([*reshard_cmd(), *args], timeout=timeout)


def assert_one_clear_error(result: Finished, *fragments: str) -> str:
    """Exit 1; stderr is exactly `error: ...` plus the debug hint; the error names `fragments`."""
    return one_error_line(result.returncode, result.stderr, *fragments)


@pytest.fixture
def tp2_copy(convert_tiny, tmp_path) -> Path:
    """A private copy of the tp2 checkpoint that a test may damage."""
    return Path(shutil.copytree(convert_tiny("tp2"), tmp_path / "tp2"))


RUN = ("run", "--prompt", "Why is the sky blue?", "--max-new-tokens", "2", "--device", "cpu")


def _command(kind: str, directory: Path) -> list[str]:
    if kind == "run":
        return [RUN[0], str(directory), *RUN[1:]]
    return ["validate", str(directory), "--against", "tiny:qwen3_moe", "--device", "cpu"]


# --- not a finished checkpoint: refused before any rank starts ----------------------------------


@pytest.mark.parametrize("kind", ["run", "validate"])
def test_directory_without_manifest(kind, tp2_copy):
    (tp2_copy / "reshard.json").unlink()  # an interrupted convert
    error = assert_one_clear_error(
        reshard(*_command(kind, tp2_copy)), "not a finished sharded checkpoint", "reshard.json"
    )
    assert str(tp2_copy) in error


def test_hf_source_directory_is_not_a_sharded_checkpoint(tiny_dir):
    assert_one_clear_error(
        reshard(*_command("run", tiny_dir)), str(tiny_dir), "not a finished sharded checkpoint"
    )


def test_no_such_directory(tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_clear_error(
        reshard(*_command("validate", missing)), str(missing), "no such directory"
    )


@pytest.mark.parametrize("kind", ["run", "validate"])
def test_missing_rank_file(kind, tp2_copy):
    path = tp2_copy / "rank-00001-of-00002.safetensors"
    path.unlink()
    assert_one_clear_error(reshard(*_command(kind, tp2_copy)), str(path), "missing")


def test_layout_option_of_another_layout_reshards_into_the_cache(convert_tiny, reshard_cache):
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.cli import _checkpoint
    from reshard.convert import make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source
    from reshard.verify import check_against

    directory = convert_tiny("tp2")
    assert _checkpoint(str(directory), "tp2", quiet=True).directory == directory  # as is
    resharded = _checkpoint(str(directory), "ep2", quiet=True).directory
    assert resharded.is_relative_to(reshard_cache)
    ckpt = ShardedCheckpoint(resharded)
    assert ckpt.layout.name == "ep2"
    plan = make_plan(open_source("tiny:qwen3_moe"), Layout.parse("ep2"))
    findings = list(check_against(ckpt, plan))
    assert findings and all(f.ok for f in findings), [f for f in findings if not f.ok]
    assert _checkpoint(str(directory), "ep2", quiet=True).directory == resharded  # cached


@pytest.mark.parametrize(
    "nodes, fragments",
    [
        (["--nnodes", "3"], ["--nnodes 3 does not divide the layout's 2 ranks"]),
        (["--nnodes", "2"], ["--nnodes > 1 needs --rdzv-endpoint"]),
    ],
)
def test_bad_multi_node_options(convert_tiny, nodes, fragments):
    result = reshard(*_command("run", convert_tiny("tp2")), *nodes)
    assert_one_clear_error(result, *fragments)


# --- refused by the ranks: the launcher reports one rank's message ------------------------------


@pytest.mark.parametrize("layout", ["tp2", "tp1"])  # tp1: the one rank runs in the command
def test_rank_file_with_a_wrong_hash(convert_tiny, tmp_path, layout):
    directory = Path(shutil.copytree(convert_tiny(layout), tmp_path / layout))
    world = int(layout[2:])
    path = directory / f"rank-{world - 1:05d}-of-{world:05d}.safetensors"
    size = path.stat().st_size
    flip_a_data_byte(path)
    assert path.stat().st_size == size  # passes the size check; only the hash can tell
    result = reshard(*_command("run", directory), timeout=LAUNCH_TIMEOUT_S)
    assert_one_clear_error(result, str(path), "sha256")
    assert result.stdout == ""  # no rank generated anything


def test_unreadable_tokenizer_json(tp2_copy):
    """A rank that hits a low-level error: the user still gets one line naming the file."""
    (tp2_copy / "tokenizer.json").write_text("<html>not a tokenizer</html>")
    result = reshard(*_command("run", tp2_copy), timeout=LAUNCH_TIMEOUT_S)
    assert_one_clear_error(result, "tokenizer.json")


def test_prompt_longer_than_the_context(convert_tiny):
    directory = convert_tiny("tp2")
    prompt = "Why is the sky blue? " * 100  # 700 tokens; tiny's context is 512
    args = ["run", str(directory), "--prompt", prompt, "--max-new-tokens", "4", "--device", "cpu"]
    result = reshard(*args, timeout=LAUNCH_TIMEOUT_S)
    error = assert_one_clear_error(result, "prompt is 700 tokens", "context of 512 tokens")
    assert "--max-new-tokens 4" in error


def test_worker_started_with_the_wrong_world_size(convert_tiny, tmp_path):
    directory = convert_tiny("ep2tp2")  # 4 ranks
    errors = tmp_path / "errors"
    errors.mkdir()
    env = dict(os.environ, RESHARD_ERROR_DIR=str(errors), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    worker = ["-m", "reshard.runtime.worker", "run", "--ckpt", str(directory), "--prompt", "hi"]
    cmd = [*torchrun, "--nproc-per-node", "3", *worker, "--device", "cpu", "--timeout", "60"]
    result = _run(cmd, timeout=LAUNCH_TIMEOUT_S, env=env)
    assert result.returncode != 0
    messages = {p.name: p.read_text() for p in errors.glob("rank-*.txt")}
    assert messages, f"no rank wrote an error file:\n{result.stderr[-3000:]}"
    assert set(messages) <= {"rank-0.txt", "rank-1.txt", "rank-2.txt"}
    for name, text in messages.items():
        assert "layout ep2tp2 needs 4 ranks, started with 3" in text, (name, text)
        assert "\n" not in text.strip(), (name, text)


def test_empty_prompt_is_refused_before_any_rank_starts(convert_tiny):
    directory = convert_tiny("tp2")
    for prompt in ("", "   \n"):
        args = ["run", str(directory), "--prompt", prompt, "--device", "cpu"]
        assert_one_clear_error(reshard(*args), "prompt is empty")


def _rank_pids(directory: Path, rank: int) -> list[int]:
    """Worker processes running `directory` whose environment says RANK=`rank`.

    (torchrun starts its ranks in sessions of their own, so the session does not find them.)
    """
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"reshard.runtime.worker" in cmdline and str(directory).encode() in cmdline:
            if f"RANK={rank}".encode() in environ:
                pids.append(int(proc.name))
    return pids


def test_a_rank_killed_mid_run_stops_the_others_and_is_named(convert_tiny):
    directory = convert_tiny("tp2")
    cmd = [*reshard_cmd(), "run", str(directory), "--prompt", "Why is the sky blue?"]
    cmd += ["--max-new-tokens", "480", "--device", "cpu", "--timeout", "30"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        first = proc.stdout.read(1)  # rank 0 streams: generation has started
        assert first, proc.stderr.read().decode()[-3000:]
        victims = _rank_pids(directory, 1)
        assert len(victims) == 1, victims
        killed_at = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_session_gone(proc.pid)
    assert _rank_pids(directory, 0) == [], "rank 0 outlived the run"
    result = Finished(proc.returncode, "", err.decode())
    assert_one_clear_error(result, "rank 1 died (SIGKILL) during run", "other ranks were stopped")
    assert took < 30, f"the other rank took {took:.0f}s to stop (collective timeout 30s)"
    print(f"rank 1 killed; the command ended {took:.1f}s later")


def test_top_p_without_a_temperature_is_refused(convert_tiny):
    result = reshard("run", str(convert_tiny("tp2")), "--prompt", "Hi", "--top-p", "0.9")
    error = one_error_line(result.returncode, result.stderr, "--top-p 0.9", "--temperature > 0")
    assert "greedy" in error
