"""Where a command's wall time goes: its CPU and the bytes it has written, sampled as it runs.

    python benchmarks/timeline.py --watch OUT -- reshard convert --src SRC --layout tp8 --out OUT

Every `--every` seconds: the cores the command and its child processes (a mapped hash runs
in one) kept busy, and the bytes under `--watch` (blocks allocated, so a file written with
direct I/O counts as it goes). Then three phases:

| phase   | from                       | to                                   |
| ------- | -------------------------- | ------------------------------------ |
| start   | the command starts         | its first byte under --watch         |
| writing | the first byte             | 99% of the bytes it writes           |
| tail    | 99% of the bytes           | the command exits (fsync, manifest)  |

A phase with a lot of wall time and few cores waits on something, usually the disk; one near
the machine's cores is bound by CPU. `--json FILE` writes the samples too. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Sample:
    t: float  # seconds since the command started
    cores: float  # CPU seconds of the command and its children per second, since the last sample
    written: int  # bytes allocated under --watch


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds of a live process and of the children it has reaped (None once it has gone).

    A child's CPU moves into its parent's cutime/cstime when the parent waits for it, so the
    command's own figure plus that of its live descendants counts every process once, including
    the CPU a child spent between its last sample and its exit.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields 14-17 of proc(5), counted from the state (field 3): utime, stime, cutime, cstime.
    return sum(int(f) for f in fields[11:15]) / TICK


def descendants(pid: int) -> list[int]:
    """The live processes below `pid`: its children, theirs, and so on."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = parents.get(todo.pop(), [])
        found += below
        todo += below
    return found


def allocated(root: Path) -> int:
    """Bytes of disk allocated to the files under `root` (0 while it does not exist)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_blocks * 512
            except OSError:  # renamed or removed between the listing and the stat
                pass
    return total


def sample(command: list[str], watch: Path, every: float) -> tuple[list[Sample], int, float]:
    """Run `command`; return its samples, exit status and wall seconds."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    samples, used = [], 0.0
    while process.poll() is None:
        time.sleep(every)
        figures = [cpu_seconds(pid) for pid in [process.pid, *descendants(process.pid)]]
        # A child reaped between the listing and its read is already in its parent's figure,
        # or will be by the next sample: the total never runs backwards.
        total = max(used, sum(f for f in figures if f is not None))
        now = time.monotonic() - start
        last = samples[-1].t if samples else 0.0
        samples.append(Sample(now, (total - used) / max(now - last, 1e-9), allocated(watch)))
        used = total
    return samples, process.returncode, time.monotonic() - start


@dataclass
class Phase:
    phase: str  # start, writing or tail
    s: float  # wall seconds
    cores: float  # mean cores busy
    gb_per_s: float  # bytes written in the phase per second, in GB
    bytes: int  # bytes under --watch at the phase's end (writing only; 0 for the others)


def phases(samples: list[Sample], wall: float) -> list[Phase]:
    """The start, writing and tail phases of a sampled command (only start if it wrote nothing)."""
    first = next((i for i, s in enumerate(samples) if s.written > 0), None)
    if first is None:
        return [Phase("start", wall, _mean_cores(samples), 0.0, 0)]
    final = samples[-1].written
    # The end of the writing: 99% of the bytes, so the small files written last (a manifest,
    # a model card) do not move it past the wait for the disk.
    last = next(i for i, s in enumerate(samples) if s.written >= 0.99 * final)
    begin = samples[first - 1].t if first else 0.0
    end = samples[last].t
    table = [
        ("start", begin, _mean_cores(samples[:first]), 0),
        ("writing", end - begin, _mean_cores(samples[first : last + 1]), samples[last].written),
        ("tail", wall - end, _mean_cores(samples[last + 1 :]), 0),
    ]
    return [Phase(p, s, c, b / s / 1e9 if s > 0 else 0.0, b) for p, s, c, b in table]


def _mean_cores(samples: list[Sample]) -> float:
    return sum(s.cores for s in samples) / len(samples) if samples else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--watch", type=Path, required=True, help="the directory written to")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="write the samples and phases here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if not Path("/proc/self/stat").exists():
        parser.error("needs Linux's /proc")
    if args.every <= 0:
        parser.error(f"--every must be more than 0 seconds, not {args.every}")

    try:
        samples, status, wall = sample(command, args.watch, args.every)
    except OSError as e:  # no such command, not executable
        parser.error(f"cannot run {command[0]}: {e.strerror or e}")
    print("| s | cores | GB written |")
    print("| --- | --- | --- |")
    for s in samples:
        print(f"| {s.t:.1f} | {s.cores:.2f} | {s.written / 1e9:.2f} |")
    print()
    print("| phase | s | mean cores | GB/s |")
    print("| --- | --- | --- | --- |")
    table = phases(samples, wall)
    for p in table:
        print(f"| {p.phase} | {p.s:.1f} | {p.cores:.2f} | {p.gb_per_s:.2f} |")
    print(f"\nexit {status}, {wall:.1f} s")
    if args.json:
        record = {
            "command": command,
            "exit": status,
            "wall_s": wall,
            "samples": [asdict(s) for s in samples],
            "phases": [asdict(p) for p in table],
        }
        args.json.write_text(json.dumps(record, indent=1))
    sys.exit(status)


if __name__ == "__main__":
    main()
