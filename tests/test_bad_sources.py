"""Bad source checkpoints: each is one line naming the file and what is wrong, exit 1, no output
that looks finished. Oracle for the good case: safetensors' own `safe_open`.

Each case damages a copy of the tiny checkpoint for real and runs the installed `reshard`
command on it. Truncated data, git-lfs pointers, a missing config.json and an unknown
model_type for `convert` are in test_cli_convert.py.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers_cli import one_error_line, run_reshard, run_reshard_in_process
from safetensors import safe_open
from safetensors.torch import save_file

from reshard.errors import CheckpointError, SourceError
from reshard.safetensors_header import read_header
from reshard.sources import open_source

FIRST = "model-00001-of-00002.safetensors"
SECOND = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"

# --- building damaged files -----------------------------------------------------------------------


def _raw_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(path: Path, header: dict | list | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _edit_header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """A damage that edits the parsed header of the first weight file and writes it back."""

    def damage(src: Path) -> None:
        header, data = _raw_header(src / FIRST)
        change(header)
        _write_raw(src / FIRST, header, data)

    return damage


def _edit_index(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        index = json.loads((src / INDEX).read_text())
        change(index["weight_map"])
        (src / INDEX).write_text(json.dumps(index))

    return damage


def _tensor_names(header: dict) -> list[str]:
    return sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )


def _first_tensor(header: dict) -> str:
    return _tensor_names(header)[0]


def _entry(header: dict) -> dict:
    return header[_first_tensor(header)]


def _rename_first(header: dict, new_name: str, dtype: str) -> None:
    entry = header.pop(_first_tensor(header))
    header[new_name] = {**entry, "dtype": dtype}


def _shape_disagrees(header: dict) -> None:
    _entry(header)["shape"] = [s * 2 for s in _entry(header)["shape"]]


def _offsets_past_eof(header: dict) -> None:
    entry = header[_tensor_names(header)[-1]]
    entry["data_offsets"] = [o + 4096 for o in entry["data_offsets"]]  # same size, further out


def _overlap(header: dict) -> None:
    a, b = (header[name] for name in _tensor_names(header)[:2])
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


def _file_bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        (src / FIRST).write_bytes(change((src / FIRST).read_bytes()))

    return damage


def _header_bytes(blob: bytes) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        _write_raw(src / FIRST, blob, _raw_header(src / FIRST)[1])

    return damage


def _duplicate_key(src: Path) -> None:
    header, data = _raw_header(src / FIRST)
    name = _first_tensor(header)
    blob = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
    _write_raw(src / FIRST, blob.encode(), data)


def _tensor_in_two_files(src: Path) -> None:
    name = _first_tensor(_raw_header(src / FIRST)[0])
    with safe_open(str(src / FIRST), framework="pt") as f:
        moved = f.get_tensor(name)
    with safe_open(str(src / SECOND), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, name: moved}, str(src / SECOND))


class _Pwn:
    """Pickles to code that creates a file when unpickled: the tool must never open it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_only(src: Path) -> None:
    for f in src.glob("*.safetensors*"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Pwn(src / "pwned")))


