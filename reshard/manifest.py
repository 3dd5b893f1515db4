"""`reshard.json`: what a sharded checkpoint holds.

Written last, so a directory without it is never taken for a finished
checkpoint. Everything a loader needs is here: the layout, every parameter's
global shape, dtype, styles and placements, and every rank's file and hash.

Nothing in it is trusted: `load_manifest` checks the whole document against the
schema below before anything uses it (types, layout vs mesh, placements that
parse and fit their shapes on this mesh, dtypes, rank order and coordinates,
file names of the exact form `rank-NNNNN-of-NNNNN.safetensors`, or
`rank-NNNNN-of-NNNNN-part-K.safetensors` for a rank split into parts to stay under a
per-file size limit such as the Hub's), so a hand-edited
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
from reshard.placements import Placement, StridedShard, normalize, parse_placement
from reshard.plan import ParamPlan, check_divisible

FORMAT_VERSION = 3  # 3: ranks may be split into parts
READS = (2, 3)
MANIFEST = "reshard.json"


def rank_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def part_file_name(rank: int, world: int, part: int) -> str:
    """Part `part` (1-based) of a rank written as several files."""
    return f"rank-{rank:05d}-of-{world:05d}-part-{part}.safetensors"


@dataclass(kw_only=True)
class FileEntry:
    """One file of a rank: the whole rank (`tensors` None) or one part of it."""

    file: str
    bytes: int
    sha256: str
    tensors: list[str] | None = None


@dataclass(kw_only=True)
class RankEntry:
    rank: int
    coords: dict[str, int]
    files: list[FileEntry]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def file(self) -> str:
        """The rank's file name; for a rank in parts, the first part's and how many there are."""
        if len(self.files) == 1:
            return self.files[0].file
        return f"{self.files[0].file} (+{len(self.files) - 1} parts)"

    def to_json(self) -> dict:
        head = {"rank": self.rank, "coords": self.coords}
        if len(self.files) == 1:
            (f,) = self.files
            return {**head, "file": f.file, "bytes": f.bytes, "sha256": f.sha256}
        return {**head, "parts": [asdict(f) for f in self.files]}


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
    # FP8 weights kept as they were (reshard.converters.fp8.BlockFP8.record): format, block
    # size and {weight: its scale}; or MXFP4 ones (converters.mxfp4.MXFP4Plan.record):
    # {weight: its blocks}, {weight: its scales}; None (and absent from the JSON) otherwise.
    quantization: dict | None = None

    @property
    def parsed_layout(self) -> Layout:
        return Layout.parse(self.layout)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def param_plans(self) -> dict[str, ParamPlan]:
        return {name: param_plan_from_json(name, entry) for name, entry in self.params.items()}

    def to_json(self) -> str:
        data = asdict(self)
        data["ranks"] = [r.to_json() for r in self.ranks]
        if data["quantization"] is None:
            del data["quantization"]
        return json.dumps(data, indent=2) + "\n"


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

MAX_MANIFEST_BYTES = 256 * 2**20  # a 1T-parameter model's manifest is a few MB
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Sizes and counts must be exact in any JSON reader (I-JSON, RFC 7493); the shard math relies
# on it too (a dim of 10**30 split in two came out as two different local shapes).
MAX_JSON_INT = 2**53 - 1
_REQUIRED = {"format_version", "layout", "mesh", "dtype", "source", "model_type", "config"}
_PARAM_FIELDS = {"shape", "dtype", "styles", "placements"}
_RANK_FIELDS = {"rank", "coords", "file", "bytes", "sha256"}
_PARTS_FIELDS = {"rank", "coords", "parts"}
_PART_FIELDS = {"file", "bytes", "sha256", "tensors"}


class _Invalid(Exception):
    """One schema violation: where (a JSON path) and what."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


def _show(value: Any, limit: int = 60) -> str:
    """`value` for an error message: one line (control characters escaped), at most `limit` chars."""
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any, least: int = 0) -> bool:
    return _is_int(value) and least <= value <= MAX_JSON_INT


def _expect(value: Any, kind: type, where: str) -> Any:
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise _Invalid(where, f"expected {kind.__name__}, got {_show(value)}")
    return value


def _expect_strings(value: Any, where: str) -> list[str]:
    if not all(isinstance(s, str) for s in _expect(value, list, where)):
        raise _Invalid(where, "expected a list of strings")
    return value


