"""`reshard.json`: what a sharded checkpoint holds.

Written last, so a directory without it is never taken for a finished
checkpoint. Everything a loader needs is here: the layout, every parameter's
global shape, dtype, styles and placements, and every rank's file and hash.

Nothing in it is trusted: `load_manifest` checks the whole document against the
schema below before anything uses it (types, layout vs mesh, placements that
parse and fit their shapes on this mesh, dtypes, rank order and coordinates,
file names of the exact form `rank-NNNNN-of-NNNNN.safetensors`), so a hand-edited
or damaged manifest is one line naming the field, never a traceback and never
the wrong shard.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reshard.converters.lazy import CAST_DTYPES, DTYPE_NAMES, SAFETENSORS_DTYPES
from reshard.errors import CheckpointError, ReshardError
from reshard.layout import Layout
from reshard.placements import normalize, parse_placement
from reshard.plan import ParamPlan, check_divisible

FORMAT_VERSION = 2
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


# --- the schema ----------------------------------------------------------------------------------


class _Invalid(Exception):
    """One schema violation: where (a JSON path) and what."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Invalid(where, f"expected {name}, got {json.dumps(value)[:60]}")
    return value


def _expect_keys(obj: dict, required: set[str], optional: set[str], where: str) -> None:
    missing, unknown = sorted(required - set(obj)), sorted(set(obj) - required - optional)
    if missing:
        raise _Invalid(where, f"missing {', '.join(missing)}")
    if unknown:
        raise _Invalid(where, f"unknown field {', '.join(unknown)}")


def _check_param(name: str, entry: Any, layout: Layout) -> None:
    where = f"params[{json.dumps(name)}]"
    _expect(entry, dict, where)
    _expect_keys(entry, {"shape", "dtype", "styles", "placements"}, {"head_repeat"}, where)
    shape = _expect(entry["shape"], list, f"{where}.shape")
    if not all(_is_int(s) and s >= 0 for s in shape):
        raise _Invalid(f"{where}.shape", f"{shape} is not a list of non-negative ints")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in SAFETENSORS_DTYPES:
        raise _Invalid(f"{where}.dtype", f"{json.dumps(entry['dtype'])[:40]} is not a known dtype")
    styles = _expect(entry["styles"], list, f"{where}.styles")
    if not all(isinstance(s, str) for s in styles):
        raise _Invalid(f"{where}.styles", "expected a list of strings")
    placements = _expect(entry["placements"], list, f"{where}.placements")
    if len(placements) != len(layout.mesh_dim_names):
        raise _Invalid(
            f"{where}.placements",
            f"{len(placements)} entries for layout {layout.name}'s "
            f"{len(layout.mesh_dim_names)} mesh dims {list(layout.mesh_dim_names)}",
        )
    parsed = []
    for i, text in enumerate(placements):
        try:
            parsed.append(normalize(parse_placement(_expect(text, str, "")), len(shape)))
        except (ValueError, _Invalid) as e:
            raise _Invalid(f"{where}.placements[{i}]", f"{str(e).lstrip(': ')}") from None
    head_repeat = entry.get("head_repeat", 1)
    if not _is_int(head_repeat) or head_repeat < 1:
        raise _Invalid(f"{where}.head_repeat", f"{head_repeat!r} is not a positive int")
    plan = ParamPlan(
        name=name,
        shape=tuple(shape),
        dtype=SAFETENSORS_DTYPES[entry["dtype"]],
        styles=tuple(styles),
        placements=tuple(parsed),
        head_repeat=head_repeat,
    )
    try:
        check_divisible(plan, layout)  # every rank's local shape is then well defined
    except ReshardError as e:
        raise _Invalid(f"{where}.placements", str(e)) from None


def _check_rank(i: int, entry: Any, layout: Layout) -> RankEntry:
    where = f"ranks[{i}]"
    _expect(entry, dict, where)
    _expect_keys(entry, {"rank", "coords", "file", "bytes", "sha256"}, set(), where)
    if entry["rank"] != i or not _is_int(entry["rank"]):
        raise _Invalid(f"{where}.rank", f"is {json.dumps(entry['rank'])[:20]}, must be {i}")
    if entry["coords"] != layout.coords(i):
        raise _Invalid(
            f"{where}.coords", f"{entry['coords']} are not rank {i}'s {layout.coords(i)}"
        )
    name = rank_file_name(i, layout.world_size)
    if entry["file"] != name:
        raise _Invalid(f"{where}.file", f"{json.dumps(entry['file'])[:80]} must be {name!r}")
    if not _is_int(entry["bytes"]) or entry["bytes"] < 0:
        raise _Invalid(f"{where}.bytes", f"{entry['bytes']!r} is not a byte count")
    if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        raise _Invalid(f"{where}.sha256", "is not 64 lowercase hex digits")
    return RankEntry(**entry)


def manifest_from_json(data: Any) -> Manifest:
    """Check `data` (a parsed reshard.json) against the schema; raise _Invalid naming the field."""
    _expect(data, dict, "the manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise _Invalid(
            "format_version",
            f"{json.dumps(version)[:20]} is not supported (expected {FORMAT_VERSION}); "
            "re-run `reshard convert` to rewrite this checkpoint",
        )
    required = {"format_version", "layout", "mesh", "dtype", "source", "model_type", "config"}
    _expect_keys(data, required | {"params", "ranks"}, {"notes"}, "the manifest")
    try:
        layout = Layout.parse(_expect(data["layout"], str, "layout"))
    except ReshardError as e:
        raise _Invalid("layout", str(e)) from None
    if data["mesh"] != dict(layout.dims):
        raise _Invalid("mesh", f"{data['mesh']} is not layout {layout.name}'s {dict(layout.dims)}")
    if not isinstance(data["dtype"], str) or data["dtype"] not in CAST_DTYPES:
        raise _Invalid(
            "dtype", f"{json.dumps(data['dtype'])[:40]} is not one of {list(CAST_DTYPES)}"
        )
    for key, kind in (("source", dict), ("model_type", str), ("config", dict)):
        _expect(data[key], kind, key)
    notes = _expect(data.get("notes", []), list, "notes")
    if not all(isinstance(n, str) for n in notes):
        raise _Invalid("notes", "expected a list of strings")
    for name, entry in _expect(data["params"], dict, "params").items():
        _check_param(name, entry, layout)
    ranks = _expect(data["ranks"], list, "ranks")
    if len(ranks) != layout.world_size:
        raise _Invalid(
            "ranks", f"{len(ranks)} entries, layout {layout.name} has {layout.world_size}"
        )
    return Manifest(
        **{k: data[k] for k in required - {"format_version"}},
        params=data["params"],
        ranks=[_check_rank(i, entry, layout) for i, entry in enumerate(ranks)],
        notes=notes,
    )


def load_manifest(directory: str | Path) -> Manifest:
    """Read and check `reshard.json`; raise CheckpointError when the directory is not a finished,
    well-formed checkpoint."""
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
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a valid manifest ({e})") from e
    try:
        return manifest_from_json(data)
    except _Invalid as e:
        raise CheckpointError(f"{path}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a manifest") from None
