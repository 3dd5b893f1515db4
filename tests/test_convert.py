"""`reshard convert` end to end: files, manifest, side files, dtype, workers, resume, verify, plan, inspect.

Sources: the built-in tiny checkpoint and checkpoints written by transformers'
`save_pretrained` (one file, and an index over several). Oracles: transformers'
`named_parameters()`, safetensors for every file written, hashlib for the hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers_files import count_hashing, evict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reshard.cli import cli

transformers = pytest.importorskip("transformers")

SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


# --- helpers -------------------------------------------------------------------------------------


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rank_names(world: int) -> list[str]:
    return [f"rank-{r:05d}-of-{world:05d}.safetensors" for r in range(world)]


def header(path: Path) -> tuple[int, dict]:
    """Offset of the data section and the parsed header of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def shard_local(full: torch.Tensor, placements: list[str], mesh_shape, coords) -> torch.Tensor:
    """DTensor's local shard, spelled out with torch.chunk (placements as the manifest writes them)."""
    t = full
    for text, n, r in zip(placements, mesh_shape, coords):
        if m := re.fullmatch(r"Shard\((\d+)\)", text):
            d = int(m[1])
            assert t.shape[d] % n == 0
            t = torch.chunk(t, n, d)[r]
        elif m := re.fullmatch(r"_StridedShard\((\d+), split_factor=(\d+)\)", text):
            d, k = int(m[1]), int(m[2])
            t = torch.cat([block.chunk(n, d)[r] for block in t.chunk(k, d)], d)
        else:
            assert text == "Replicate()", text
    return t


def check_rank_files(out: Path, params: dict[str, torch.Tensor], dtype=None) -> None:
    """Every rank file opens with safetensors, holds exactly `params`' names, each the right shard."""
    manifest = json.loads((out / "reshard.json").read_text())
    mesh_names, mesh_shape = list(manifest["mesh"]), list(manifest["mesh"].values())
    for entry in manifest["ranks"]:
        coords = [entry["coords"][d] for d in mesh_names]
        with safe_open(str(out / entry["file"]), framework="pt") as f:
            assert sorted(f.keys()) == sorted(params)
            for name, full in params.items():
                if dtype is not None:
                    full = full.to(dtype)
                want = shard_local(full, manifest["params"][name]["placements"], mesh_shape, coords)
                got = f.get_tensor(name)
                assert got.dtype == want.dtype and got.shape == want.shape, (entry["rank"], name)
                assert torch.equal(got, want), (entry["rank"], name)


# --- the main conversion: tiny:qwen3_moe -> ep2tp2 through the CLI -------------------------------