def _index_names_pickle(src: Path) -> None:
    _pickle_only(src)
    (src / INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": "pytorch_model.bin"}}))


def _first_key(weight_map: dict) -> str:
    return next(iter(weight_map))


def _index_misplaces(weight_map: dict) -> None:
    name = next(n for n, f in weight_map.items() if f == FIRST)
    weight_map[name] = SECOND


def _index_omits(weight_map: dict) -> None:
    del weight_map["lm_head.weight"]


def _text(name: str, text: str) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        (src / name).write_text(text)

    return damage


def _config_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        change(config)
        (src / "config.json").write_text(json.dumps(config))

    return damage


# case -> (damage, fragments the one error line must contain)
CASES = {
    # the header of a weight file
    "empty file": (_file_bytes(lambda raw: b""), [FIRST, "0 bytes, too short"]),
    "shorter than 8 bytes": (_file_bytes(lambda raw: raw[:5]), [FIRST, "5 bytes, too short"]),
    "header length past EOF": (
        _file_bytes(lambda raw: struct.pack("<Q", len(raw) * 2) + raw[8:]),
        [FIRST, "runs past the end"],
    ),
    "header length huge": (
        _file_bytes(lambda raw: struct.pack("<Q", 1 << 60) + raw[8:]),
        [FIRST, "larger than safetensors allows"],
    ),
    "header not JSON": (_header_bytes(b'{"a": [1, 2'), [FIRST, "header is not valid JSON"]),
    "header not UTF-8": (_header_bytes(b'{"\xff": 1}'), [FIRST, "header is not valid JSON"]),
    "header a JSON list": (
        _header_bytes(b"[1, 2]"),
        [FIRST, "header is a JSON list, not an object"],
    ),
    "duplicate header key": (_duplicate_key, [FIRST, "twice"]),
    "metadata not strings": (
        _edit_header(lambda h: h.update({"__metadata__": {"format": 1}})),
        [FIRST, "__metadata__ must map strings to strings"],
    ),
    "entry with an extra field": (
        _edit_header(lambda h: _entry(h).update(offset=0)),
        [FIRST, "lm_head.weight", "exactly dtype, shape and data_offsets"],
    ),
    "entry without dtype": (
        _edit_header(lambda h: _entry(h).pop("dtype")),
        [FIRST, "lm_head.weight", "exactly dtype, shape and data_offsets"],
    ),
    "unsupported dtype": (
        _edit_header(lambda h: _entry(h).update(dtype="U16")),
        [FIRST, "tensor lm_head.weight has dtype U16, which reshard does not support", "BF16"],
    ),
    "unsupported dtype, name with a newline": (
        _edit_header(lambda h: _rename_first(h, "lm_head\nweight", "U16")),
        [FIRST, "tensor 'lm_head\\nweight' has dtype U16"],
    ),
    "name with a lone surrogate": (
        _edit_header(lambda h: _rename_first(h, "lm_head.\ud800", "F32")),
        [FIRST, "'lm_head.\\ud800' is not valid UTF-8"],
    ),
    "negative dim": (
        _edit_header(lambda h: _entry(h).update(shape=[-1, 64])),
        [FIRST, "lm_head.weight", "shape [-1, 64] is not a list of non-negative ints"],
    ),
    "offsets reversed": (
        _edit_header(lambda h: _entry(h)["data_offsets"].reverse()),
        [FIRST, "lm_head.weight", "data_offsets [98304, 0] are not [start, stop]"],
    ),
    "dtype/shape vs bytes": (
        _edit_header(_shape_disagrees),
        [FIRST, "lm_head.weight", "dtype/shape say 393,216 bytes", "data_offsets say 98,304"],
    ),
    "offsets past the end of the file": (
        _edit_header(_offsets_past_eof),
        [FIRST, "the header needs", "but the file has", "truncated download?"],
    ),
    "overlapping tensors": (_edit_header(_overlap), [FIRST, "overlap"]),
    "bytes after the last tensor": (
        _file_bytes(lambda raw: raw + bytes(16)),
        [FIRST, "16 bytes after the last tensor belong to no tensor"],
    ),
    # the index and the files together
    "index not JSON": (_text(INDEX, "{"), [INDEX, "cannot read JSON"]),
    "index weight_map a list": (
        _text(INDEX, '{"weight_map": ["a"]}'),
        [INDEX, "weight_map must map tensor names to file names"],
    ),
    "index weight_map values not strings": (
        _edit_index(lambda m: m.update({_first_key(m): 1})),
        [INDEX, "weight_map must map tensor names to file names"],
    ),
    "index names a missing file": (
        _edit_index(lambda m: m.update({_first_key(m): "model-00009-of-00009.safetensors"})),
        [INDEX, "missing: model-00009-of-00009.safetensors"],
    ),
    "index names a file outside": (
        _edit_index(lambda m: m.update({_first_key(m): "../elsewhere.safetensors"})),
        [INDEX, "'../elsewhere.safetensors', which is outside"],
    ),
    "index names an absolute path": (
        _edit_index(lambda m: m.update({_first_key(m): "/etc/passwd.safetensors"})),
        [INDEX, "'/etc/passwd.safetensors', which is outside"],
    ),
    "index names pickle weights": (
        _index_names_pickle,
        [INDEX, "pytorch_model.bin", "never unpickles"],
    ),
    "index misplaces a tensor": (
        _edit_index(_index_misplaces),
        [INDEX, f"in {SECOND}, but it is in {FIRST}"],
    ),
    "index lists a tensor no file holds": (
        _edit_index(lambda m: m.update({"model.ghost.weight": FIRST})),
        [INDEX, f"lists model.ghost.weight in {FIRST}, which does not hold it"],
    ),
    "files hold a tensor the index omits": (
        _edit_index(_index_omits),
        [INDEX, "does not list 1 tensor(s) stored in its files: lm_head.weight"],
    ),
    "tensor in two files": (_tensor_in_two_files, ["lm_head.weight is stored twice", SECOND]),
    "pickle weights only": (_pickle_only, ["pytorch_model.bin", "never unpickles"]),
    # config.json
    "config a JSON list": (
        _text("config.json", "[1, 2]"),
        ["config.json", "expected a JSON object"],
    ),
    "config not JSON": (_text("config.json", "{"), ["config.json", "cannot read JSON"]),
    "config without model_type": (
        _config_edit(lambda c: c.pop("model_type")),
        ["config.json", "no model_type"],
    ),
}


# Run through the installed command, a new process each; the other cases call the same entry
# point in this process (CI time: each process costs an `import torch`).
IN_A_PROCESS_OF_ITS_OWN = {
    "header not JSON",
    "unsupported dtype",
    "index names a file outside",
    "pickle weights only",
    "config without model_type",
}


def _damaged(tiny_dir: Path, tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    damage, fragments = CASES[case]
    src = Path(shutil.copytree(tiny_dir, tmp_path / "src"))
    damage(src)
    return src, fragments


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_source_is_one_line_and_writes_nothing_finished(tiny_dir, tmp_path, case):
    src, fragments = _damaged(tiny_dir, tmp_path, case)
    out = tmp_path / "out"
    # convert opens and plans exactly as `plan` does, then must write nothing that looks finished
    args = ("convert", "--src", str(src), "--layout", "tp2", "--out", str(out))
    if case in IN_A_PROCESS_OF_ITS_OWN:
        result = run_reshard(*args, timeout=120)
    else:
        result = run_reshard_in_process(*args)
    one_error_line(result.returncode, result.stderr, *fragments)
    assert not (out / "reshard.json").exists()
    assert not (src / "pwned").exists()


@pytest.mark.parametrize("case", ["unsupported dtype", "index names a file outside"])
def test_plan_gives_the_same_one_line(tiny_dir, tmp_path, case):
    src, fragments = _damaged(tiny_dir, tmp_path, case)
    result = run_reshard("plan", "--src", str(src), "--layout", "tp2", timeout=120)
    one_error_line(result.returncode, result.stderr, *fragments)


def test_plan_with_an_unknown_model_type_is_one_line(tiny_dir, tmp_path):
    src = Path(shutil.copytree(tiny_dir, tmp_path / "src"))
    _config_edit(lambda c: c.update(model_type="mystery_moe"))(src)
    result = run_reshard("plan", "--src", str(src), "--layout", "tp2", timeout=120)
    one_error_line(result.returncode, result.stderr, "'mystery_moe' is not supported")


# --- reading tensor data after the headers were checked ---------------------------------------------


def _a_tensor_of(source, file: str):
    return next(t for t in source.tensors.values() if Path(t.path).name == file)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:100]), id="truncated"),
        pytest.param(lambda p: save_file({"x": torch.zeros(1)}, str(p)), id="other tensors"),
        pytest.param(lambda p: p.unlink(), id="deleted"),
    ],
)
def test_a_file_changed_after_opening_is_a_source_error_naming_file_and_tensor(
    tiny_dir, tmp_path, change
):
    src = Path(shutil.copytree(tiny_dir, tmp_path / "src"))
    tensor = _a_tensor_of(open_source(str(src)), SECOND)
    change(src / SECOND)
    with pytest.raises(SourceError) as caught:
        tensor.materialize()
    message = str(caught.value)
    assert SECOND in message and f"cannot read tensor {tensor.name}" in message, message
    assert "git-lfs" not in message and "\n" not in message, message


