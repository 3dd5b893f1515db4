"""The README.md model card written beside the rank files."""

from __future__ import annotations

from reshard.manifest import Manifest


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def rank_table(plan) -> str:
    """Markdown table: one row per rank with coordinates, experts held, tensors and bytes."""
    rows = [
        "| rank | coords | experts | tensors | bytes | file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    world = plan.layout.world_size
    for rank in range(world):
        coords = ", ".join(f"{k}={v}" for k, v in plan.layout.coords(rank).items()) or "-"
        first, last = plan.experts_held(rank)
        tensors = plan.rank_tensors(rank)
        rows.append(
            f"| {rank} | {coords} | {first}-{last - 1} | {len(tensors)} | "
            f"{human_bytes(sum(t.nbytes for t in tensors))} | rank-{rank:05d}-of-{world:05d}.safetensors |"
        )
    return "\n".join(rows)


def model_card(manifest: Manifest, plan) -> str:
    source = manifest.source.get("repo") or manifest.source.get("spec")
    return f"""---
tags:
- reshard
- mixture-of-experts
---

# {source} — sharded for `{manifest.layout}`

This is a per-rank sharded copy of `{source}` ({manifest.model_type}) written by
[reshard](https://pypi.org/project/reshard/): rank *r* of a {manifest.world_size}-rank job loads only
`rank-{{r:05d}}-of-{manifest.world_size:05d}.safetensors`. `reshard.json` lists every parameter's
global shape and DTensor placements and every file's sha256.

```
reshard verify .            # re-hash every file
reshard run . --prompt "Hello"
```

## Layout `{manifest.layout}` (mesh {manifest.mesh or {"tp": 1}})

{rank_table(plan)}
""" + (
        "\n## Notes\n\n" + "\n".join(f"- {n}" for n in manifest.notes) + "\n"
        if manifest.notes
        else ""
    )