@pytest.fixture(scope="module")
def out(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-ep2tp2"
    result = run("convert", "--src", "tiny:qwen3_moe", "--layout", "ep2tp2", "--out", out)
    assert "wrote 4 rank files" in result.output
    return out


def test_output_holds_exactly_the_rank_files_and_side_files(out):
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert sorted(n for n in files if n.endswith(".safetensors")) == rank_names(4)
    assert {"reshard.json", "README.md", *SIDE_FILES} <= files
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_manifest_fields(out, tiny_dir, hf_params):
    m = json.loads((out / "reshard.json").read_text())
    assert m["format_version"] == 3
    assert m["dtype"] == "keep"
    assert m["source"]["spec"] == "tiny:qwen3_moe"
    assert m["source"]["files"] == {
        f.name: sha256(f) for f in sorted(tiny_dir.glob("*.safetensors"))
    }
    assert m["model_type"] == "qwen3_moe"
    assert m["config"] == json.loads((tiny_dir / "config.json").read_text())
    assert m["layout"] == "ep2tp2"
    assert m["mesh"] == {"ep": 2, "tp": 2}
    assert list(m["params"]) == list(hf_params)
    for name, p in m["params"].items():
        assert p["shape"] == list(hf_params[name].shape), name
        assert p["dtype"] == "F32", name
    styles = {name: p["styles"] for name, p in m["params"].items()}
    assert styles["model.embed_tokens.weight"] == ["embedding"]
    assert styles["model.layers.0.self_attn.q_proj.weight"] == ["colwise"]
    assert styles["model.layers.1.self_attn.o_proj.weight"] == ["rowwise"]
    assert styles["model.layers.0.mlp.gate.weight"] == ["replicate"]
    assert styles["model.layers.0.self_attn.k_norm.weight"] == ["replicate"]
    assert styles["model.layers.1.mlp.experts.gate_up_proj"] == [
        "grouped_gemm",
        "moe_tp_gate_up_colwise",
    ]
    assert styles["model.layers.1.mlp.experts.down_proj"] == ["grouped_gemm", "moe_tp_down_rowwise"]
    assert styles["lm_head.weight"] == ["colwise_gather_output"]
    placements = m["params"]["model.layers.0.mlp.experts.gate_up_proj"]["placements"]
    assert placements == ["Shard(0)", "_StridedShard(1, split_factor=2)"]
    assert [r["rank"] for r in m["ranks"]] == [0, 1, 2, 3]
    for r in m["ranks"]:
        path = out / r["file"]
        assert r["file"] == rank_names(4)[r["rank"]]
        assert r["coords"] == {"ep": r["rank"] // 2, "tp": r["rank"] % 2}
        assert r["bytes"] == path.stat().st_size
        assert r["sha256"] == sha256(path)


def test_side_files_are_copied(out, tiny_dir):
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_readme_has_the_layout_table(out):
    readme = (out / "README.md").read_text()
    assert "ep2tp2" in readme
    rows = [line for line in readme.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 4
    for rank, row in enumerate(rows):
        ep, tp = rank // 2, rank % 2
        assert f"| {rank} | ep={ep}, tp={tp} | {ep * 8}-{ep * 8 + 7} |" in row
        assert rank_names(4)[rank] in row


def test_rank_files_hold_the_transformers_parameters(out, hf_params):
    check_rank_files(out, hf_params)


def test_rank_files_carry_layout_metadata(out):
    for rank, name in enumerate(rank_names(4)):
        with safe_open(str(out / name), framework="pt") as f:
            meta = f.metadata()
        assert meta["reshard_layout"] == "ep2tp2" and meta["reshard_rank"] == str(rank)


def test_verify_against_the_source_passes(out):
    result = run("verify", out, "--against", "tiny:qwen3_moe")
    assert "25 tensors bit-exact" in result.output


# --- checkpoints written by transformers ---------------------------------------------------------


@pytest.fixture(scope="module")
def hf_written(tmp_path_factory, tiny_dir):
    """Qwen3MoeForCausalLM(config).save_pretrained(): one file, and several files with an index."""
    config = transformers.Qwen3MoeConfig.from_pretrained(str(tiny_dir))
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct values everywhere, norms included
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    root = tmp_path_factory.mktemp("hf-written")
    model.save_pretrained(str(root / "single"))
    model.save_pretrained(str(root / "sharded"), max_shard_size="200KB")
    assert [p.name for p in (root / "single").glob("*.safetensors")] == ["model.safetensors"]
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2
    return root, params


@pytest.mark.parametrize("kind, layout", [("single", "ep2tp2"), ("sharded", "tp4-tp2ep")])
def test_transformers_written_checkpoint(kind, layout, hf_written, tmp_path):
    root, params = hf_written
    src = root / kind
    out = tmp_path / "out"
    run("convert", "--src", src, "--layout", layout, "--out", out)
    m = json.loads((out / "reshard.json").read_text())
    assert m["source"]["files"] == {f.name: sha256(f) for f in src.glob("*.safetensors")}
    assert sorted(m["params"]) == sorted(params)
    check_rank_files(out, params)
    run("verify", out, "--against", src)


# --- options -------------------------------------------------------------------------------------


def test_dtype_choices_are_the_cast_dtypes():
    from reshard.cli import convert
    from reshard.converters.lazy import CAST_DTYPES

    option = next(p for p in convert.params if p.name == "dtype")
    assert list(option.type.choices) == list(CAST_DTYPES)


def test_dtype_bf16(tmp_path, hf_params):
    out = tmp_path / "bf16"
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "tp2", "--out", out, "--dtype", "bf16")
    m = json.loads((out / "reshard.json").read_text())
    assert {p["dtype"] for p in m["params"].values()} == {"BF16"}
    assert m["dtype"] == "bf16"
    check_rank_files(out, hf_params, dtype=torch.bfloat16)
    run("verify", out, "--against", "tiny:qwen3_moe")
    # verify --against converts the source with the recorded --dtype, it does not guess it
    (out / "reshard.json").write_text(json.dumps(dict(m, dtype="keep")))
    result = run("verify", out, "--against", "tiny:qwen3_moe", ok=False)
    assert result.exit_code == 1
    assert "differs from the source" in result.output


def assert_same_rank_files(got: Path, want: Path) -> None:
    """The same four rank files, byte for byte, and the same manifest entries for them."""
    for name in rank_names(4):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    ranks = json.loads((want / "reshard.json").read_text())["ranks"]
    assert json.loads((got / "reshard.json").read_text())["ranks"] == ranks


def test_workers_2_writes_the_same_bytes_as_workers_1(out, tmp_path):
    out2 = tmp_path / "w2"
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "ep2tp2", "--out", out2, "--workers", 2)
    assert_same_rank_files(out2, out)


def test_one_worker_still_writes_the_tp_ranks_together(out, tmp_path, monkeypatch):
    """The TP ranks of a column slice share one read of its rows only while they are written
    at the same time, so files are written MAX_FILES at once whatever --workers says (the
    number of I/O threads): before, one worker wrote one file at a time."""
    import reshard.engine as engine

    started, together = [], threading.Barrier(4, timeout=30)
    real = engine._write_file

    def write_file(job, *args):
        started.append(job.path.name)
        together.wait()  # breaks (BrokenBarrierError) unless all four files are in flight
        return real(job, *args)

    monkeypatch.setattr(engine, "_write_file", write_file)
    out1 = tmp_path / "w1"
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "ep2tp2", "--out", out1, "--workers", 1)
    assert len(started) == 4
    assert_same_rank_files(out1, out)


