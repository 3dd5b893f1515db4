"""The per-rank program that `reshard run` / `reshard validate` start under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m reshard.runtime.worker \
        run --ckpt tiny-ep2tp2 --prompt "Why is the sky blue?"

Each rank opens only `reshard.json` and its own rank file. Errors the user can
cause are written, one line, to $RESHARD_ERROR_DIR/rank-N.txt for the
launcher to print, and the rank exits 1 (torchrun then stops the others; the
collective timeout bounds any wait).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from reshard.checkpoint import ShardedCheckpoint, open_checkpoint
from reshard.converters.lazy import RepeatBlocks, SliceReader, SourceTensor, read_selection
from reshard.errors import CheckpointError, ReshardError
from reshard.runtime.decode import StaticDecodeStep, decode_steps
from reshard.runtime.generate import generate
from reshard.runtime.load import load_parallel_model
from reshard.runtime.model import KVCache, causal_lm_loss, grouped_mm_runs
from reshard.runtime.parallel import ParallelModel
from reshard.runtime.reference import GRAD
from reshard.runtime.text import TextCodec, read_prompt_file


def _device(name: str) -> torch.device:
    if name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _init(ckpt: ShardedCheckpoint, device: torch.device, timeout_s: float) -> int:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world != ckpt.layout.world_size:
        raise CheckpointError(
            f"{ckpt.directory}: layout {ckpt.layout.name} needs {ckpt.layout.world_size} ranks, started with {world}"
        )
    # One rank has no peer to talk to: gloo's group costs nothing to start, where NCCL's
    # communicator took 0.5 s of a one-GPU `reshard run` (docs/benchmarks.md).
    nccl = device.type == "cuda" and world > 1
    dist.init_process_group(
        "nccl" if nccl else "gloo",
        timeout=timedelta(seconds=timeout_s),
        device_id=device if nccl else None,
    )
    return rank


@dataclass
class Timing:
    """Where a generation's time went, for tokens/s figures."""

    prompt_tokens: int = 0  # real tokens, not padding
    new_tokens: int = 0  # generated tokens of every row, up to and including its eos
    prefill_s: float = 0.0  # to the first new token of every row
    total_s: float = 0.0

    def add(self, other: Timing) -> None:
        for name in ("prompt_tokens", "new_tokens", "prefill_s", "total_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def figures(self, rows: int) -> dict[str, float | None]:
        """tokens/s overall, of the prefill (prompt tokens), and of decode (the tokens after
        each row's first, which the prefill gave)."""
        decoded, decode_s = self.new_tokens - rows, self.total_s - self.prefill_s
        return {
            "tokens_per_s": round(self.new_tokens / self.total_s, 3),
            "prefill_tokens_per_s": round(self.prompt_tokens / self.prefill_s, 3),
            "decode_tokens_per_s": round(decoded / decode_s, 3) if decoded > 0 else None,
        }


class Decoder:
    """Generation on one rank of a parallel model: left-padded batches, every rank agreeing on
    each token, timings.

    `static_decode`: decode steps of static shapes, replayed as a CUDA graph on CUDA
    (`runtime.decode`). By default on where it pays and is proven: CUDA in bf16 (the experts'
    grouped_mm takes its offsets on the device; other dtypes loop over host-side counts), one
    process (no expert-parallel dispatch, whose sizes come from the host; collectives inside
    a graph are not yet measured on a multi-GPU machine). The KV cache and the graph of a batch size are
    kept for the next batch of that size.
    """

    def __init__(
        self,
        pm: ParallelModel,
        device: torch.device,
        eos_token_ids: list[int],
        pad_token_id: int = 0,
        static_decode: bool | None = None,
        compile_decode: bool = False,
    ) -> None:
        self.pm, self.device, self.eos, self.pad_id = pm, device, eos_token_ids, pad_token_id
        self.compile_decode = compile_decode  # torch.compile the static step (kernel fusion)
        layout = pm.groups.layout
        if static_decode is None:  # where it pays: a CUDA graph can replay it
            dtype = pm.model.lm_head.weight.dtype
            static_decode = layout.world_size == 1 and grouped_mm_runs(device, dtype)
        self.static, self.cuda_graph = static_decode, static_decode and device.type == "cuda"
        self.headroom = layout.size("tp")  # -sp pads every step to a multiple of tp, into the cache
        self._states: dict[tuple[int, bool], tuple[KVCache, StaticDecodeStep | None]] = {}

    def _state(self, B: int, padded: bool, max_seq_len: int):
        key = (B, padded)
        if key not in self._states or self._states[key][0].max_seq_len < max_seq_len:
            pad_B = torch.zeros(B, dtype=torch.long, device=self.device) if padded else None
            cache = KVCache(max_seq_len, pad_B=pad_B)
            step = None
            if self.static:

                def forward(ids: torch.Tensor, pos: torch.Tensor, cache=cache) -> torch.Tensor:
                    return self.pm.model(ids, pos, cache)

                if self.compile_decode:
                    forward = torch.compile(forward, dynamic=False)
                step = StaticDecodeStep(forward, B, self.device, self.cuda_graph)
            self._states[key] = (cache, step)
        return self._states[key]

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        on_token=None,
    ) -> tuple[list[list[int]], Timing]:
        """Each prompt's new tokens (up to and including its eos), and the timing."""
        T = max(len(p) for p in prompts)
        pads = [T - len(p) for p in prompts]
        cache, static_step = self._state(
            len(prompts), any(pads), T + max_new_tokens + self.headroom
        )
        if cache.pad_B is not None:
            cache.pad_B.copy_(torch.tensor(pads))
        prompt_BT = torch.tensor(
            [[self.pad_id] * pad + p for pad, p in zip(pads, prompts)], device=self.device
        )

        def step(ids_BT: torch.Tensor, start_pos: int) -> torch.Tensor:
            if ids_BT.shape[1] == 1:  # a decode step (see decode.decode_steps)
                with decode_steps(self.device):
                    if static_step is not None:
                        return static_step(ids_BT, start_pos)
                    return self.pm.model(ids_BT, start_pos, cache)
            # Only the last position's logits: the next token needs no others.
            return self.pm.model(ids_BT, start_pos, cache, logits_from=ids_BT.shape[1] - 1)

        prefill_done: list[float] = []

        def agree(next_B: torch.Tensor) -> torch.Tensor:
            # Logits are bitwise equal on every rank, so tokens are too; broadcasting rank 0's
            # choice makes that a guarantee rather than an assumption.
            if dist.get_world_size() > 1:
                dist.broadcast(next_B, src=0)
            if not prefill_done:  # the first token ends the prefill: time it once
                _synchronize(self.device)
                prefill_done.append(time.perf_counter())
            return next_B

        _synchronize(self.device)
        start = time.perf_counter()
        out_BT = generate(
            step,
            prompt_BT,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            eos_token_ids=self.eos,
            sync=agree,
            on_token=on_token,
        )
        _synchronize(self.device)
        timing = Timing(total_s=time.perf_counter() - start)
        timing.prefill_s = prefill_done[0] - start
        outputs = [self._until_eos(row) for row in out_BT[:, T:].tolist()]
        timing.prompt_tokens = sum(len(p) for p in prompts)
        timing.new_tokens = sum(len(o) for o in outputs)
        return outputs, timing

    def _until_eos(self, ids: list[int]) -> list[int]:
        for i, token in enumerate(ids):
            if token in self.eos:
                return ids[: i + 1]
        return ids


DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run(args: argparse.Namespace, ckpt: ShardedCheckpoint, rank: int, device: torch.device) -> None:
    codec = TextCodec(ckpt.directory)
    texts = read_prompt_file(args.prompt_file) if args.prompt_file else [args.prompt]
    prompts = [
        codec.encode_prompt(
            text, chat=args.chat, max_new_tokens=args.max_new_tokens, context=context_of(ckpt)
        )
        for text in texts
    ]
    pm = load_parallel_model(ckpt, rank, device=device, dtype=DTYPES[args.dtype])
    pm.model.eval()
    pad_id = ckpt.manifest.config.get("pad_token_id") or 0
    decoder = Decoder(pm, device, codec.eos_token_ids, pad_id, compile_decode=args.compile)
    if args.compile and not decoder.cuda_graph:
        raise CheckpointError(
            "--compile: this run decodes eagerly (compiling needs CUDA, one rank and bf16 "
            f"weights; layout {ckpt.layout.name}, {pm.model.lm_head.weight.dtype})"
        )
    # One prompt streams its text as it comes; a batch prints each completion at the end.
    stream = codec.stream() if rank == 0 and not args.json and len(texts) == 1 else None

    def on_token(ids: list[int]) -> None:
        sys.stdout.write(stream.update(ids))
        sys.stdout.flush()

    outputs, timing = [], Timing()
    for first in range(0, len(prompts), args.batch_size):
        batch_out, batch_timing = decoder.generate(
            prompts[first : first + args.batch_size],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            on_token=on_token if stream is not None else None,  # no host sync on other ranks
        )
        outputs += batch_out
        timing.add(batch_timing)
    if rank != 0:
        return
    figures = timing.figures(len(prompts))
    where = {"layout": ckpt.layout.name, "world_size": ckpt.layout.world_size}
    if args.json and not args.prompt_file:
        result = {"prompt_ids": prompts[0], "output_ids": outputs[0]}
        print(json.dumps({**result, "text": codec.decode(outputs[0]), **figures, **where}))
    elif args.json:
        rows = [
            {"prompt": text, "prompt_ids": ids, "output_ids": out, "text": codec.decode(out)}
            for text, ids, out in zip(texts, prompts, outputs)
        ]
        print(json.dumps({"outputs": rows, **figures, **where, "batch_size": args.batch_size}))
    else:
        if stream is not None:
            sys.stdout.write(stream.flush() + "\n")
        else:
            for index, out in enumerate(outputs):
                print(f"--- {index}\n{codec.decode(out)}")
        print(
            f"reshard: {timing.new_tokens} tokens, {figures['tokens_per_s']:.1f} tokens/s on "
            f"{ckpt.layout.name}",
            file=sys.stderr,
        )


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock reading means it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_of(ckpt: ShardedCheckpoint) -> int:
    """The model's context length, in tokens."""
    return ckpt.manifest.config.get("max_position_embeddings", 32768)


