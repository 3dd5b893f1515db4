"""One conversion written by several processes: torchrun's, or a scheduler's `--ranks A-B` runs.

Each process writes a contiguous block of the layout's ranks. The manifest is
written once every rank file exists:

- under torchrun, the processes exchange their finished entries (JSON over a
  gloo all_gather: no pickle), global rank 0 writes the manifest into its --out,
  and after a barrier each node's first process writes it into its own --out if
  that is node-local (no manifest there yet);
- `--ranks A-B` runs have no one to talk to: each writes its ranks, and the run
  that finds every rank finished on disk writes the manifest.

    part = torchrun_part(world=16)   # None outside torchrun
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import asdict, dataclass

from reshard.errors import ReshardError
from reshard.machine import torchrun_processes
from reshard.manifest import FileEntry, RankEntry
from reshard.safetensors_header import shown

# A rank of a 470 GB conversion may finish hours after another: the exchange waits.
EXCHANGE_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Part:
    """This process's share: the layout ranks it writes, and whether it talks to its peers."""

    ranks: list[int]
    process: int = 0  # torchrun's RANK
    processes: int = 1  # torchrun's WORLD_SIZE; 1 for a --ranks run
    local: int = 0  # torchrun's LOCAL_RANK: the first process of each node writes node-local files

    @property
    def torchrun(self) -> bool:
        return self.processes > 1


def parse_ranks(text: str, world: int) -> list[int]:
    """`A-B` (inclusive) or `A`: ranks of a layout of `world` ranks."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not match:
        raise ReshardError(f"--ranks {shown(text)}: write A-B (inclusive) or A, e.g. --ranks 0-7")
    first, last = int(match[1]), int(match[2] or match[1])
    if first > last or last >= world:
        raise ReshardError(f"--ranks {text}: the layout has ranks 0-{world - 1}")
    return list(range(first, last + 1))


def torchrun_part(world: int) -> Part | None:
    """This process's block of the `world` layout ranks when started by torchrun, else None."""
    processes = torchrun_processes()
    if processes == 1:
        return None
    process = int(os.environ["RANK"])
    ranks = list(range(process * world // processes, (process + 1) * world // processes))
    return Part(
        ranks=ranks,
        process=process,
        processes=processes,
        local=int(os.environ.get("LOCAL_RANK", "0")),
    )


class Exchange:
    """torchrun's processes, joined with gloo (CPU only: converting needs no GPU)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group("gloo", timeout=EXCHANGE_TIMEOUT)

    def gather(self, entries: list[RankEntry], error: str | None) -> list[RankEntry]:
        """Every process's entries, on every process; raise if any process failed."""
        blob = json.dumps({"entries": [asdict(e) for e in entries], "error": error})
        everyone = [json.loads(b) for b in self._all_gather(blob.encode())]
        failed = [(p, d["error"]) for p, d in enumerate(everyone) if d["error"]]
        if failed:
            process, why = failed[0]
            raise ReshardError(f"torchrun process {process} failed: {why}")
        return [
            RankEntry(
                rank=e["rank"], coords=e["coords"], files=[FileEntry(**f) for f in e["files"]]
            )
            for d in everyone
            for e in d["entries"]
        ]

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()

    def _all_gather(self, data: bytes) -> list[bytes]:
        import torch

        from reshard.writer import tensor_bytes

        n = torch.tensor([len(data)])
        sizes = [torch.zeros_like(n) for _ in range(self.dist.get_world_size())]
        self.dist.all_gather(sizes, n)
        longest = int(max(sizes))
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.zeros_like(mine) for _ in sizes]
        self.dist.all_gather(out, mine)
        return [bytes(tensor_bytes(t[: int(s)])) for t, s in zip(out, sizes)]