def test_one_worker_keeps_several_writes_in_flight(out, tmp_path, monkeypatch):
    """A direct write waits for the disk. The threads that fill blocks hand them to writer
    threads, so the disk has several blocks to write even with one --workers thread: before,
    the thread that filled a block also wrote it, and a 2-core machine had two writes in
    flight at most while its cores waited."""
    import reshard.engine as engine

    lock, flight = threading.Lock(), {"now": 0, "most": 0}
    real = engine._Output.write

    def slow_write(self, *args):
        with lock:
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])
        time.sleep(0.02)  # a disk that takes its time
        try:
            return real(self, *args)
        finally:
            with lock:
                flight["now"] -= 1

    monkeypatch.setattr(engine._Output, "write", slow_write)
    monkeypatch.setattr(engine, "BLOCK", 4 * engine.ALIGN)
    out1 = tmp_path / "w1"
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "ep2tp2", "--out", out1, "--workers", 1)
    assert flight["most"] >= 2, flight
    assert_same_rank_files(out1, out)


def _refuse_direct_io(monkeypatch, at: str) -> None:
    """A file system without direct I/O: EINVAL at open (tmpfs) or only at the first write."""
    import errno
    import fcntl

    real_open, real_pwrite = os.open, os.pwrite

    def refusing_open(path, flags, *args, **kwargs):
        if at == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *args, **kwargs)

    def refusing_pwrite(fd, data, offset):
        if at == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)


