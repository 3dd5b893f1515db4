"""The `reshard` command line as users run it (a subprocess through main()): errors and help.

Every bad input must give one clear `error: ...` line on stderr (plus the
RESHARD_DEBUG hint), a non-zero exit, no traceback, and must write nothing:
the plan is validated before the output directory is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cli import HINT
from safetensors.torch import load_file, save_file

from reshard.tiny import write_tiny_checkpoint

SCRIPT = Path(sys.executable).parent / "reshard"


def reshard(*args, script: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "reshard.cli"]
    return subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line != HINT]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# --- bad sources, built once ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-sources")

    def copy(name: str) -> Path:
        dst = root / name
        shutil.copytree(tiny_dir, dst)
        return dst

    no_config = copy("no-config")
    (no_config / "config.json").unlink()

    lfs = copy("lfs-pointer")
    (lfs / "model-00001-of-00002.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 813248\n"
    )

    unknown = copy("unknown-type")
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "mystery_moe"
    (unknown / "config.json").write_text(json.dumps(config))

    unmapped = copy("unmapped-key")
    file = unmapped / "model-00002-of-00002.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.0.mlp.shared_expert_gate.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(file), metadata={"format": "pt"})
    index = json.loads((unmapped / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.shared_expert_gate.weight"] = file.name
    (unmapped / "model.safetensors.index.json").write_text(json.dumps(index))

    truncated = copy("cut-short")  # no hint in the path itself
    file = truncated / "model-00002-of-00002.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    return {
        "no_config": no_config,
        "lfs": lfs,
        "unknown": unknown,
        "unmapped": unmapped,
        "truncated": truncated,
    }


# (source, layout, fragments the one error line must contain)
CONVERT_ERRORS = {
    "layout_does_not_parse": ("tiny:qwen3_moe", "ep4xp2", ["'ep4xp2' does not parse"]),
    "experts_not_divisible": (
        "tiny:qwen3_moe",
        "ep3",
        ["num_experts (16) is not divisible by ep (3)"],
    ),
    "experts_not_divisible_tp2ep": (
        "tiny:qwen3_moe",
        "ep4tp8-tp2ep",
        ["num_experts (16)", "(32)"],
    ),
    "heads_not_divisible": (
        "tiny:qwen3_moe",
        "tp3",
        ["num_attention_heads (8) is not divisible by tp (3)"],
    ),
    "source_missing": ("{tmp}/no/such/checkpoint", "tp2", ["no such directory"]),
    "no_config": ("{no_config}", "tp2", ["no config.json"]),
    "git_lfs_pointer": (
        "{lfs}",
        "tp2",
        ["model-00001-of-00002.safetensors", "git-lfs pointer"],
    ),
    "truncated": ("{truncated}", "tp2", ["model-00002-of-00002.safetensors"]),
    "unknown_model_type": ("{unknown}", "tp2", ["'mystery_moe' is not supported", "qwen3_moe"]),
    "unmapped_key": ("{unmapped}", "tp2", ["model.layers.0.mlp.shared_expert_gate.weight"]),
}


@pytest.mark.parametrize("case", sorted(CONVERT_ERRORS))
def test_convert_error_is_one_line_and_writes_nothing(case, bad, tmp_path):
    src, layout, fragments = CONVERT_ERRORS[case]
    src = src.format(tmp=tmp_path, **bad)
    out = tmp_path / "out"
    result = reshard("convert", "--src", src, "--layout", layout, "--out", out, "-q")
    assert_one_error_line(result, *fragments)
    assert result.stdout == ""
    assert not out.exists()  # validated before anything is written


def test_truncated_file_error_names_the_likely_cause(bad, tmp_path):
    result = reshard(
        "convert", "--src", bad["truncated"], "--layout", "tp2", "--out", tmp_path / "o"
    )
    assert_one_error_line(result, "model-00002-of-00002.safetensors", "truncated")


def test_out_that_is_an_unrelated_non_empty_dir_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = reshard("convert", "--src", "tiny:qwen3_moe", "--layout", "tp2", "--out", out)
    assert_one_error_line(result, str(out), "not empty and is not a reshard checkpoint")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_reading_a_dir_without_manifest_is_one_line(command, tmp_path):
    (tmp_path / "rank-00000-of-00002.safetensors").write_bytes(b"")
    result = reshard(command, tmp_path)
    assert_one_error_line(result, str(tmp_path), "reshard.json is missing")


def test_the_console_script_goes_through_main(tmp_path):
    result = reshard(
        "convert",
        "--src",
        "tiny:qwen3_moe",
        "--layout",
        "tp3",
        "--out",
        tmp_path / "o",
        script=True,
    )
    assert_one_error_line(result, "tp (3)")


def test_reshard_debug_gives_the_traceback(tmp_path):
    result = reshard(
        "convert",
        "--src",
        "tiny:qwen3_moe",
        "--layout",
        "ep3",
        "--out",
        tmp_path / "o",
        env={"RESHARD_DEBUG": "1"},
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "LayoutError" in result.stderr


@pytest.mark.parametrize("command", [[], ["convert"], ["plan"], ["verify"], ["inspect"]])
def test_help_has_examples(command):
    result = reshard(*command, "--help", script=True)
    assert result.returncode == 0, result.stderr
    assert "Examples" in result.stdout
    assert "reshard " in result.stdout.split("Examples", 1)[1]


def test_no_daemon_thread_outlives_a_command(tmp_path):
    """A daemon thread woken while the interpreter finalizes crashes CPython 3.11 (SIGSEGV in
    take_gil, after the command's work is done: a finished `convert` exited -11). tqdm's
    monitor thread, started by any bar, even a disabled one (--quiet), is woken by tqdm's own
    exit handler and left to race the finalization. The oracle is the interpreter's own list
    of threads once the command has returned."""
    probe = (
        "import sys, threading\n"
        "from reshard.cli import main\n"
        "sys.argv = ['reshard', *sys.argv[1:]]\n"
        "main()\n"
        "print('daemon threads:', sorted(t.name for t in threading.enumerate() if t.daemon))\n"
    )
    src, out = tmp_path / "src", tmp_path / "out"
    write_tiny_checkpoint("qwen3_moe", src)
    for args in (
        ["convert", "--src", str(src), "--layout", "ep2tp2", "--out", str(out), "-q"],
        ["verify", str(out), "--against", str(src), "-q"],
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert "daemon threads: []" in done.stdout, (args[0], done.stdout)