def validate(
    args: argparse.Namespace, ckpt: ShardedCheckpoint, rank: int, device: torch.device
) -> None:
    """Forward and backward of the reference batch; compare logits, loss and every local gradient."""
    ref_path = str(args.reference_file)
    reader = SliceReader()

    def ref(name: str, shape, head_repeat: int = 1, selection=None) -> torch.Tensor:
        t = SourceTensor(
            path=ref_path, name=name, shape=tuple(shape), dtype=torch.float32, reader=reader
        )
        if selection is None:
            return t.materialize()
        lazy = RepeatBlocks(t, 0, pm.model.args.head_dim, head_repeat) if head_repeat > 1 else t
        return read_selection(lazy, selection)

    pm = load_parallel_model(ckpt, rank, device=device, dtype=torch.float32)
    from safetensors import safe_open

    with safe_open(ref_path, framework="pt") as f:
        ids_BT = f.get_tensor("input_ids")
        ref_logits = f.get_tensor("logits")
        ref_loss = f.get_tensor("loss")
    pm.record_routing()  # the result reports tokens_per_expert
    logits_BTV = pm.model(ids_BT.to(device))
    loss = causal_lm_loss(logits_BTV, ids_BT.to(device))
    loss.backward()
    pm.finish_grads()
    diffs = {
        "logits": (logits_BTV.detach().cpu() - ref_logits).abs().max().item(),
        "loss": (loss.detach().cpu() - ref_loss).abs().item(),
    }
    worst, worst_index = 0.0, 0
    names = [name for name, _ in pm.model.named_parameters()]  # the same order on every rank
    for index, (name, param) in enumerate(pm.model.named_parameters()):
        p = ckpt.params[name]
        original = (p.shape[0] // p.head_repeat, *p.shape[1:])
        expected = ref(GRAD + name, original, p.head_repeat, ckpt.selection(name, rank))
        got = param.grad.detach().cpu() if param.grad is not None else torch.zeros_like(expected)
        d = (got.float() - expected).abs().max().item() if got.numel() else 0.0
        if d >= worst:
            worst, worst_index = d, index
    diffs["grad"] = worst
    # Plain tensors, not all_gather_object: that pickles through numpy, which a base install lacks.
    row = torch.tensor(
        [diffs["logits"], diffs["loss"], diffs["grad"], worst_index],
        dtype=torch.float64,
        device=device,
    )
    rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    if rank == 0:
        table = torch.stack(rows).cpu()
        result = {
            "layout": ckpt.layout.name,
            "world_size": ckpt.layout.world_size,
            "loss": ref_loss.item(),
            "max_abs_diff": {
                k: table[:, i].max().item() for i, k in enumerate(("logits", "loss", "grad"))
            },
            "worst_grad": names[int(table[int(table[:, 2].argmax()), 3])],
            "params_checked": len(ckpt.params),
            # Routed (token, expert) pairs per expert, all-reduced over the EP group; per MoE layer.
            "tokens_per_expert": [h.tokens_per_expert.tolist() for h in pm.moe_hooks],
        }
        Path(args.result_file).write_text(json.dumps(result))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reshard.runtime.worker")
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("run", "validate"):
        s = sub.add_parser(mode)
        s.add_argument("--ckpt", required=True, help="a directory, or hf:org/name@sha")
        s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        s.add_argument("--timeout", type=float, default=300.0, help="collective timeout, seconds")
    run_p = sub.choices["run"]
    prompt = run_p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt")
    prompt.add_argument("--prompt-file", type=Path)
    run_p.add_argument("--batch-size", type=int, default=1)
    run_p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    run_p.add_argument("--compile", action="store_true")
    run_p.add_argument("--max-new-tokens", type=int, default=64)
    run_p.add_argument("--temperature", type=float, default=0.0)
    run_p.add_argument("--top-p", type=float, default=1.0)
    run_p.add_argument("--seed", type=int, default=0)
    run_p.add_argument("--chat", action="store_true")
    run_p.add_argument("--json", action="store_true")
    val_p = sub.choices["validate"]
    val_p.add_argument("--reference-file", required=True, type=Path)
    val_p.add_argument("--result-file", required=True, type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        ckpt = open_checkpoint(args.ckpt)
        device = _device(args.device)
        rank = _init(ckpt, device, args.timeout)
        (run if args.mode == "run" else validate)(args, ckpt, rank, device)
        dist.barrier()
        return 0
    except Exception as e:
        # One line for the launcher to print; the traceback of an unexpected error only with
        # RESHARD_DEBUG=1 (a one-rank run shares the launcher's terminal).
        message = str(e) if isinstance(e, ReshardError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, ReshardError) and os.environ.get("RESHARD_DEBUG"):
            traceback.print_exc()
        error_dir = os.environ.get("RESHARD_ERROR_DIR")
        if error_dir:
            Path(error_dir, f"rank-{rank}.txt").write_text(message)
        else:
            print(f"error (rank {rank}): {message}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
