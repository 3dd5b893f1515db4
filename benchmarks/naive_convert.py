"""The conversion a user would write by hand, as the baseline for benchmarks/convert.py.

    python benchmarks/naive_convert.py SRC_DIR OUT_DIR --layout tp4-tp2ep

Load every source file with safetensors, fuse each layer's per-expert Linears into
transformers v5's `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`, cut every tensor
with `torch.chunk` as DTensor places it, and `save_file` one file per rank. Qwen3-MoE
only; layouts `tpN`, `epN`, `epAtpB`, and `-tp2ep`. Everything for a rank is in memory
at once, which is what makes it simple (and what reshard avoids).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def parse_layout(text: str) -> tuple[dict[str, int], bool]:
    head, *flags = text.split("-")
    dims = {n: int(s) for n, s in re.findall(r"(ep|tp)(\d+)", head) if int(s) > 1}
    return dims, "tp2ep" in flags


def fused(src: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out, experts = {}, {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = t
        else:
            out[name] = t
    for prefix, parts in experts.items():
        n = len(parts["gate"])
        gate = torch.stack([parts["gate"][e] for e in range(n)])
        up = torch.stack([parts["up"][e] for e in range(n)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack([parts["down"][e] for e in range(n)])
    return out


def tp_dim(name: str, tp2ep: bool) -> int | None:
    """Which dim tp splits (None: replicated); -1 with 'strided' handled by the caller."""
    if name.endswith(("gate_up_proj", "experts.down_proj")):
        return 0 if tp2ep else (1 if name.endswith("gate_up_proj") else 2)
    if re.search(r"self_attn\.[qkv]_proj\.weight$", name) or name.endswith(
        ("embed_tokens.weight", "lm_head.weight", "gate_proj.weight", "up_proj.weight")
    ):
        return 0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return 1
    return None


def local(
    name: str, t: torch.Tensor, dims: dict[str, int], tp2ep: bool, coords: dict
) -> torch.Tensor:
    expert = ".experts." in name
    if expert and "ep" in dims:
        t = t.chunk(dims["ep"], 0)[coords["ep"]]
    if "tp" in dims:
        d = tp_dim(name, tp2ep)
        if d is not None and name.endswith("gate_up_proj") and not tp2ep:
            gate, up = t.chunk(2, 1)  # _StridedShard(1, split_factor=2): [gate_r; up_r]
            t = torch.cat(
                [gate.chunk(dims["tp"], 1)[coords["tp"]], up.chunk(dims["tp"], 1)[coords["tp"]]], 1
            )
        elif d is not None:
            t = t.chunk(dims["tp"], d)[coords["tp"]]
    return t.contiguous()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--layout", required=True)
    args = p.parse_args()
    dims, tp2ep = parse_layout(args.layout)
    tensors = fused(args.src)
    names, sizes = list(dims), list(dims.values())
    world = 1
    for s in sizes:
        world *= s
    args.out.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        coords, rest = {}, rank
        for name, size in reversed(list(zip(names, sizes))):
            coords[name], rest = rest % size, rest // size
        shard = {n: local(n, t, dims, tp2ep, coords) for n, t in tensors.items()}
        save_file(shard, str(args.out / f"rank-{rank:05d}-of-{world:05d}.safetensors"))
    (args.out / "layout.json").write_text(json.dumps({"layout": args.layout, "world": world}))


if __name__ == "__main__":
    main()
