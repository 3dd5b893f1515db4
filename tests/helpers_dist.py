"""Run a Python callable on N real gloo ranks and collect what each rank returns.

    from helpers_dist import run_on_ranks

    def _body(rank, world, x):          # module level: it is pickled by reference
        t = torch.full((1,), float(rank))
        dist.all_reduce(t)
        return t.item() + x

    assert run_on_ranks(_body, 4, 10.0) == [16.0] * 4

Every rank is its own process, started from a forkserver that imported torch
once (so 16 ranks cost 16 forks, not 16 torch imports), with one thread for
torch and a default process group initialised over TCP on a free local port.
The callable's return value must pickle. A rank that raises, dies or hangs
fails the whole call with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue as queue_lib
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

# torch._dynamo: DTensor imports it on first use, 1.3 s per rank otherwise.
_PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.distributed.tensor",
    "safetensors.torch",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    # The forkserver was started with an older environment; take the caller's.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle: the queue's own pickler would pass tensors by shared memory,
        # which dies with this process before the caller reads it.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` gloo ranks; return the results by rank.

    Args:
        fn: a module-level function (pickled by reference); the default process group
            is initialised when it runs, so `init_device_mesh("cpu", ...)` works inside.
        world_size: number of ranks (processes).
        args: extra picklable arguments, the same on every rank.
        timeout_s: wall-clock limit for the whole run; collectives time out after it too.
    Returns:
        `[fn(0, ...), fn(1, ...), ...]`.
    Raises:
        RuntimeError with the failing rank's traceback; TimeoutError naming the ranks
        that never reported.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, backend, timeout_s, env, fn, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            failed = [r for r, (ok, _) in got.items() if not ok]
            if failed:
                # Peers of a failed rank may wait forever in a collective: give them a moment only.
                deadline = min(deadline, time.monotonic() + 5)
            try:
                rank, ok, value = results.get(timeout=0.2)
                got[rank] = (ok, value)
                continue
            except queue_lib.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
            if dead:
                # A process that died without reporting (segfault, os._exit) cannot report later.
                time.sleep(0.5)
                while not results.empty():
                    rank, ok, value = results.get()
                    got[rank] = (ok, value)
                for r in dead:
                    got.setdefault(r, (False, f"rank {r} died with exit code {procs[r].exitcode}"))
            if time.monotonic() > deadline:
                break
    finally:
        grace = time.monotonic() + 5
        for p in procs:
            p.join(timeout=max(0.0, grace - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    failures = sorted((r, v) for r, (ok, v) in got.items() if not ok)
    if failures:
        rank, tb = failures[0]
        others = [r for r, _ in failures[1:]]
        raise RuntimeError(
            f"rank {rank} of {world_size} failed"
            + (f" (also ranks {others})" if others else "")
            + f":\n{tb}"
        )
    missing = sorted(set(range(world_size)) - set(got))
    if missing:
        raise TimeoutError(f"ranks {missing} of {world_size} did not finish in {timeout_s:.0f}s")
    return [pickle.loads(got[r][1]) for r in range(world_size)]


def quantized_rank_logits(rank: int, world: int, directory: str, ids) -> dict:
    """A rank's logits for `ids`, and what its experts hold (the quantized tensor behind the
    parametrization) and read (the dequantized value): for run_on_ranks."""
    import torch

    from reshard.checkpoint import ShardedCheckpoint
    from reshard.runtime.load import load_parallel_model

    pm = load_parallel_model(ShardedCheckpoint(directory), rank, device=torch.device("cpu"))
    experts = next(m for n, m in pm.model.named_modules() if n.endswith("mlp.experts"))
    with torch.no_grad():
        logits = pm.model(ids)
    return {
        "logits": logits,
        "held": experts.parametrizations.gate_up_proj.original.dtype,
        "reads": experts.gate_up_proj.dtype,
        "shape": tuple(experts.gate_up_proj.shape),
    }