@pytest.mark.parametrize("how", ["buffered", "refused at open", "refused at write", "small blocks"])
def test_every_way_of_writing_gives_the_same_bytes(how, out, tmp_path, monkeypatch):
    """Direct I/O (the `out` fixture, on Linux), buffered writes, a file system that refuses
    O_DIRECT at open or only at the first write, and blocks so small that computed segments
    (column slices) straddle them: the same files, each computed segment computed once."""
    import reshard.engine as engine
    from reshard.converters.lazy import Computed

    computed: dict[int, list] = {}  # id -> [the segment, kept alive so ids stay unique; calls]
    if how == "buffered":
        monkeypatch.setattr(engine, "DIRECT_IO", False)
    elif how.startswith("refused"):
        if not hasattr(os, "O_DIRECT"):
            pytest.skip("no O_DIRECT on this platform: every write is buffered")
        _refuse_direct_io(monkeypatch, how.split()[-1])
    else:
        monkeypatch.setattr(engine, "BLOCK", 2 * engine.ALIGN)
        real_tensor = Computed.tensor

        def counted(self):
            computed.setdefault(id(self), [self, 0])[1] += 1
            return real_tensor(self)

        monkeypatch.setattr(Computed, "tensor", counted)
    out2 = tmp_path / "w"
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "ep2tp2", "--out", out2, "--workers", 2)
    assert_same_rank_files(out2, out)
    if how == "small blocks":
        assert computed and {calls for _, calls in computed.values()} == {1}, computed


