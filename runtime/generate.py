"""Token generation over any ``step(input_ids, start_pos) -> logits`` callable.

The loop knows nothing about the model or how it is split across ranks: the
single-device model and the parallel runtime both hand it a closure over their
own KV cache.
"""

# Shape suffixes: B = batch, T = prompt tokens, V = vocab, N = new tokens

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Step = Callable[[torch.Tensor, int], torch.Tensor]


def sample_next(
    logits_BV: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row: argmax when ``temperature == 0``, else nucleus sampling.

    Runs on the logits' device (no copy of [B, V] probabilities to the host per step), with
    ``generator`` on that device. Ranks of one device type with the same logits and seed draw
    the same token; a parallel run also broadcasts rank 0's choice (``generate(sync=...)``).

    Returns:
        ``[B]`` int64 token ids on the device of ``logits_BV``.
    """
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p; the top token always stays.
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    sorted_BV = sorted_BV.masked_fill(mass_before_BV >= top_p, 0.0)
    pick_B1 = torch.multinomial(sorted_BV, 1, generator=generator)
    return order_BV.gather(-1, pick_B1)[:, 0]


@torch.no_grad()
def generate(
    step: Step,
    prompt_ids_BT: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_ids: Sequence[int] = (),
    sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> torch.Tensor:
    """Prefill the prompt, then decode one token at a time.

    Args:
        step: ``step(input_ids_BT, start_pos) -> logits_BTV``; it must keep its own
            KV cache, so each call passes only the new tokens.
        prompt_ids_BT: ``[B, T]`` prompt, no padding.
        max_new_tokens: upper bound on generated tokens.
        temperature: 0 for greedy decoding (the default), else the softmax temperature.
        top_p: nucleus sampling mass, used when ``temperature > 0``.
        seed: seeds the sampling generator, so runs are reproducible.
        eos_token_ids: stop once every row has produced one of these; rows that
            finished earlier are padded with the eos token they produced.
        sync: applied to each step's chosen tokens, e.g. a broadcast from rank 0
            so every rank of a parallel run feeds the same token.
        on_token: called after each step with row 0's generated ids so far (streaming).

    Returns:
        ``[B, T + N]`` prompt followed by the generated tokens, ``N <= max_new_tokens``.

    Example:
        >>> cache = KVCache(max_seq_len=64)  # doctest: +SKIP
        >>> out = generate(lambda ids, pos: model(ids, pos, cache), prompt, max_new_tokens=8)  # doctest: +SKIP
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature ({temperature}) must be >= 0 and top_p ({top_p}) in (0, 1]")
    generator = None  # made on the logits' device, once the first logits show which it is
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=prompt_ids_BT.device)
    tokens = [prompt_ids_BT]
    finished_B = torch.zeros(prompt_ids_BT.shape[0], dtype=torch.bool, device=prompt_ids_BT.device)
    last_B = prompt_ids_BT[:, -1]
    input_ids_BT, start_pos = prompt_ids_BT, 0
    streamed: list[int] = []
    # The host reads a step's tokens (eos check, streaming) only once the next step is queued,
    # from a copy started before it: a read waits for the GPU, and the GPU would otherwise wait
    # for the host to launch the next step after each read. The cost: one step too many when
    # every row has finished.
    unread: _StepRead | None = None
    for _ in range(max_new_tokens):
        logits_BV = step(input_ids_BT, start_pos)[:, -1]
        if generator is None and seed is not None:
            generator = torch.Generator(device=logits_BV.device).manual_seed(seed)
        next_B = sample_next(logits_BV, temperature=temperature, top_p=top_p, generator=generator)
        if sync is not None:
            next_B = sync(next_B)
        next_B = torch.where(finished_B, last_B, next_B)
        tokens.append(next_B[:, None])
        finished_B |= torch.isin(next_B, eos)
        if unread is not None and unread.finished(streamed, on_token):
            tokens.pop()  # every row had finished: this step only repeated their eos
            unread = None
            break
        unread = _StepRead(next_B, finished_B)
        start_pos += input_ids_BT.shape[1]
        input_ids_BT, last_B = next_B[:, None], next_B
    if unread is not None:
        unread.finished(streamed, on_token)
    return torch.cat(tokens, dim=1)


class _StepRead:
    """A step's row-0 token and whether every row has finished, copied to the host without
    waiting: on CUDA into pinned memory, behind an event, so reading it later waits for this
    step only, not for the steps queued after it."""

    def __init__(self, next_B: torch.Tensor, finished_B: torch.Tensor) -> None:
        flags = torch.stack((next_B[0], finished_B.all().to(next_B.dtype)))
        self.done: torch.cuda.Event | None = None
        if flags.is_cuda:
            self.flags = flags.to("cpu", non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.flags = flags

    def finished(self, streamed: list[int], on_token: Callable[[list[int]], None] | None) -> bool:
        """Hand the token to ``on_token``; whether every row has finished."""
        if self.done is not None:
            self.done.synchronize()
        token, finished = self.flags.tolist()
        if on_token is not None:
            streamed.append(token)  # one id per step, not all of them again
            on_token(streamed)
        return bool(finished)