# --- read_header against safetensors itself ---------------------------------------------------------


def test_read_header_agrees_with_safetensors(tmp_path):
    """Several dtypes, an empty tensor and metadata: what safe_open reports, read_header reports."""
    path = tmp_path / "mixed.safetensors"
    tensors = {
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "b.empty": torch.zeros(0, 4),
        "c.int": torch.arange(7, dtype=torch.int64),
        "d.bool": torch.tensor([True, False]),
        "e.fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "f.scalar": torch.tensor(2.5, dtype=torch.float16),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "k": "v"})
    header = read_header(path)
    raw_header, _ = _raw_header(path)
    assert header.data_start == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert list(header.tensors) == [k for k in raw_header if k != "__metadata__"]  # file order
    with safe_open(str(path), framework="pt") as f:
        assert sorted(header.tensors) == sorted(f.keys())
        assert header.metadata == f.metadata()
        for name in f.keys():
            info = header.tensors[name]
            assert info.dtype == f.get_tensor(name).dtype == tensors[name].dtype, name
            assert info.shape == tuple(f.get_slice(name).get_shape()), name
            assert [info.start, info.stop] == raw_header[name]["data_offsets"], name


def _header_file(tmp_path: Path, blob: str, data_bytes: int) -> Path:
    path = tmp_path / "edge.safetensors"
    _write_raw(path, blob.encode(), bytes(data_bytes))
    return path


# Headers Python's json reads but safetensors (serde_json, usize, checked products) refuses.
EDGE_HEADERS = {
    "lone surrogate name": (
        '{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        4,
    ),
    "reversed surrogate pair": (
        '{"\\ude00\\ud83d": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        4,
    ),
    "lone surrogate in metadata": ('{"__metadata__": {"a": "\\udc00"}}', 0),
    "-0 is a float to serde": ('{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', 0),
    "dim past u64": (
        '{"a": {"dtype": "F32", "shape": [0, 18446744073709551616], "data_offsets": [0, 0]}}',
        0,
    ),
    "shape product overflows before a zero": (
        '{"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}}',
        0,
    ),
    "byte count overflows": (
        '{"a": {"dtype": "F64", "shape": [4611686018427387904], "data_offsets": [0, 0]}}',
        0,
    ),
    "gap between tensors": ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', 8),
}


@pytest.mark.parametrize("case", sorted(EDGE_HEADERS))
def test_read_header_refuses_what_safetensors_refuses(tmp_path, case):
    path = _header_file(tmp_path, *EDGE_HEADERS[case])
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own untyped errors
        safe_open(str(path), framework="pt")
    with pytest.raises(SourceError, match=r"^\S*edge\.safetensors: [^\n]+$"):
        read_header(path)


def test_read_header_accepts_what_safetensors_accepts_at_the_edges(tmp_path):
    """The largest dim torch can hold next to a zero, a zero-size tensor at the end, padding."""
    blob = (
        '{"a": {"dtype": "F32", "shape": [0, 9223372036854775807], "data_offsets": [0, 0]}, '
        '"b": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}, '
        '"c": {"dtype": "I8", "shape": [0], "data_offsets": [4, 4]}}    '
    )
    path = _header_file(tmp_path, blob, 4)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b", "c"]
        assert f.get_tensor("a").shape == (0, 2**63 - 1)
    header = read_header(path)
    assert header.tensors["a"].shape == (0, 2**63 - 1)
    assert [(t.start, t.stop) for t in header.tensors.values()] == [(0, 0), (0, 4), (4, 4)]


def test_read_header_refuses_a_dim_safetensors_lists_but_torch_cannot_make(tmp_path):
    blob = '{"a": {"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [0, 0]}}'
    path = _header_file(tmp_path, blob, 0)
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["a"]  # listed, yet get_tensor fails in torch
        with pytest.raises(Exception):  # noqa: B017 - whatever torch raises
            f.get_tensor("a")
    with pytest.raises(SourceError, match=r"tensor a: shape .* has a dim beyond torch's int64"):
        read_header(path)


def test_read_header_error_type_is_chosen_by_the_caller(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(SourceError, match="too short"):
        read_header(path)
    with pytest.raises(CheckpointError, match="too short"):
        read_header(path, error=CheckpointError)
