"""Decode steps of fixed shapes, replayed as a CUDA graph where the layout allows.

A decode step at batch 1 moves ~1 GB of weights in well under a millisecond on an H100,
while launching its few hundred kernels one by one from Python takes several: the step is
bound by the host. gpt-fast's answer, taken here: give the step the same shapes at every
position (the token ids and the position live in fixed device tensors; the KV cache is
preallocated and written with ``index_copy_``; attention masks the slots not written yet),
so it has no host round trip, then capture it once with ``torch.cuda.CUDAGraph`` and replay
it per token.

Forwards inside ``decode_steps`` are decode steps, and two things change for them: their few
expert rows take the indexed kernel (``indexed_experts``), and expert parallelism, instead of
an all_to_all sized from the routing (the host reads the counts), has every EP rank apply
its own experts to all of the step's rows and sums the results (``parallel``): no host round
trip, the same shapes at every step. Prefill, ``validate`` and training stay as they are.
Layouts with several ranks still decode eagerly by default: their graphs are not yet
measured on a multi-GPU machine.
"""

# Shape suffixes: B = batch, V = vocab

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids_B1, start_pos) -> logits

_decoding = False  # inside `decode_steps`


@contextmanager
def decode_steps(device: torch.device) -> Iterator[None]:
    """Within it, forwards are decode steps (one new token per row).

    On CUDA the indexed expert kernel is imported on entry, in eager Python: a compiled decode
    step then never traces the import, and a captured one records the kernel itself.
    """
    global _decoding
    if device.type == "cuda":
        from reshard.runtime.indexed_experts import load_kernel

        load_kernel()
    previous, _decoding = _decoding, True
    try:
        yield
    finally:
        _decoding = previous


def decoding() -> bool:
    """Whether the forward running now is a decode step (inside ``decode_steps``)."""
    return _decoding


class StaticDecodeStep:
    """``step(ids_B1, start_pos) -> logits_B1V`` with the shapes of every call alike.

    Args:
        forward: the model on one token per row, at the slot held by a 0-d device tensor.
        batch: rows per step.
        device: where the inputs live.
        cuda_graph: capture the step on its first call and replay it after (CUDA only).

    The logits returned by a replayed graph live in the graph's own output tensor: use them
    before the next call.

    Example:
        >>> step = StaticDecodeStep(lambda ids, pos: model(ids, pos, cache), 1, dev, True)  # doctest: +SKIP
        >>> logits_B1V = step(next_B1, start_pos=prompt_len)  # doctest: +SKIP
    """

    def __init__(
        self, forward: Forward, batch: int, device: torch.device, cuda_graph: bool
    ) -> None:
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, not {device}")
        self.forward = forward
        self.ids_B1 = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.start_pos = torch.zeros((), dtype=torch.long, device=device)
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits_B1V: torch.Tensor | None = None

    def __call__(self, ids_B1: torch.Tensor, start_pos: int) -> torch.Tensor:
        self.ids_B1.copy_(ids_B1)
        self.start_pos.fill_(start_pos)
        if not self.cuda_graph:
            return self.forward(self.ids_B1, self.start_pos)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits_B1V

    def _capture(self) -> None:
        # Warm up on a side stream first (cuBLAS workspaces, lazy allocations), as
        # torch.cuda.graphs documents; the warm-up steps write this very position's keys and
        # values, which the replay then writes again, identically.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(self.ids_B1, self.start_pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_B1V = self.forward(self.ids_B1, self.start_pos)
