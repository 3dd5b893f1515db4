"""Fuzzing `reshard.json`: thousands of mutated manifests of a real converted checkpoint.

Only `CheckpointError` may escape `load_manifest` / `ShardedCheckpoint`: never another
exception and never a hang. Whatever is accepted must be usable: every rank's selection of
every parameter is computable, inside the global shape and of one local shape on all ranks;
the manifest survives its own `to_json` (what `reshard inspect --json` prints); and checking
the real rank files against it raises nothing but `CheckpointError`.

Mutations: values replaced, deleted or inserted at random JSON paths; strings from the
placement, layout and dtype grammars (and near misses of them); random ints where ints
belong; rank entries swapped; and the whole checkpoint moved to another layout with a
consistent mesh, ranks and (sometimes) placements, so the deep checks (placements per mesh
dim, divisibility, strided-shard math) are reached and many mutants are accepted.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reshard.checkpoint import ShardedCheckpoint
from reshard.converters.lazy import CAST_DTYPES, SAFETENSORS_DTYPES
from reshard.errors import CheckpointError, ReshardError
from reshard.layout import Layout
from reshard.manifest import load_manifest, manifest_from_json, rank_file_name
from reshard.placements import selection_shape
from reshard.plan import placements_for

FUZZ = settings(
    deadline=None,  # a hang is caught by _no_hang; a slow shared CI core is not a failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same inputs on every run: a failure is reproducible
    database=None,
)
HANG_S = 10

# --- values ----------------------------------------------------------------------------------

ints = st.one_of(
    st.integers(-3, 20), st.sampled_from([0, 1, 2, 3, 4, 16, 2**31, 2**63, 10**30, -(2**63)])
)
dims = st.one_of(st.integers(-4, 4), st.sampled_from([99, 10**20]))
placement_text = st.one_of(
    st.just("Replicate()"),
    st.builds("Shard({})".format, dims),
    st.builds("_StridedShard({}, split_factor={})".format, dims, st.integers(-1, 5) | ints),
    st.sampled_from(
        [
            "Shard(zero)",
            "Shard( 0)",
            "shard(0)",
            "Replicate",
            "Shard(0)\n",
            "Shard(\u0660)",
            "_StridedShard(1,split_factor=2)",
            "Shard(" + "9" * 5000 + ")",
        ]
    ),
    st.text(max_size=24),
)
layout_text = st.one_of(
    st.builds(
        lambda mesh, flags: "".join(f"{n}{s}" for n, s in mesh) + "".join(f"-{f}" for f in flags),
        st.lists(st.tuples(st.sampled_from(["dp", "ep", "tp"]), st.integers(0, 5)), max_size=3),
        st.lists(st.sampled_from(["sp", "tp2ep", "xx"]), max_size=2),
    ),
    st.sampled_from(["ep2tp2", "EP2TP2", " ep2tp2", "ep2tp2\n", "tp1", "tp" + "9" * 5000]),
    st.text(max_size=12),
)
dtype_text = st.one_of(
    st.sampled_from([*SAFETENSORS_DTYPES, "F128", "f32", "", "U16", "F4"]), st.text(max_size=6)
)
cast_text = st.one_of(st.sampled_from([*CAST_DTYPES, "int4", "BF16", ""]), st.text(max_size=6))
leaf = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    placement_text,
    layout_text,
    dtype_text,
    st.sampled_from(
        ["../x.safetensors", "/etc/passwd", "rank-00001-of-00004.safetensors", "0" * 64, "A" * 64]
    ),
)
json_value = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)

# --- mutations -------------------------------------------------------------------------------


def _paths(node, prefix=()) -> Iterator[tuple]:
    """Every JSON path in `node` (to dicts' values and lists' items)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _replace(m, where: tuple, value):
    if not where:
        return value
    parent = m
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    return m


def _delete(m, where: tuple):
    if where:
        parent = m
        for key in where[:-1]:
            parent = parent[key]
        if isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent.pop(where[-1])
    return m


def _field_paths(m) -> list[tuple]:
    """Paths of the fields the schema is about (a uniform pick over all paths would mostly land
    in `config`)."""
    out = [(k,) for k in ("format_version", "layout", "mesh", "dtype", "notes", "ranks")]
    params = m.get("params") if isinstance(m, dict) else None
    for name, entry in (params or {}).items() if isinstance(params, dict) else ():
        out.append(("params", name))
        if isinstance(entry, dict):
            for key, value in entry.items():
                out.append(("params", name, key))
                if isinstance(value, list):
                    out += [("params", name, key, i) for i in range(len(value))]
    ranks = m.get("ranks") if isinstance(m, dict) else None
    for i, entry in enumerate(ranks if isinstance(ranks, list) else ()):
        out.append(("ranks", i))
        if isinstance(entry, dict):
            out += [("ranks", i, key) for key in entry]
    present = set(_paths(m))
    return [p for p in out if p in present]


def _value_for(where: tuple, data: st.DataObject):
    """A value that is often almost right for the field at `where`."""
    last = where[-1] if where else None
    if "placements" in where:
        return data.draw(placement_text if isinstance(last, int) else st.lists(placement_text))
    if where[-1:] == ("layout",):
        return data.draw(layout_text)
    if where[-1:] == ("dtype",):
        return data.draw(cast_text if len(where) == 1 else dtype_text)
    if "shape" in where or last in ("bytes", "rank", "head_repeat", "format_version"):
        return data.draw(ints if isinstance(last, int) or last != "shape" else st.lists(ints))
    return data.draw(json_value)


