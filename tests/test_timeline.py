"""benchmarks/timeline.py sees a command's start, its writing and its tail, and its children's CPU.

The commands here are small Python programs whose phases are known: they sleep, write
and spin for set times. Oracles: the sizes written (os.stat) and the wall clock.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers_cli import load_benchmark

if not sys.platform.startswith("linux"):
    pytest.skip("timeline.py reads Linux's /proc", allow_module_level=True)

timeline = load_benchmark("timeline")

MiB = 1 << 20


def program(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def test_phases_of_a_command_that_waits_writes_and_waits(tmp_path):
    watch = tmp_path / "out"
    command = program(f"""
        import os, time
        time.sleep(1.0)
        os.makedirs({str(watch)!r})
        with open({str(watch / "a")!r}, "wb") as f:
            for _ in range(4):
                f.write(os.urandom({2 * MiB}))
                f.flush()
                os.fsync(f.fileno())
                time.sleep(0.3)
        time.sleep(1.0)
        with open({str(watch / "manifest")!r}, "w") as f:  # small, last: still the tail
            f.write("{{}}")
        """)
    samples, status, wall = timeline.sample(command, watch, 0.1)
    assert status == 0
    assert samples[-1].written >= 8 * MiB
    start, writing, tail = timeline.phases(samples, wall)
    assert [start.phase, writing.phase, tail.phase] == ["start", "writing", "tail"]
    assert 0.8 <= start.s <= 2.5, start  # the first sleep (and the interpreter's start)
    assert 0.6 <= writing.s <= 2.5, writing  # four writes 0.3 s apart
    assert 0.7 <= tail.s <= 2.5, tail  # the last sleep
    assert writing.bytes >= 8 * MiB and writing.gb_per_s > 0
    assert start.s + writing.s + tail.s == pytest.approx(wall)


def test_a_childs_cpu_is_counted(tmp_path):
    """A busy child process (as the mapped hash is) shows as about one busy core."""
    child = "import time; end = time.time() + 1.5\nwhile time.time() < end: pass"
    command = program(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", {child!r}], check=True)
        """)
    samples, status, _ = timeline.sample(command, tmp_path / "none", 0.2)
    assert status == 0
    assert max(s.cores for s in samples) > 0.6, [round(s.cores, 2) for s in samples]


def test_short_children_between_samples_are_counted_in_full(tmp_path):
    """Children that start and exit between two samples still add their CPU (the parent's
    cutime), so the samples add up to the CPU the command used, not to what was seen alive."""
    child = "import time; end = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    command = program(f"""
        import subprocess, sys, time
        time.sleep(0.2)
        for _ in range(4):
            subprocess.run([sys.executable, "-c", {child!r}], check=True)
        time.sleep(1.2)
        """)
    samples, status, _ = timeline.sample(command, tmp_path / "none", 1.0)
    assert status == 0
    times = [0.0] + [s.t for s in samples]
    used = sum(s.cores * (t - t0) for s, t0, t in zip(samples, times, times[1:]))
    assert used >= 1.15, [(round(s.t, 1), round(s.cores, 2)) for s in samples]  # 4 x 0.3 s


def test_an_idle_command_uses_no_core(tmp_path):
    samples, status, _ = timeline.sample(
        program("import time; time.sleep(1.2)"), tmp_path / "none", 0.2
    )
    assert status == 0
    assert max(s.cores for s in samples[1:]) < 0.3, [round(s.cores, 2) for s in samples]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give the command after --"),
        (["--every", "0", "--", "true"], "--every must be more than 0 seconds"),
        (["--", "/nonexistent/command"], "cannot run /nonexistent/command"),
    ],
)
def test_bad_arguments_are_one_usage_error(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, timeline.__file__, "--watch", str(tmp_path), *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