def _expect_keys(obj: dict, required: set[str], optional: set[str], where: str) -> None:
    missing, unknown = sorted(required - set(obj)), sorted(set(obj) - required - optional)
    if missing:
        raise _Invalid(where, f"missing {', '.join(missing)}")
    if unknown:
        raise _Invalid(where, f"unknown field {', '.join(_show(k, 40) for k in unknown[:3])}")


def _expect_equal(value: Any, expected: Any, where: str, what: str) -> None:
    """Exactly `expected`, as JSON: same keys in the same order, ints not floats or booleans."""
    if json.dumps(value) != json.dumps(expected):
        raise _Invalid(where, f"{_show(value)} is not {what} {json.dumps(expected)}")


def _check_version(version: Any) -> None:
    if _is_int(version) and version in READS:
        return
    if _is_int(version) and version > FORMAT_VERSION:
        raise _Invalid(
            "format_version",
            f"{version} is newer than this reshard reads ({FORMAT_VERSION}); upgrade reshard",
        )
    raise _Invalid(
        "format_version",
        f"{_show(version, 20)} is an old or unknown format (this reshard reads "
        f"{' and '.join(map(str, READS))}); "
        "re-run `reshard convert` to rewrite this checkpoint",
    )


def _check_layout(text: Any) -> Layout:
    try:
        layout = Layout.parse(_expect(text, str, "layout"))
    except ValueError as e:  # LayoutError, or int() of a 5000-digit dim size
        raise _Invalid("layout", f"{_show(text)} does not parse ({str(e)[:100]})") from None
    if text != layout.name:  # convert writes the canonical name; rank file headers carry it too
        raise _Invalid(
            "layout", f"{_show(text)} is not in canonical form (reshard writes {layout.name!r})"
        )
    return layout


def _check_placement(text: Any, ndim: int, where: str) -> Placement:
    """One placement, as `str(placement)` writes it, resolved against a tensor of `ndim` dims."""
    try:
        placement = parse_placement(_expect(text, str, where))
    except ValueError:  # unknown form, or int() of a 5000-digit dim
        placement = None
    if placement is None or str(placement) != text:
        raise _Invalid(
            where,
            f"{_show(text)} is not a placement "
            "(Replicate(), Shard(d) or _StridedShard(d, split_factor=k))",
        )
    if isinstance(placement, StridedShard) and placement.split_factor < 1:
        raise _Invalid(where, f"{text}: split_factor must be at least 1")
    try:
        return normalize(placement, ndim)
    except ValueError as e:
        raise _Invalid(where, str(e)) from None


def _check_param(name: str, entry: Any, layout: Layout, cast_to: str | None) -> None:
    """One params entry: types, a dtype safetensors knows (and the --dtype cast, if any), one
    placement per mesh dim that fits the shape and divides it evenly on this layout."""
    where = f"params[{json.dumps(name)[:120]}]"  # json.dumps escapes: always one line
    if not name or not name.isprintable():
        raise _Invalid(where, "a parameter name must be non-empty and printable")
    _expect_keys(_expect(entry, dict, where), _PARAM_FIELDS, {"head_repeat"}, where)
    shape = _expect(entry["shape"], list, f"{where}.shape")
    if not all(_is_count(s) for s in shape):
        raise _Invalid(f"{where}.shape", f"{_show(shape)} is not a list of ints in [0, 2**53)")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _Invalid(f"{where}.dtype", f"{_show(dtype, 40)} is not a known dtype")
    # convert casts every float tensor to --dtype, and verify --against redoes that from this
    # record: a float of another dtype means the record is wrong.
    if cast_to and SAFETENSORS_DTYPES[dtype].is_floating_point and dtype != cast_to:
        raise _Invalid(
            f"{where}.dtype", f"{dtype}, but the manifest's dtype says every float is {cast_to}"
        )
    styles = _expect_strings(entry["styles"], f"{where}.styles")
    placements = _expect(entry["placements"], list, f"{where}.placements")
    if len(placements) != len(layout.mesh_dim_names):
        raise _Invalid(
            f"{where}.placements",
            f"{len(placements)} entries for layout {layout.name}'s "
            f"{len(layout.mesh_dim_names)} mesh dims {list(layout.mesh_dim_names)}",
        )
    parsed = tuple(
        _check_placement(text, len(shape), f"{where}.placements[{i}]")
        for i, text in enumerate(placements)
    )
    head_repeat = entry.get("head_repeat", 1)
    if not _is_count(head_repeat, least=1):
        raise _Invalid(f"{where}.head_repeat", f"{_show(head_repeat)} is not a positive int")
    plan = ParamPlan(
        name=name,
        shape=tuple(shape),
        dtype=SAFETENSORS_DTYPES[dtype],
        styles=tuple(styles),
        placements=parsed,
        head_repeat=head_repeat,
    )
    try:
        # Even shards on every mesh dim: then every rank's selection (the strided-shard math
        # included) is well defined and all ranks hold the same local shape.
        check_divisible(plan, layout)
    except ReshardError as e:
        raise _Invalid(f"{where}.placements", str(e)) from None


