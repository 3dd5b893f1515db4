"""Bad source checkpoints: each is one line naming the file and what is wrong, exit 1, no output
that looks finished. Oracle for the good case: safetensors' own `safe_open`.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers_cli import one_error_line, reshard_cmd
from safetensors import safe_open
from safetensors.torch import save_file

from reshard.errors import SourceError
from reshard.safetensors_header import read_header

FIRST = "model-00001-of-00002.safetensors"


def _raw_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _edit_header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        header, data = _raw_header(src / FIRST)
        change(header)
        _write_raw(src / FIRST, header, data)

    return damage


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _set_dtype(header: dict) -> None:
    header[_first_tensor(header)]["dtype"] = "U16"


def _shape_disagrees(header: dict) -> None:
    entry = header[_first_tensor(header)]
    entry["shape"] = [s * 2 for s in entry["shape"]]


def _offsets_past_eof(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    entry = header[last]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [entry["data_offsets"][0] + 4096, entry["data_offsets"][1] + 4096]
    assert entry["data_offsets"][1] - entry["data_offsets"][0] == size


def _overlap(header: dict) -> None:
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    a, b = header[names[0]], header[names[1]]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


def _header_length_past_eof(src: Path) -> None:
    path = src / FIRST
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])


def _header_length_huge(src: Path) -> None:
    path = src / FIRST
    path.write_bytes(struct.pack("<Q", 1 << 60) + path.read_bytes()[8:])


def _invalid_json(src: Path) -> None:
    _, data = _raw_header(src / FIRST)
    _write_raw(src / FIRST, b'{"a": [1, 2', data)


def _duplicate_key(src: Path) -> None:
    header, data = _raw_header(src / FIRST)
    name = _first_tensor(header)
    blob = json.dumps(header)[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    _write_raw(src / FIRST, blob.encode(), data)


def _index_names_a_missing_file(src: Path) -> None:
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))


def _index_names_a_file_outside(src: Path) -> None:
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))


def _index_misplaces_a_tensor(src: Path) -> None:
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(n for n, f in data["weight_map"].items() if f == FIRST)
    data["weight_map"][name] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))


def _tensor_in_two_files(src: Path) -> None:
    second = src / "model-00002-of-00002.safetensors"
    header, _ = _raw_header(src / FIRST)
    name = _first_tensor(header)
    with safe_open(str(src / FIRST), framework="pt") as f:
        moved = f.get_tensor(name)
    with safe_open(str(second), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, name: moved}, str(second))


def _pickle_only(src: Path) -> None:
    for f in src.glob("*.safetensors*"):
        f.unlink()
    # Bytes that would run code if unpickled: the tool must never open the file.
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")


def _config_a_list(src: Path) -> None:
    (src / "config.json").write_text("[1, 2]")


def _config_without_model_type(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    del config["model_type"]
    (src / "config.json").write_text(json.dumps(config))


# case -> (damage, fragments the one error line must contain). Truncated files, git-lfs
# pointers, a missing config and an unknown model_type are in test_cli_convert.py.
CASES = {
    "header length past EOF": (_header_length_past_eof, [FIRST, "runs past the end"]),
    "header length huge": (_header_length_huge, [FIRST, "larger than safetensors allows"]),
    "invalid JSON header": (_invalid_json, [FIRST, "header is not valid JSON"]),
    "duplicate header key": (_duplicate_key, [FIRST, "twice"]),
    "unsupported dtype": (
        _edit_header(_set_dtype),
        [FIRST, "dtype U16, which reshard does not support"],
    ),
    "dtype/shape vs bytes": (_edit_header(_shape_disagrees), [FIRST, "its data_offsets span"]),
    "offsets outside the file": (_edit_header(_offsets_past_eof), [FIRST, "holds only"]),
    "overlapping tensors": (_edit_header(_overlap), [FIRST, "overlap"]),
    "index names a missing file": (_index_names_a_missing_file, ["index.json", "missing"]),
    "index names a file outside": (_index_names_a_file_outside, ["index.json", "outside"]),
    "index misplaces a tensor": (_index_misplaces_a_tensor, ["index.json", "but it is in"]),
    "tensor in two files": (_tensor_in_two_files, ["is stored twice"]),
    "pickle weights only": (_pickle_only, ["pytorch_model.bin", "never unpickles"]),
    "config a JSON list": (_config_a_list, ["config.json", "expected a JSON object"]),
    "config without model_type": (_config_without_model_type, ["config.json", "no model_type"]),
}


def _reshard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*reshard_cmd(), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_source_is_one_line_and_writes_nothing_finished(tiny_dir, tmp_path, case):
    damage, fragments = CASES[case]
    src = Path(shutil.copytree(tiny_dir, tmp_path / "src"))
    damage(src)
    out = tmp_path / "out"
    # convert opens and plans exactly as `plan` does, then must write nothing that looks finished
    result = _reshard("convert", "--src", str(src), "--layout", "tp2", "--out", str(out))
    one_error_line(result.returncode, result.stderr, *fragments)
    assert not (out / "reshard.json").exists()
    assert not Path("/tmp/pwned").exists()


def test_read_header_agrees_with_safetensors(tmp_path):
    """Several dtypes, an empty tensor and metadata: what safe_open reports, read_header reports."""
    path = tmp_path / "mixed.safetensors"
    tensors = {
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "b.empty": torch.zeros(0, 4),
        "c.int": torch.arange(7, dtype=torch.int64),
        "d.bool": torch.tensor([True, False]),
        "e.fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "k": "v"})
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(header.tensors) == sorted(f.keys())
        assert header.metadata == f.metadata()
        for name in f.keys():
            info = header.tensors[name]
            assert info.dtype == f.get_tensor(name).dtype, name
            assert info.shape == tuple(f.get_slice(name).get_shape()), name
    raw, _ = _raw_header(path)
    for name, info in header.tensors.items():
        assert [info.start, info.stop] == raw[name]["data_offsets"], name


def test_read_header_error_type_is_chosen_by_the_caller(tmp_path):
    from reshard.errors import CheckpointError

    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(SourceError, match="too short"):
        read_header(path)
    with pytest.raises(CheckpointError, match="too short"):
        read_header(path, error=CheckpointError)