def test_rank_files_are_written_with_direct_io_on_linux(tmp_path, monkeypatch):
    """The engine asks for O_DIRECT for every rank file where the platform has it."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open, direct = os.open, []

    def recording_open(path, flags, *args, **kwargs):
        if str(path).endswith(".tmp") and "rank-" in str(path):
            direct.append(bool(flags & os.O_DIRECT))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "tp2", "--out", tmp_path / "o")
    assert direct == [True, True], direct


# --- resume --------------------------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_rerun_keeps_complete_rank_files_and_rewrites_corrupt_ones(tmp_path):
    out = tmp_path / "resume"
    args = ("convert", "--src", "tiny:qwen3_moe", "--layout", "ep2", "--out", out)
    run(*args)
    names = rank_names(2)
    original = {n: (out / n).read_bytes() for n in names}
    stamps = {n: _stamp(out / n) for n in names}
    manifest = (out / "reshard.json").read_text()

    # tiny: (as hf:) is no directory the torch-free check can stamp: the planner finds both
    # ranks finished, and says so
    assert "every rank file was finished" in run(*args).output
    assert {n: _stamp(out / n) for n in names} == stamps  # kept, not rewritten
    assert (out / "reshard.json").read_text() == manifest

    data_start, _ = header(out / names[1])
    flip_byte(out / names[1], data_start + 1000)
    assert "wrote 1 of 2 rank files" in run(*args).output
    assert _stamp(out / names[0]) == stamps[names[0]]
    assert (out / names[1]).read_bytes() == original[names[1]]  # rewritten

    (out / names[0]).write_bytes(original[names[0]][: data_start + 10])  # truncated download
    (out / "reshard.json").unlink()  # an interrupted run
    run(*args)
    assert {n: (out / n).read_bytes() for n in names} == original
    run("verify", out, "--against", "tiny:qwen3_moe")


def test_rerun_after_the_source_changed_rewrites(tmp_path, tiny_dir):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    out = tmp_path / "out"
    args = ("convert", "--src", src, "--layout", "tp2", "--out", out)
    run(*args)
    file = next(f for f in src.glob("*.safetensors") if "model.norm.weight" in load_file(str(f)))
    tensors = load_file(str(file))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1  # same size, new values
    save_file(tensors, str(file), metadata={"format": "pt"})
    run(*args)
    run("verify", out, "--against", src)


def test_converting_to_another_layout_in_place_leaves_no_stale_rank_files(tmp_path):
    out = tmp_path / "relayout"
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "tp4", "--out", out)
    run("convert", "--src", "tiny:qwen3_moe", "--layout", "tp2", "--out", out, "--overwrite")
    assert sorted(p.name for p in out.glob("*.safetensors")) == rank_names(2)


# --- verify --------------------------------------------------------------------------------------


@pytest.fixture
def copy(out, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "evicted"])
def test_verify_fails_on_a_flipped_byte_and_names_the_file(copy, cached):
    """Evicted from the page cache, as after `convert`, --against hashes each file in the read
    that compares it; cached, the hash is taken while torch imports. Either way it is checked."""
    run("verify", copy)
    data_start, _ = header(copy / rank_names(4)[2])
    flip_byte(copy / rank_names(4)[2], data_start + 4)
    for extra in ([], ["--against", "tiny:qwen3_moe"]):
        for name in rank_names(4):
            if cached:
                (copy / name).read_bytes()
            else:
                evict(copy / name)
        result = run("verify", copy, *extra, ok=False)
        assert result.exit_code != 0
        assert "rank-00002-of-00004.safetensors" in result.stderr
        assert "sha256" in result.stderr
        for other in (0, 1, 3):
            assert f"FAIL {copy / rank_names(4)[other]}" not in result.stderr
        # --against compares the tensors too (sizes and headers hold), and names the one hit
        assert ("differs from the source" in result.stderr) == bool(extra), result.stderr


def test_verify_against_a_cut_rank_file_reports_only_its_size(copy):
    path = copy / rank_names(4)[1]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3)
    result = run("verify", copy, "--against", "tiny:qwen3_moe", ok=False)
    assert result.exit_code == 1
    failures = [line for line in result.stderr.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and str(path) in failures[0] and "truncated" in failures[0]
    assert "Traceback" not in result.output + result.stderr


def test_verify_against_stopped_early_drops_its_queued_files(out, monkeypatch):
    """Every rank file is queued up front; a verify stopped after one finding (Ctrl-C, the
    first failure) must not sit through all the others before it returns."""
    import reshard.verify as verify
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.convert import make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source

    checked, release = [], threading.Event()
    real = verify._check_file

    def check(*args):
        checked.append(args[2])
        if len(checked) > 1:  # past rank 0's file: held until released
            release.wait(timeout=30)
        return real(*args)

    monkeypatch.setattr(verify, "_check_file", check)
    monkeypatch.setattr(verify, "column_group", lambda ckpt: 1)  # else ranks 0-1 start together
    ckpt = ShardedCheckpoint(out)
    plan = make_plan(open_source("tiny:qwen3_moe"), Layout.parse("ep2tp2"))
    findings = verify.check_against(ckpt, plan, workers=1)
    assert next(findings).ok
    threading.Timer(0.2, release.set).start()  # lets the one file in flight finish
    findings.close()
    assert checked == [0, 1]  # rank 0's, and rank 1's in flight: not ranks 2 and 3


def test_verify_against_reads_the_rows_of_a_column_slice_once_for_every_tp_rank(
    tmp_path, monkeypatch
):
    """tp4's down_proj: each rank holds a quarter of the columns of every expert, and the
    covering read of an expert's rows serves the four ranks only while it is kept. Checked one
    rank at a time here (the next test checks that the four go together), the reader's default
    16 MB, less than the down_proj, read the rows once per rank; verify keeps the engine's
    SHARED_SPANS, which hold them all."""
    from helpers_cli import load_benchmark

    import reshard.verify as verify
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.convert import make_plan
    from reshard.converters.lazy import SPAN_CACHE
    from reshard.layout import Layout
    from reshard.sources import open_source

    bench = load_benchmark("convert_memory")
    size = bench.Size(
        hidden=512, layers=2, experts=16, moe_intermediate=1024,
        vocab=1024, heads=4, kv_heads=2, head_dim=64,
    )  # fmt: skip
    bench.write_checkpoint(tmp_path / "src", size)
    down = size.layers * size.experts * size.hidden * size.moe_intermediate * 2  # bf16
    assert down > SPAN_CACHE  # or the cache alone would keep every expert's rows
    run("convert", "--src", tmp_path / "src", "--layout", "tp4", "--out", tmp_path / "tp4", "-q")

    plan = make_plan(open_source(str(tmp_path / "src")), Layout.parse("tp4"))
    reader, lock, read = plan.source.reader, threading.Lock(), {"down_proj": 0}
    read_into = reader.read_into

    def counted(path, offset, buffer, what):
        if "down_proj" in what:
            with lock:
                read["down_proj"] += len(buffer)
        return read_into(path, offset, buffer, what)

    reader.read_into = counted
    monkeypatch.setattr(verify, "column_group", lambda ckpt: 1)  # one thread: only the spans
    findings = list(verify.check_against(ShardedCheckpoint(tmp_path / "tp4"), plan, workers=1))
    assert findings and all(f.ok for f in findings), [f.what for f in findings if not f.ok]
    assert read["down_proj"] == down, read  # each expert's rows once, for all four ranks


def test_verify_against_checks_the_tp_ranks_of_a_column_slice_together(out, monkeypatch):
    """A covering read is kept for a bounded number of bytes: it serves every TP rank only
    while they are checked at about the same time. ep2tp2 with one worker: its two TP ranks
    are checked together (before, one rank at a time), and no more threads than that."""
    import reshard.verify as verify
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.convert import make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source

    ckpt = ShardedCheckpoint(out)
    assert verify.column_group(ckpt) == 2  # down_proj and o_proj: columns split two ways
    together, threads = threading.Barrier(2, timeout=30), set()
    real = verify._check_file

    def check(*args):
        threads.add(threading.get_ident())
        together.wait()  # breaks (BrokenBarrierError) unless a second rank is in flight
        return real(*args)

    monkeypatch.setattr(verify, "_check_file", check)
    plan = make_plan(open_source("tiny:qwen3_moe"), Layout.parse("ep2tp2"))
    findings = list(verify.check_against(ckpt, plan, workers=1))
    assert findings and all(f.ok for f in findings), [f.what for f in findings if not f.ok]
    assert len(threads) == 2


def test_verify_against_checks_at_most_max_files_at_once_on_many_cores(convert_tiny, monkeypatch):
    """On a machine of 64 cores, ep4tp4's 16 rank files are checked MAX_FILES at a time, as
    `convert` writes them: a thread each kept its own freed memory (glibc arenas), and verify
    peaked at 1.8 GB on a 16-core host with 16 threads."""
    import reshard.verify as verify
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.convert import make_plan
    from reshard.engine import MAX_FILES
    from reshard.sources import open_source

    ckpt = ShardedCheckpoint(convert_tiny("ep4tp4"))
    assert ckpt.layout.world_size > MAX_FILES
    monkeypatch.setattr(verify, "default_workers", lambda: 64)
    lock, running, peak = threading.Lock(), [0], [0]
    real = verify._check_file

    def check(*args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)  # every thread the pool has takes a file meanwhile
        try:
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(verify, "_check_file", check)
    plan = make_plan(open_source("tiny:qwen3_moe"), ckpt.layout)
    findings = list(verify.check_against(ckpt, plan))
    assert findings and all(f.ok for f in findings), [f.what for f in findings if not f.ok]
    assert peak[0] == MAX_FILES


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 64, 4099])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_same_bytes_agrees_with_a_bytewise_comparison(length, shift):
    """Whatever the length and the alignment, one changed byte anywhere is found."""
    from reshard.verify import same_bytes

    base = torch.randint(0, 256, (length + shift,), dtype=torch.uint8)
    a = base[shift:]
    assert same_bytes(a, a.clone()) and same_bytes(a, base.clone()[shift:])
    for at in sorted({0, length // 2, length - 1} & set(range(length))):
        b = base.clone()[shift:]
        b[at] ^= 0x80
        assert bytes(a.numpy()) != bytes(b.numpy())
        assert not same_bytes(a, b) and not same_bytes(b, a)


def test_verify_against_catches_changed_values_even_with_matching_hashes(copy):
    """A rank file edited and re-hashed into the manifest passes the hash check, not --against."""
    name = rank_names(4)[3]
    data_start, head = header(copy / name)
    target = "model.layers.1.mlp.experts.down_proj"
    flip_byte(copy / name, data_start + head[target]["data_offsets"][0] + 2)
    manifest = json.loads((copy / "reshard.json").read_text())
    manifest["ranks"][3]["sha256"] = sha256(copy / name)
    (copy / "reshard.json").write_text(json.dumps(manifest))
    run("verify", copy)
    result = run("verify", copy, "--against", "tiny:qwen3_moe", ok=False)
    assert result.exit_code != 0
    failures = [line for line in result.stderr.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and target in failures[0], result.stderr


def test_verify_against_a_source_that_differs(out, tiny_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    for f in src.glob("*.safetensors"):
        tensors = load_file(str(f))
        if "model.layers.0.self_attn.q_norm.weight" in tensors:
            tensors["model.layers.0.self_attn.q_norm.weight"][3] += 0.5
            save_file(tensors, str(f), metadata={"format": "pt"})
    result = run("verify", out, "--against", src, ok=False)
    assert result.exit_code != 0
    failures = [line for line in result.stderr.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and "model.layers.0.self_attn.q_norm.weight" in failures[0]


def test_verify_against_a_source_with_more_layers_reports_the_missing_ones(out, tiny_dir, tmp_path):
    """A checkpoint converted from a one-layer cut of the source holds none of layer 1: verifying
    it against the whole source must fail and name each of layer 1's tensors (as the whole
    conversion's manifest names them), not pass on the tensors it has."""
    cut = tmp_path / "cut"
    shutil.copytree(tiny_dir, cut)
    index = json.loads((cut / "model.safetensors.index.json").read_text())
    dropped = {n for n in index["weight_map"] if n.startswith("model.layers.1.")}
    for f in cut.glob("*.safetensors"):
        tensors = load_file(str(f))
        save_file({n: t for n, t in tensors.items() if n not in dropped}, str(f), {"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if n not in dropped}
    (cut / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((cut / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (cut / "config.json").write_text(json.dumps(config))
    converted = tmp_path / "cut-ep2tp2"
    run("convert", "--src", cut, "--layout", "ep2tp2", "--out", converted)
    run("verify", converted, "--against", cut)

    result = run("verify", converted, "--against", tiny_dir, ok=False)
    assert result.exit_code != 0
    failures = [line for line in result.stderr.splitlines() if line.startswith("FAIL")]
    layer1 = {n for n in json.loads((out / "reshard.json").read_text())["params"] if ".1." in n}
    assert layer1 and {line.split()[1].rstrip(":") for line in failures} == layer1, result.stderr
    assert len(failures) == len(layer1)


# --- plan and inspect ----------------------------------------------------------------------------


def test_plan_prints_one_row_per_rank_and_writes_nothing(tmp_path, convert_tiny, reshard_cache):
    from reshard.units import human_bytes

    cache_before = sorted(p.relative_to(reshard_cache) for p in reshard_cache.rglob("*"))
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as cwd:
        result = runner.invoke(cli, ["plan", "--src", "tiny:qwen3_moe", "--layout", "ep4tp2"])
        assert result.exit_code == 0, result.output
        assert os.listdir(cwd) == []
    assert sorted(p.relative_to(reshard_cache) for p in reshard_cache.rglob("*")) == cache_before
    rows = [line for line in result.output.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 8
    converted = convert_tiny("ep4tp2")
    for rank, row in enumerate(rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        ep = rank // 2
        assert cells[0] == str(rank)
        assert cells[2] == f"{ep * 4}-{ep * 4 + 3}"  # experts held
        path = converted / rank_names(8)[rank]
        data_start, _ = header(path)
        assert cells[4] == human_bytes(path.stat().st_size - data_start), rank  # tensor bytes


def test_inspect_shows_layout_and_params(out):
    result = run("inspect", out)
    assert "layout ep2tp2" in result.output and "4 ranks" in result.output
    m = json.loads((out / "reshard.json").read_text())
    lines = result.output.splitlines()
    for name, p in m["params"].items():
        (line,) = [line for line in lines if line.strip().startswith(name + " ")]
        assert " ".join(p["placements"]) in line
    for r in m["ranks"]:
        assert any(r["file"] in line for line in lines)
    as_json = run("inspect", out, "--json")
    assert json.loads(as_json.output) == m


def test_a_noop_rerun_hashes_nothing_and_a_touched_file_is_hashed_again(tmp_path, monkeypatch):
    """Hashes of unchanged files are remembered (source: reshard.hash_cache; rank files: the
    completion record's stat stamp), so a no-op re-run reads no weight bytes. A touched rank
    file is hashed again (and kept if equal); a touched source is hashed again and, as the
    rank records name it by its stat stamp, every rank is written again."""
    import reshard.convert
    import reshard.hash_cache

    src = tmp_path / "src"
    shutil.copytree(open_source_path("tiny:qwen3_moe"), src)
    out = tmp_path / "out"
    args = ("convert", "--src", src, "--layout", "ep2", "--out", out, "-q")
    run(*args)
    hashed = count_hashing(monkeypatch, reshard.convert, reshard.hash_cache)
    run(*args)
    assert hashed == []
    rank0, rank1 = out / "rank-00000-of-00002.safetensors", out / "rank-00001-of-00002.safetensors"
    rank1.write_bytes(rank1.read_bytes())  # same bytes, but touched: no longer provably ours
    before = rank0.stat().st_mtime_ns, rank1.stat().st_mtime_ns
    run(*args)
    assert hashed == [rank1.name]
    assert (rank0.stat().st_mtime_ns, rank1.stat().st_mtime_ns) == before  # both kept
    hashed.clear()
    source = next(src.glob("*.safetensors"))
    source.write_bytes(source.read_bytes())
    run(*args)
    assert hashed == [source.name]
    assert rank0.stat().st_mtime_ns != before[0] and rank1.stat().st_mtime_ns != before[1]
    run("verify", out, "--against", src)


CONVERT_AND_SAY_IF_TORCH = """
import sys
from reshard.cli import main
sys.argv = ["reshard", "convert", *sys.argv[1:]]
try:
    main()
finally:
    print("torch imported:", "torch" in sys.modules)
"""


def convert_in_a_process(*args) -> tuple[str, bool]:
    """`reshard convert ARGS` as a user runs it: (its output, whether it imported torch)."""
    done = subprocess.run(
        [sys.executable, "-c", CONVERT_AND_SAY_IF_TORCH, *map(str, args)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stdout.rstrip().endswith("torch imported: True")


def test_the_same_convert_again_needs_no_torch_and_anything_changed_goes_to_the_planner(tmp_path):
    """The same command again answers "up to date" without importing torch (4-6 s on a GPU host)
    and writes nothing. A rank file changed behind its back, even with its mtime put back, a
    touched side file of the source, or another argument: the planner decides, as before."""
    src = tmp_path / "src"
    shutil.copytree(open_source_path("tiny:qwen3_moe"), src)
    out = tmp_path / "out"
    args = ("--src", src, "--layout", "ep2", "--out", out)
    said, torch_imported = convert_in_a_process(*args)
    assert "wrote 2 rank files" in said and torch_imported
    files = sorted(p for p in out.iterdir() if p.is_file())
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}

    said, torch_imported = convert_in_a_process(*args)
    assert "up to date" in said and not torch_imported, said
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == before

    rank1 = out / "rank-00001-of-00002.safetensors"
    original, st = rank1.read_bytes(), rank1.stat()
    data_start, _ = header(rank1)
    flip_byte(rank1, data_start + 100)
    os.utime(rank1, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime, new bytes
    said, torch_imported = convert_in_a_process(*args)
    assert "up to date" not in said and torch_imported
    assert rank1.read_bytes() == original  # written again
    assert "up to date" in convert_in_a_process(*args)[0]

    (src / "tokenizer.json").touch()
    assert "up to date" not in convert_in_a_process(*args)[0]
    assert "up to date" in convert_in_a_process(*args)[0]
    record = out / ".reshard" / "done.json"
    done = json.loads(record.read_text())
    done["summary"] = {"ranks": 2}  # a record we did not write: not trusted, not a crash
    record.write_text(json.dumps(done))
    assert "up to date" not in convert_in_a_process(*args)[0]
    assert "up to date" not in convert_in_a_process(*args, "--dtype", "fp32")[0]
    run("verify", out, "--against", src)


def open_source_path(spec: str) -> Path:
    from reshard.sources import open_source

    return open_source(spec).path