_QUANT_FIELDS = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "scales"}


def _check_quantization(q: Any, params: dict) -> None:
    """The FP8 record: block-scaled e4m3 with dynamic activations; every float8 parameter is a
    weight with exactly one scale, a float tensor of ceil(shape / block) on the last two dims,
    placed like its weight (then each rank's scales are exactly those of its weight blocks;
    `reshard convert` refuses layouts where that fails)."""
    where = "quantization"
    _expect_keys(_expect(q, dict, where), _QUANT_FIELDS, set(), where)
    for key, value in (("quant_method", "fp8"), ("fmt", "e4m3"), ("activation_scheme", "dynamic")):
        _expect_equal(q[key], value, f"{where}.{key}", "the only supported")
    block = _expect(q["weight_block_size"], list, f"{where}.weight_block_size")
    if len(block) != 2 or not all(_is_count(b, least=1) for b in block):
        raise _Invalid(f"{where}.weight_block_size", f"{_show(block)} is not [rows, cols]")
    scales = _expect(q["scales"], dict, f"{where}.scales")
    fp8 = {n for n, e in params.items() if e["dtype"].startswith("F8_")}
    if set(scales) != fp8:
        odd = sorted(fp8 ^ set(scales))[:3]
        raise _Invalid(
            f"{where}.scales", f"must name every float8 parameter, exactly: {_show(odd)}"
        )
    for weight, scale in scales.items():
        at = f"{where}.scales[{json.dumps(weight)[:120]}]"
        if not isinstance(scale, str) or scale not in params or scale in fp8:
            raise _Invalid(at, f"{_show(scale)} is not a float parameter")
        w, s = params[weight], params[scale]
        if len(w["shape"]) < 2 or not SAFETENSORS_DTYPES[s["dtype"]].is_floating_point:
            raise _Invalid(at, "a float8 weight has at least 2 dims and float scales")
        want = w["shape"][:-2] + [-(-n // b) for n, b in zip(w["shape"][-2:], block)]
        if s["shape"] != want:
            raise _Invalid(at, f"scale shape {_show(s['shape'])} is not {want} for {w['shape']}")
        if s["placements"] != w["placements"] or s.get("head_repeat") != w.get("head_repeat"):
            raise _Invalid(at, "a scale must be placed like its weight")
    if len(set(scales.values())) != len(scales):
        raise _Invalid(f"{where}.scales", "two weights share one scale")


def _check_file(where: str, entry: dict, name: str) -> None:
    if entry["file"] != name:
        raise _Invalid(f"{where}.file", f"{_show(entry['file'], 80)} must be {name!r}")
    if not _is_count(entry["bytes"]):
        raise _Invalid(f"{where}.bytes", f"{_show(entry['bytes'])} is not a byte count")
    if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
        raise _Invalid(
            f"{where}.sha256", f"{_show(entry['sha256'])} is not 64 lowercase hex digits"
        )


def _check_rank(i: int, entry: Any, layout: Layout, params: set[str]) -> RankEntry:
    """ranks[i] is rank i: its coordinates on the layout's mesh and its exact file names."""
    where = f"ranks[{i}]"
    _expect(entry, dict, where)
    if "parts" in entry:
        _expect_keys(entry, _PARTS_FIELDS, set(), where)
    else:
        _expect_keys(entry, _RANK_FIELDS, set(), where)
    if not _is_int(entry["rank"]) or entry["rank"] != i:
        raise _Invalid(f"{where}.rank", f"is {_show(entry['rank'], 20)}, must be {i}")
    _expect_equal(entry["coords"], layout.coords(i), f"{where}.coords", f"rank {i}'s coordinates")
    if "parts" not in entry:
        _check_file(where, entry, rank_file_name(i, layout.world_size))
        return RankEntry(
            rank=i,
            coords=entry["coords"],
            files=[FileEntry(file=entry["file"], bytes=entry["bytes"], sha256=entry["sha256"])],
        )
    parts = _expect(entry["parts"], list, f"{where}.parts")
    if len(parts) < 2:
        raise _Invalid(f"{where}.parts", f"{len(parts)} parts; a rank in parts has at least 2")
    files, seen = [], set()
    for k, part in enumerate(parts, start=1):
        at = f"{where}.parts[{k - 1}]"
        _expect_keys(_expect(part, dict, at), _PART_FIELDS, set(), at)
        _check_file(at, part, part_file_name(i, layout.world_size, k))
        tensors = _expect_strings(part["tensors"], f"{at}.tensors")
        for name in tensors:
            if name in seen:
                raise _Invalid(f"{at}.tensors", f"{_show(name)} is in two parts, or twice")
            seen.add(name)
        files.append(FileEntry(**{**part, "tensors": tensors}))
    if seen != params:
        missing, extra = sorted(params - seen), sorted(seen - params)
        raise _Invalid(
            f"{where}.parts", f"tensors missing {_show(missing[:3])}, unknown {_show(extra[:3])}"
        )
    return RankEntry(rank=i, coords=entry["coords"], files=files)


def manifest_from_json(data: Any) -> Manifest:
    """Check `data` (a parsed reshard.json) against the schema; raise _Invalid naming the field."""
    _expect(data, dict, "the manifest")
    if "format_version" in data:  # first: an old manifest lacks newer fields
        _check_version(data["format_version"])
    _expect_keys(data, _REQUIRED | {"params", "ranks"}, {"notes", "quantization"}, "the manifest")
    layout = _check_layout(data["layout"])
    _expect_equal(data["mesh"], dict(layout.dims), "mesh", f"layout {layout.name}'s mesh")
    if not isinstance(data["dtype"], str) or data["dtype"] not in CAST_DTYPES:
        raise _Invalid("dtype", f"{_show(data['dtype'], 40)} is not one of {list(CAST_DTYPES)}")
    cast_to = CAST_DTYPES[data["dtype"]]
    for key, kind in (("source", dict), ("model_type", str), ("config", dict)):
        _expect(data[key], kind, key)
    notes = _expect_strings(data.get("notes", []), "notes")
    for name, entry in _expect(data["params"], dict, "params").items():
        _check_param(name, entry, layout, cast_to and DTYPE_NAMES[cast_to])
    quantization = data.get("quantization")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "mxfp4":
        from reshard.converters.mxfp4 import record_problem

        problem = record_problem(quantization, data["params"])
        if problem:
            raise _Invalid(*problem)
    elif quantization is not None:
        _check_quantization(quantization, data["params"])
    ranks = _expect(data["ranks"], list, "ranks")
    if len(ranks) != layout.world_size:
        raise _Invalid(
            "ranks", f"{len(ranks)} entries, layout {layout.name} has {layout.world_size}"
        )
    return Manifest(
        **{k: data[k] for k in _REQUIRED - {"format_version"}},
        params=data["params"],
        ranks=[_check_rank(i, entry, layout, set(data["params"])) for i, entry in enumerate(ranks)],
        notes=notes,
        quantization=quantization,
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads keeps the last of two equal keys; a reader that kept the first would disagree."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid("the manifest", f"names {_show(key, 40)} twice in one object")
        out[key] = value
    return out


def load_manifest(directory: str | Path) -> Manifest:
    """Read and check `reshard.json`; raise CheckpointError, one line naming the field, unless
    `directory` is a finished, well-formed checkpoint.

    >>> load_manifest("tiny-ep2tp2").ranks[1].file
    'rank-00001-of-00004.safetensors'
    """
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: not a finished sharded checkpoint ({MANIFEST} is missing; "
            "was `reshard convert` interrupted?)"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CheckpointError(
            f"{path}: over {MAX_MANIFEST_BYTES:,} bytes, larger than any manifest (not a {MANIFEST}?)"
        )
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, an int of 5000 digits
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a manifest") from None
    except _Invalid as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        return manifest_from_json(data)
    except _Invalid as e:
        raise CheckpointError(f"{path}: {e}") from None
