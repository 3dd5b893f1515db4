"""Column slices without torch: can a conversion skip `import torch`?

    python benchmarks/column_slices.py --src SYNTH_DIR

A tensor-parallel conversion cuts every `down_proj` (Shard(-1)) into column slices; the rest of
a Qwen3-MoE conversion is verbatim byte ranges. Today torch cuts them
(`narrow(...).contiguous()` of one covering read), so every `reshard convert` first pays
`import torch`: about 1.2-1.5 s on the 2-core VM and 4-6 s on the 16-core GPU host
(docs/benchmarks.md), most of a small conversion's excess over `cp`.

This measures, on the checkpoint's own `down_proj` tensors (in the page cache), the cost of
the slices for TP 2, 4 and 8 two ways, beside the import they would save:

| way | what |
| --- | --- |
| preadv scatter | one `os.preadv` per 1024 rows x TP pieces: the kernel copies each row's TP pieces into TP contiguous buffers (iovec lists built once, reused for every expert); no torch, no GIL while it copies |
| torch | one read of the whole tensor, then `contiguous()` of each of the TP column slices |

Both figures are GB of `down_proj` cut per second on one thread.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from reshard.errors import ReshardError
from reshard.safetensors_header import read_header

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import warm  # noqa: E402 - the same untimed read into the page cache

GB = 1e9
Tensor = tuple[Path, int, list[int]]  # (file, data offset, shape)


def down_projs(src: Path) -> list[Tensor]:
    """(file, data offset, shape) of every bf16/fp16 `down_proj` weight in the checkpoint."""
    out = []
    for f in sorted(src.glob("*.safetensors")):
        header = read_header(f)
        for name, info in header.tensors.items():
            if name.endswith("down_proj.weight") and info.dtype in (torch.bfloat16, torch.float16):
                out.append((f, header.data_start + info.start, list(info.shape)))
    return out


class Scatter:
    """Cuts [rows, cols] 2-byte tensors into `tp` column slices with `os.preadv`: the iovec
    lists (each row's TP pieces, IOV_MAX a call) are built once and reused for every tensor."""

    def __init__(self, rows: int, cols: int, tp: int):
        width = cols * 2 // tp
        self.staging = [memoryview(bytearray(rows * width)) for _ in range(tp)]
        pieces = [
            self.staging[t][r * width : (r + 1) * width] for r in range(rows) for t in range(tp)
        ]
        iov_max = os.sysconf("SC_IOV_MAX")
        self.calls = [pieces[i : i + iov_max] for i in range(0, len(pieces), iov_max)]

    def cut(self, fd: int, offset: int) -> list[memoryview]:
        """The slices of the tensor at `offset` of `fd` (views of buffers the next cut reuses)."""
        for call in self.calls:
            offset += os.preadv(fd, call, offset)
        return self.staging


def rate(tensors: list[Tensor], cut: Callable[[int, int], object]) -> float:
    """GB/s of `cut(fd, offset)` over every tensor of the first one's shape, on one thread."""
    rows, cols = tensors[0][2]
    fds = {f: os.open(f, os.O_RDONLY) for f, _, _ in tensors}
    try:
        start, done = time.perf_counter(), 0
        for f, offset, shape in tensors:
            if shape == [rows, cols]:
                cut(fds[f], offset)
                done += rows * cols * 2
        return done / (time.perf_counter() - start) / GB
    finally:
        for fd in fds.values():
            os.close(fd)


def torch_cutter(rows: int, cols: int, tp: int) -> Callable[[int, int], list[torch.Tensor]]:
    """One read of the whole tensor, then `contiguous()` of each of its `tp` column slices."""
    whole = torch.empty(rows, cols, dtype=torch.bfloat16)
    into = memoryview(whole.view(torch.uint8).numpy()).cast("B")

    def cut(fd: int, offset: int) -> list[torch.Tensor]:
        os.preadv(fd, [into], offset)
        return [t.contiguous() for t in whole.tensor_split(tp, dim=1)]

    return cut


def check_scatter(tensor: Tensor, tp: int) -> None:
    """The scatter's slices are torch's, byte for byte (else the timing means nothing)."""
    f, offset, (rows, cols) = tensor
    fd = os.open(f, os.O_RDONLY)
    try:
        want = torch_cutter(rows, cols, tp)(fd, offset)
        got = Scatter(rows, cols, tp).cut(fd, offset)
    finally:
        os.close(fd)
    for t in range(tp):
        if bytes(got[t]) != want[t].view(torch.uint8).numpy().tobytes():
            raise SystemExit(f"{f}: preadv scatter slice {t} of {tp} differs from torch's")


def import_torch_seconds() -> float:
    """Wall seconds of `python -c "import torch"` in a fresh interpreter (best of 3)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="a checkpoint (e.g. reshard synth)")
    p.add_argument("--tp", default="2,4,8", help="TP degrees to cut for")
    args = p.parse_args(argv)
    try:
        tensors = down_projs(args.src)
    except ReshardError as e:  # a file that is not safetensors: its one line
        p.error(str(e))
    if not tensors:
        p.error(f"--src {args.src}: no bf16/fp16 down_proj weights in its safetensors files")
    gb = sum(r * c * 2 for _, _, (r, c) in tensors) / GB
    warm(args.src)
    print(f"{len(tensors)} down_proj tensors of {tensors[0][2]}, {gb:.2f} GB; one thread")
    print(f"import torch: {import_torch_seconds():.2f} s (what a torch-free conversion saves)")
    print("| TP | preadv scatter GB/s | torch GB/s | scatter s | torch s |")
    print("| --- | --- | --- | --- | --- |")
    for tp in (int(t) for t in args.tp.split(",")):
        check_scatter(tensors[0], tp)
        rows, cols = tensors[0][2]
        s = rate(tensors, Scatter(rows, cols, tp).cut)
        t = rate(tensors, torch_cutter(rows, cols, tp))
        print(f"| {tp} | {s:.2f} | {t:.2f} | {gb / s:.2f} | {gb / t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
