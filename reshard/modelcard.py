"""The README.md model card written beside the rank files, and uploaded with them.

Built with huggingface_hub's `ModelCard` / `ModelCardData`, so the Hub reads its
metadata: `base_model` (the source repository), `base_model_relation`, `library_name`
and tags (`reshard`, `moe`, the layout, the model type).
"""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from reshard.manifest import Manifest
from reshard.placements import local_selection
from reshard.units import human_bytes

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A per-rank sharded copy of `{{ source }}` ({{ model_type }}), written by
[reshard](https://pypi.org/project/reshard/) for the layout `{{ layout }}`: rank *r* of a
{{ world }}-rank job downloads and loads only `rank-{r:05d}-of-{{ "%05d" % world }}.safetensors`,
never the whole model. `reshard.json` records every parameter's global shape and DTensor
placements, and every file's size and sha256.

## Run it

```
reshard run {{ where }} --prompt "Why is the sky blue?"
reshard inspect {{ where }}        # the layout and placements ({{ "reshard.json only" if repo else "no download" }})
reshard verify {{ where }}         # re-hash every rank file
```

From Python, under `torchrun --nproc-per-node {{ world }}`:

```python
from torch.distributed.device_mesh import init_device_mesh
from reshard.runtime import load_dtensors, load_local_tensors

local = load_local_tensors("{{ where }}")    # {name: this rank's shard}, sha256-checked
mesh = init_device_mesh("cuda", {{ mesh_shape }}, mesh_dim_names={{ mesh_names }})
params = load_dtensors("{{ where }}", mesh)  # {name: DTensor}, the manifest's placements
```

## Layout `{{ layout }}` (mesh {{ mesh }})

{{ table }}

## How it was verified

- Every rank file's sha256 is recorded in `reshard.json` and checked whenever a rank loads it.
- {{ verified }}
- `reshard verify {{ where }} --against {{ source_spec }}` reassembles every tensor from the rank
  files and compares it with the source bit for bit.
{% if notes %}
## Notes
{% for note in notes %}
- {{ note }}
{%- endfor %}
{% endif %}"""


def experts_held(manifest: Manifest, rank: int) -> str:
    """`first-last` expert indices rank `rank` holds (from the first routed-expert tensor)."""
    layout = manifest.parsed_layout
    coords = tuple(layout.coords(rank).values())
    for name, p in manifest.param_plans().items():
        if name.endswith("experts.gate_up_proj"):
            sel = local_selection(p.shape, p.placements, layout.mesh_shape, coords, what=name)
            return f"{sel[0][0][0]}-{sel[0][-1][1] - 1}"
    return "-"


def rank_table(manifest: Manifest) -> str:
    """Markdown table: one row per rank with coordinates, experts held, tensors and bytes."""
    rows = [
        "| rank | coords | experts | tensors | bytes | file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    layout = manifest.parsed_layout
    for entry in manifest.ranks:
        coords = ", ".join(f"{k}={v}" for k, v in layout.coords(entry.rank).items()) or "-"
        rows.append(
            f"| {entry.rank} | {coords} | {experts_held(manifest, entry.rank)} | "
            f"{len(manifest.params)} | {human_bytes(entry.bytes)} | {entry.file} |"
        )
    return "\n".join(rows)


def plan_table(plan) -> str:
    """`rank_table` for a conversion plan, before anything is written: tensor bytes per rank."""
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


def model_card(manifest: Manifest, repo: str | None = None) -> str:
    """The card for a checkpoint kept locally (`repo` None) or published as `repo`."""
    source_repo = manifest.source.get("repo")
    source = source_repo or manifest.source.get("spec")
    layout = manifest.parsed_layout
    data = ModelCardData(
        base_model=source_repo,
        # The Hub's relations are adapter / merge / quantized / finetune; a format conversion
        # of the same weights is listed with the quantizations, as GGUF or MLX copies are.
        base_model_relation="quantized" if source_repo else None,
        library_name="reshard",
        tags=["reshard", "moe", manifest.layout, manifest.model_type],
    )
    where = f"hf:{repo}" if repo else "."
    card = ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        title=f"{source}, sharded for `{manifest.layout}`",
        source=source,
        source_spec=f"hf:{source_repo}" if source_repo else manifest.source.get("spec"),
        model_type=manifest.model_type,
        layout=manifest.layout,
        world=manifest.world_size,
        where=where,
        repo=repo,
        mesh=manifest.mesh or {"tp": 1},
        mesh_shape=tuple(layout.mesh_shape) or (1,),
        mesh_names=tuple(layout.mesh_dim_names) or ("tp",),
        table=rank_table(manifest),
        verified="Before this upload every rank file was re-hashed against the manifest."
        if repo
        else "`reshard convert` hashed each rank file as it wrote it.",
        notes=manifest.notes,
    )
    return str(card)
