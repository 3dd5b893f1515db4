"""Start the ranks through PyTorch's own launcher, `torch.distributed.run` (torchrun).

One node: `--standalone` with nproc = the layout's world size. Several nodes:
torchrun's own rendezvous flags are passed through, nproc = world / nnodes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.errors import ReshardError


@dataclass(kw_only=True)
class Nodes:
    """Where the ranks run; the defaults are one node, all ranks local."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def launch(
    mode: str,
    ckpt: str | Path,
    world_size: int,
    worker_args: list[str],
    *,
    device: str,
    nodes: Nodes,
) -> None:
    """Run `reshard.runtime.worker MODE` on `world_size` ranks; raise ReshardError if a rank fails.

    stdout of the ranks passes straight through (rank 0 streams text). A rank's
    own error is printed as one line; torchrun's noise is shown only with
    RESHARD_DEBUG=1.
    """
    if world_size % nodes.nnodes:
        raise ReshardError(
            f"--nnodes {nodes.nnodes} does not divide the layout's {world_size} ranks"
        )
    worker_argv = [mode, "--ckpt", str(ckpt), "--device", device, *worker_args]
    if world_size == 1:
        _run_in_process(worker_argv)
        return
    nproc = world_size // nodes.nnodes
    cmd = [*_torchrun(nproc, nodes), "-m", "reshard.runtime.worker", *worker_argv]
    debug = bool(os.environ.get("RESHARD_DEBUG"))
    with tempfile.TemporaryDirectory(prefix="reshard-errors-") as errors:
        env = dict(os.environ, RESHARD_ERROR_DIR=errors, PYTHONUNBUFFERED="1")
        # Many CPU ranks on few cores: one thread each (torchrun would say so, loudly).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        proc = _run_torchrun(cmd, env, capture=not debug)
        if proc.returncode == 0:
            # Pass on the ranks' own status lines; torchrun's chatter stays hidden.
            for line in (proc.stderr or "").splitlines():
                if line.startswith("reshard: "):
                    print(line, file=sys.stderr)
            return
        died = _rank_that_died(proc.stderr or "")
        if died:
            raise ReshardError(f"{died} during {mode}; the other ranks were stopped")
        messages = sorted(Path(errors).glob("rank-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
        if messages:
            raise ReshardError(messages[0].read_text().strip())
        lines = [line.strip() for line in (proc.stderr or "").splitlines()]
        lines = [line for line in lines if line and not set(line) <= set("=*-")]  # no banners
        errors = [line for line in lines if re.search(r"\w+(Error|Exception)\b", line)]
        hint = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        raise ReshardError(f"the ranks failed ({hint}); set RESHARD_DEBUG=1 to see their output")


def _torchrun(nproc: int, nodes: Nodes) -> list[str]:
    """torchrun, starting `nproc` ranks on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nodes.nnodes == 1:
        return cmd + ["--standalone"]
    if not nodes.rdzv_endpoint:
        raise ReshardError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
    return cmd + [
        f"--nnodes={nodes.nnodes}",
        f"--node-rank={nodes.node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={nodes.rdzv_endpoint}",
    ]


def _run_in_process(worker_argv: list[str]) -> None:
    """One rank needs no rendezvous: run the worker in this process, with the variables
    torchrun would set. That spares torchrun's process and the rank's, and their two
    `import torch`: seconds of the command's start."""
    from reshard.runtime import worker

    with tempfile.TemporaryDirectory(prefix="reshard-errors-") as errors:
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        with _environ(env | {"RESHARD_ERROR_DIR": errors}):
            failed = worker.main(worker_argv) != 0
        if failed:
            raise ReshardError(Path(errors, "rank-0.txt").read_text().strip())


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_torchrun(cmd: list[str], env: dict, *, capture: bool) -> subprocess.CompletedProcess:
    """Run torchrun; if we are interrupted (Ctrl-C, SIGTERM), stop it the way it stops its ranks.

    torchrun forwards SIGTERM to every rank and waits for them; a SIGKILL (what
    subprocess.run sends) would orphan the ranks instead.
    """
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE if capture else None, text=True)
    try:
        _, err = proc.communicate()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, None, err)


# torchrun's failure summary names the rank it saw fail first, with its exit code
# (negative: the signal that killed it).
_ROOT_CAUSE = re.compile(r"Root Cause.*?\brank\s*:\s*(\d+).*?\bexitcode\s*:\s*(-?\d+)", re.S)


def _rank_that_died(stderr: str) -> str | None:
    """`rank N died (SIGKILL)` when a rank was killed by a signal rather than failing itself."""
    match = _ROOT_CAUSE.search(stderr)
    if not match or int(match[2]) >= 0:
        return None
    try:
        name = signal.Signals(-int(match[2])).name
    except ValueError:
        name = f"signal {-int(match[2])}"
    return f"rank {match[1]} died ({name})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
