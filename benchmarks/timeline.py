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
    """User + system CPU seconds of a live process (None once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(entry))
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
    cpu: dict[int, float] = {}  # the last CPU figure of every process seen (gone ones keep theirs)
    samples, used = [], 0.0
    while process.poll() is None:
        time.sleep(every)
        for pid in [process.pid, *children(process.pid)]:
            seconds = cpu_seconds(pid)
            if seconds is not None:
                cpu[pid] = seconds
        now = time.monotonic() - start
        total = sum(cpu.values())
        last = samples[-1].t if samples else 0.0
        samples.append(Sample(now, (total - used) / max(now - last, 1e-9), allocated(watch)))
        used = total
    return samples, process.returncode, time.monotonic() - start


def phases(samples: list[Sample], wall: float) -> list[tuple[str, float, float, float, int]]:
    """(phase, seconds, mean cores, GB/s, bytes) for start, writing and tail."""
    first = next((i for i, s in enumerate(samples) if s.written > 0), None)
    if first is None:
        return [("start", wall, _mean_cores(samples), 0.0, 0)]
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
    return [(p, s, c, b / s / 1e9 if s > 0 else 0.0, b) for p, s, c, b in table]


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
    for name, seconds, cores, rate, _ in table:
        print(f"| {name} | {seconds:.1f} | {cores:.2f} | {rate:.2f} |")
    print(f"\nexit {status}, {wall:.1f} s")
    if args.json:
        record = {
            "command": command,
            "exit": status,
            "wall_s": wall,
            "samples": [asdict(s) for s in samples],
            "phases": [dict(zip(("phase", "s", "cores", "gb_per_s", "bytes"), p)) for p in table],
        }
        args.json.write_text(json.dumps(record, indent=1))
    sys.exit(status)


if __name__ == "__main__":
    main()
