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
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from reshard.checkpoint import ShardedCheckpoint, open_checkpoint
from reshard.converters.lazy import RepeatBlocks, SliceReader, SourceTensor, read_selection
from reshard.errors import CheckpointError, ReshardError
from reshard.runtime.generate import generate
from reshard.runtime.load import load_parallel_model
from reshard.runtime.model import KVCache, causal_lm_loss
from reshard.runtime.reference import GRAD
from reshard.runtime.text import TextCodec


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
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return rank


def run(args: argparse.Namespace, ckpt: ShardedCheckpoint, rank: int, device: torch.device) -> None:
    codec = TextCodec(ckpt.directory)
    prompt_ids = codec.encode_prompt(
        args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens, context=context_of(ckpt)
    )
    pm = load_parallel_model(ckpt, rank, device=device)
    pm.model.eval()
    headroom = ckpt.layout.size("tp")  # -sp pads every step to a multiple of tp, into the cache
    cache = KVCache(max_seq_len=len(prompt_ids) + args.max_new_tokens + headroom)
    stream = codec.stream() if rank == 0 and not args.json else None

    def on_token(ids: list[int]) -> None:
        if stream is not None:
            sys.stdout.write(stream.update(ids))
            sys.stdout.flush()

    def step(ids_BT: torch.Tensor, start_pos: int) -> torch.Tensor:
        # Only the last position's logits: the next token needs no others.
        return pm.model(ids_BT.to(device), start_pos, cache, logits_from=ids_BT.shape[1] - 1)

    prefill_done: list[float] = []

    def agree(next_B: torch.Tensor) -> torch.Tensor:
        # Logits are bitwise equal on every rank, so tokens are too; broadcasting rank 0's
        # choice makes that a guarantee rather than an assumption.
        next_B = next_B.to(device)
        dist.broadcast(next_B, src=0)
        if not prefill_done:  # the first token ends the prefill: time it once
            _synchronize(device)
            prefill_done.append(time.perf_counter())
        return next_B

    prompt_BT = torch.tensor([prompt_ids], device=device)
    start = time.perf_counter()
    out_BT = generate(
        step,
        prompt_BT,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_ids=codec.eos_token_ids,
        sync=agree,
        on_token=on_token if stream is not None else None,  # no host sync on other ranks
    )
    _synchronize(device)
    elapsed = time.perf_counter() - start
    prefill_s = prefill_done[0] - start
    output_ids = out_BT[0, len(prompt_ids) :].tolist()
    if rank == 0:
        if args.json:
            decoded = len(output_ids) - 1  # tokens after the first, which the prefill gave
            result = {
                "prompt_ids": prompt_ids,
                "output_ids": output_ids,
                "text": codec.decode(output_ids),
                "tokens_per_s": round(len(output_ids) / elapsed, 3),
                "prefill_tokens_per_s": round(len(prompt_ids) / prefill_s, 3),
                "decode_tokens_per_s": round(decoded / (elapsed - prefill_s), 3)
                if decoded
                else None,
                "layout": ckpt.layout.name,
                "world_size": ckpt.layout.world_size,
            }
            print(json.dumps(result))
        else:
            sys.stdout.write(stream.flush() + "\n")
            print(
                f"reshard: {len(output_ids)} tokens, {len(output_ids) / elapsed:.1f} tokens/s on {ckpt.layout.name}",
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
    run_p.add_argument("--prompt", required=True)
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
        # One line for the launcher to print; the traceback of an unexpected error goes to
        # stderr, which the launcher shows with RESHARD_DEBUG=1.
        message = str(e) if isinstance(e, ReshardError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, ReshardError):
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
