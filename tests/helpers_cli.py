"""Running the real `reshard` command in tests, and the shape its errors must have."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

HINT = "(set RESHARD_DEBUG=1 for the traceback)"


def reshard_cmd() -> list[str]:
    """The installed console script (so its entry point is tested too), else `python -m`."""
    script = Path(sys.executable).with_name("reshard")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "reshard.cli"]


def run_reshard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*reshard_cmd(), *args], capture_output=True, text=True, timeout=timeout)


def run_reshard_in_process(*args: str) -> subprocess.CompletedProcess:
    """`reshard ARGS` through the command's own entry point (`reshard.cli.main`: its error
    lines and exit codes) in this process: no new interpreter and `import torch` per call, for
    the many error cases whose one line the installed command is tested for elsewhere."""
    from reshard import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    argv, code = sys.argv, 0
    sys.argv = ["reshard", *args]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(
        ["reshard", *args], code, stdout.getvalue(), stderr.getvalue()
    )


def last_json(result: subprocess.CompletedProcess) -> dict:
    """The report a `--json` command printed last; the command must have succeeded."""
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads([x for x in result.stdout.splitlines() if x.startswith("{")][-1])


def one_error_line(returncode: int, stderr: str, *fragments: str) -> str:
    """Exit 1; stderr is exactly `error: ...` plus the debug hint; the error names `fragments`."""
    assert returncode == 1, (returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[1] == HINT, lines
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_session_gone(pgid: int, grace_s: float = 10.0) -> None:
    """Every process of a command's session (e.g. a pool worker, torchrun) has exited."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            pytest.fail(f"processes of session {pgid} were still running {grace_s}s after it ended")
        time.sleep(0.05)


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ as a module (its helpers write synthetic checkpoints)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
