"""Resharding (a sharded checkpoint as the source of another layout) and export back to HF files.

Oracles: the original checkpoint's own bytes (safetensors `load_file`), transformers loading
the export (`from_pretrained`), and a direct conversion from the original source.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers_families import FAMILIES, load_hf_model, write_checkpoint
from helpers_files import flip_a_data_byte
from safetensors.torch import load_file

from reshard.cli import cli
from reshard.convert import convert, make_plan
from reshard.errors import OutputError, SourceError
from reshard.layout import Layout
from reshard.sources import open_source

pytest.importorskip("transformers")


def run(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def rank_tensors(directory: Path) -> list[dict[str, torch.Tensor]]:
    world = len(json.loads((directory / "reshard.json").read_text())["ranks"])
    return [
        load_file(str(directory / f"rank-{r:05d}-of-{world:05d}.safetensors")) for r in range(world)
    ]


def assert_same_ranks(a: Path, b: Path) -> None:
    for rank, (x, y) in enumerate(zip(rank_tensors(a), rank_tensors(b), strict=True)):
        assert sorted(x) == sorted(y), rank
        for name in x:
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), (rank, name)


# --- resharding ----------------------------------------------------------------------------------


def test_round_trip_through_three_layouts_is_bit_exact(tmp_path, convert_tiny):
    """ep4tp4 -> tp2 -> ep2tp2-tp2ep: each hop's rank files equal a direct conversion's."""
    hop, previous = None, convert_tiny("ep4tp4")
    for layout in ("tp2", "ep2tp2-tp2ep"):
        hop = tmp_path / layout
        run("convert", "--src", previous, "--layout", layout, "--out", hop)
        assert_same_ranks(hop, convert_tiny(layout))
        previous = hop
    run("verify", hop, "--against", "tiny:qwen3_moe")


def test_repeated_kv_heads_are_undone(tmp_path, convert_tiny):
    """tp8 holds each of the 4 kv heads twice; resharding to tp2 reads them once."""
    out = tmp_path / "tp2"
    run("convert", "--src", convert_tiny("tp8"), "--layout", "tp2", "--out", out)
    assert_same_ranks(out, convert_tiny("tp2"))


def test_each_new_rank_reads_only_the_old_ranks_holding_its_experts(convert_tiny):
    """ep2 -> ep4: new rank 0's experts are all in old rank 0's file; old rank 1 is not read."""
    plan = make_plan(open_source(str(convert_tiny("ep2"))), Layout.parse("ep4"))
    from reshard.convert import read_local

    for t in plan.rank_tensors(0):
        read_local(plan, t)
    read = {Path(p).name: n for p, n in plan.source.reader.bytes_read.items()}
    assert read.get("rank-00001-of-00002.safetensors", 0) == 0, read
    assert read["rank-00000-of-00002.safetensors"] == plan.rank_bytes(0)


def test_a_damaged_rank_file_is_refused_before_resharding(tmp_path, convert_tiny):
    src = Path(shutil.copytree(convert_tiny("ep2"), tmp_path / "ep2"))
    flip_a_data_byte(src / "rank-00001-of-00002.safetensors")
    with pytest.raises(SourceError, match=r"rank-00001-of-00002.safetensors: sha256") as e:
        open_source(str(src))
    assert str(e.value).count("not a usable sharded checkpoint") == 1, e.value


def test_out_may_not_be_the_source(tmp_path, convert_tiny):
    src = Path(shutil.copytree(convert_tiny("ep2"), tmp_path / "ep2"))
    plan = make_plan(open_source(str(src)), Layout.parse("tp2"))
    with pytest.raises(OutputError, match="is the source"):
        convert(plan, src, progress=False, overwrite=True)
    assert sorted(p.name for p in src.glob("*.safetensors")) == [
        "rank-00000-of-00002.safetensors",
        "rank-00001-of-00002.safetensors",
    ]


# --- export --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-src")
    return {name: write_checkpoint(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_export_gives_back_the_original_checkpoint(model_type, originals, tmp_path):
    src = originals[model_type]
    sharded, exported = tmp_path / "sharded", tmp_path / "hf"
    run("convert", "--src", src, "--layout", "ep2tp2", "--out", sharded)
    result = run("export", sharded, "--out", exported, "--max-shard-size", "200KB")
    assert "safetensors files" in result.output
    want, got = tensors_of(src), tensors_of(exported)
    assert sorted(got) == sorted(want)  # the family's own names: per-expert, block_sparse_moe
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)
    assert {exported / f for f in index["weight_map"].values()} == set(
        exported.glob("*.safetensors")
    )
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in got.values()
    )
    assert (exported / "config.json").read_bytes() == (src / "config.json").read_bytes()
    hf, original = load_hf_model(exported), load_hf_model(src)
    original_state = original.state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, original_state[name]), name


def test_export_below_the_shard_size_is_one_file(convert_tiny, tmp_path, tiny_dir):
    run("export", convert_tiny("tp2"), "--out", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    got, want = tensors_of(tmp_path / "hf"), tensors_of(tiny_dir)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_export_refuses_a_non_empty_out_and_a_bad_size(convert_tiny, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run("export", convert_tiny("tp2"), "--out", out, ok=False)
    assert isinstance(result.exception, OutputError), result.output
    assert "not an empty directory" in str(result.exception)
    assert (out / "notes.txt").read_text() == "mine"
    result = run(
        "export", convert_tiny("tp2"), "--out", tmp_path / "x", "--max-shard-size", "big", ok=False
    )
    assert result.exit_code != 0 and "--max-shard-size" in result.output


def test_an_interrupted_export_leaves_nothing_that_looks_finished(
    convert_tiny, tmp_path, monkeypatch
):
    import reshard.engine

    written = []

    def fail_on_second(*args):
        written.append(args)
        if len(written) == 2:
            raise KeyboardInterrupt
        return original(*args)

    original = reshard.engine._fill_and_write
    monkeypatch.setattr(reshard.engine, "_fill_and_write", fail_on_second)
    # Blocks small enough that the tiny export's file has several: it stops mid-file.
    monkeypatch.setattr(reshard.engine, "BLOCK", 4 * reshard.engine.ALIGN)
    from reshard.export import export

    with pytest.raises(KeyboardInterrupt):
        export(convert_tiny("tp2"), tmp_path / "hf", progress=False)
    assert list(tmp_path.iterdir()) == []
