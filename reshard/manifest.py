"""`reshard.json`: what a sharded checkpoint holds.

Written last, so a directory without it is never taken for a finished
checkpoint. Everything a loader needs is here: the layout, every parameter's
global shape, dtype, styles and placements, and every rank's file and hash.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reshard.converters.lazy import DTYPE_NAMES, SAFETENSORS_DTYPES
from reshard.errors import CheckpointError
from reshard.layout import Layout
from reshard.placements import parse_placement
from reshard.plan import ParamPlan

FORMAT_VERSION = 1
MANIFEST = "reshard.json"


def rank_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


@dataclass(kw_only=True)
class RankEntry:
    rank: int
    coords: dict[str, int]
    file: str
    bytes: int
    sha256: str


@dataclass(kw_only=True)
class Manifest:
    layout: str
    mesh: dict[str, int]
    dtype: str
    source: dict
    model_type: str
    config: dict
    params: dict[str, dict]
    ranks: list[RankEntry]
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)

    @property
    def parsed_layout(self) -> Layout:
        return Layout.parse(self.layout)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def param_plans(self) -> dict[str, ParamPlan]:
        return {name: param_plan_from_json(name, entry) for name, entry in self.params.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, directory: Path) -> None:
        tmp = Path(directory) / f".{MANIFEST}.tmp"
        tmp.write_text(self.to_json())
        tmp.replace(Path(directory) / MANIFEST)


def param_plan_to_json(plan: ParamPlan) -> dict:
    entry = {
        "shape": list(plan.shape),
        "dtype": DTYPE_NAMES[plan.dtype],
        "styles": list(plan.styles),
        "placements": [str(p) for p in plan.placements],
    }
    if plan.head_repeat > 1:
        entry["head_repeat"] = plan.head_repeat
    return entry


def param_plan_from_json(name: str, entry: dict) -> ParamPlan:
    return ParamPlan(
        name=name,
        shape=tuple(entry["shape"]),
        dtype=SAFETENSORS_DTYPES[entry["dtype"]],
        styles=tuple(entry["styles"]),
        placements=tuple(parse_placement(p) for p in entry["placements"]),
        head_repeat=entry.get("head_repeat", 1),
    )


def load_manifest(directory: str | Path) -> Manifest:
    """Read `reshard.json`; raise CheckpointError when the directory is not a finished checkpoint."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: not a finished sharded checkpoint ({MANIFEST} is missing; "
            "was `reshard convert` interrupted?)"
        )
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format_version {data.get('format_version')} is not supported (expected {FORMAT_VERSION})"
            )
        data["ranks"] = [RankEntry(**r) for r in data["ranks"]]
        return Manifest(**data)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid manifest ({e})") from e