def _relayout(m, text: str, with_placements: bool) -> None:
    """Move the manifest to layout `text` consistently: mesh, every rank entry and (optionally)
    every placement as convert would write them. Leaves `m` alone where it no longer fits."""
    try:
        layout = Layout.parse(text)
    except ValueError:
        return
    if layout.world_size > 64 or not isinstance(m, dict) or not isinstance(m.get("ranks"), list):
        return
    m["layout"], m["mesh"] = text, dict(layout.dims)
    old = [r for r in m["ranks"] if isinstance(r, dict)] or [{}]
    m["ranks"] = [
        {
            **old[i % len(old)],
            "rank": i,
            "coords": layout.coords(i),
            "file": rank_file_name(i, layout.world_size),
        }
        for i in range(layout.world_size)
    ]
    params = m.get("params")
    if not with_placements or not isinstance(params, dict):
        return
    for entry in params.values():
        with contextlib.suppress(TypeError, KeyError, ReshardError, ValueError):
            placements = placements_for(tuple(entry["styles"]), len(entry["shape"]), layout)
            entry["placements"] = [str(p) for p in placements]


def _mutate(m, data: st.DataObject):
    action = data.draw(
        st.sampled_from(["replace", "field", "field", "delete", "insert", "swap", "relayout"])
    )
    if action == "relayout":
        _relayout(m, data.draw(layout_text), data.draw(st.booleans()))
        return m
    if action == "swap":
        ranks = m.get("ranks") if isinstance(m, dict) else None
        if isinstance(ranks, list) and len(ranks) > 1:
            i, j = (data.draw(st.integers(0, len(ranks) - 1)) for _ in range(2))
            ranks[i], ranks[j] = ranks[j], ranks[i]
        return m
    if action == "field" and (fields := _field_paths(m)):
        where = data.draw(st.sampled_from(fields))
        return _replace(m, where, _value_for(where, data))
    where = data.draw(st.sampled_from(list(_paths(m))))
    if action == "delete":
        return _delete(m, where)
    if action == "insert":
        dicts = [p for p in _paths(m) if isinstance(_get(m, p), dict)]
        if dicts:
            target = _get(m, data.draw(st.sampled_from(dicts)))
            key = data.draw(
                st.sampled_from(["notes", "head_repeat", "extra", "rank"]) | st.text(max_size=6)
            )
            target[key] = data.draw(json_value)
        return m
    return _replace(m, where, data.draw(json_value))


def _get(m, where: tuple):
    for key in where:
        m = m[key]
    return m


# --- the property ----------------------------------------------------------------------------


@contextlib.contextmanager
def _no_hang(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_accepted(ckpt: ShardedCheckpoint) -> None:
    """An accepted manifest is usable by every reader."""
    layout = ckpt.layout
    for name, p in ckpt.params.items():
        local_shapes = set()
        for rank in range(layout.world_size):
            selection = ckpt.selection(name, rank)
            assert len(selection) == len(p.shape), name
            for ranges, size in zip(selection, p.shape):
                assert all(0 <= lo <= hi <= size for lo, hi in ranges), (name, rank, ranges)
            local_shapes.add(selection_shape(selection))
        assert len(local_shapes) == 1, (name, local_shapes)  # even shards, as the runtime needs
    again = manifest_from_json(json.loads(ckpt.manifest.to_json()))
    assert again == ckpt.manifest
    for rank in range(layout.world_size):  # the real files: refused by name, or they match
        with contextlib.suppress(CheckpointError):
            ckpt.check_rank_file(rank, hash=False)


@pytest.fixture(scope="module")
def manifest_dir(convert_tiny, tmp_path_factory) -> Path:
    return Path(shutil.copytree(convert_tiny("ep2tp2"), tmp_path_factory.mktemp("fuzz") / "m"))


def _run(directory: Path, manifest) -> str:
    path = directory / "reshard.json"
    original = path.read_bytes()
    try:
        path.write_text(json.dumps(manifest))
        with _no_hang(HANG_S):
            try:
                load_manifest(directory)
                ckpt = ShardedCheckpoint(directory)
            except CheckpointError as e:
                assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
                return "refused"
            _check_accepted(ckpt)
            return "accepted"
    finally:
        path.write_bytes(original)


@settings(FUZZ, max_examples=750)
@given(data=st.data())
def test_mutated_manifests_raise_only_checkpoint_error(manifest_dir, data):
    m = json.loads((manifest_dir / "reshard.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        m = _mutate(m, data)
    event(_run(manifest_dir, m))


@settings(FUZZ, max_examples=300)
@given(layout=layout_text, shapes=st.dictionaries(st.integers(0, 24), st.integers(0, 48)))
def test_relayouts_with_random_shapes(manifest_dir, layout, shapes):
    """Consistent moves to other layouts, with some shape dims changed: mostly accepted, so the
    'accepted means usable' half of the property is exercised on many meshes."""
    m = json.loads((manifest_dir / "reshard.json").read_text())
    _relayout(m, layout, with_placements=True)
    names = sorted(m["params"])
    for index, size in shapes.items():
        shape = m["params"][names[index % len(names)]]["shape"]
        if shape:
            shape[index % len(shape)] = size
    event(_run(manifest_dir, m))


@pytest.mark.parametrize("layout", ["tp4", "ep4", "dp2ep2", "tp2-sp", "ep2tp2-tp2ep", "tp1"])
def test_a_consistent_relayout_is_accepted(manifest_dir, layout):
    """The fuzzer's `_relayout` writes what convert would: accepted, so the fuzz reaches past the
    rank checks."""
    m = json.loads((manifest_dir / "reshard.json").read_text())
    _relayout(m, layout, with_placements=True)
    assert _run(manifest_dir, copy.deepcopy(m)) == "accepted"
