"""benchmarks/convert.py's size sweep: the rows it runs, the disk it leaves, and the line it fits.

Oracles: the rows' names and the files left on disk; for the fit, points built on known lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_cli import load_benchmark

from reshard.tiny import write_tiny_checkpoint

bench = load_benchmark("convert")
GB = 1e9


@pytest.fixture
def tiny_and_work(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A tiny source and an empty work directory, the rows' hash cache under tmp_path."""
    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "unused"))
    src = tmp_path / "src"
    write_tiny_checkpoint("qwen3_moe", src)
    work = tmp_path / "work"
    work.mkdir()
    return src, work


def test_a_sweep_runs_exactly_the_rows_asked_and_leaves_no_output(tiny_and_work):
    """Rows are picked by their whole name ("reshard ep2" is not "reshard ep2tp2"), and with no
    no-op or verify row to check it, every output is removed as soon as it is timed: a sweep
    at 8 layers would otherwise keep 46 GB of conversions on the disk."""
    src, work = tiny_and_work
    only = ("cp", "reshard ep2")
    results = bench.rounds(src, work, ["ep2", "ep2tp2"], 2, False, only=only)
    rows = [r["row"] for r in results]
    assert sorted(rows[:2]) == sorted(rows[2:]) == sorted(only)  # each round, in its own order
    assert all(r["bytes_written"] > 0 for r in results)
    assert sorted(p.name for p in work.iterdir()) == ["cache"]  # the hash cache, emptied per row


def test_a_conversion_is_kept_for_its_verify_row_then_removed(tiny_and_work):
    src, work = tiny_and_work
    only = ("cp", "reshard ep2", "verify ep2")
    results = bench.rounds(src, work, ["ep2"], 1, False, only=only)
    ran = [r["row"] for r in results]
    assert sorted(ran) == sorted(only)
    assert ran[ran.index("reshard ep2") + 1] == "verify ep2"
    # rounds() returned, so verify found the conversion: on a missing checkpoint it exits
    # non-zero, and measure() raises
    assert sorted(p.name for p in work.iterdir()) == ["cache"]  # then it was removed


def test_each_round_shuffles_the_rows_and_a_conversion_is_checked_right_after_it(
    tmp_path, monkeypatch
):
    """In a fixed order every first conversion followed a big write (`cp` or the naive script)
    and paid for the host's write-back of it on a VM whose host caches the disk. Each round
    runs every row in its own order; a conversion's no-op and verify rows still come right
    after it (they check its output and find its hashes in $RESHARD_CACHE)."""
    ran: list[str] = []
    monkeypatch.setattr(
        bench, "run_row", lambda name, *_: ran.append(name) or {"row": name, "wall_s": 0.0}
    )
    monkeypatch.setattr(bench, "hub_cache", lambda src, cache: "hf:org/name")
    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "unused"))
    bench.rounds(tmp_path / "src", tmp_path, ["ep2", "tp2"], 4, False)
    per_round = [ran[k : k + 12] for k in range(0, len(ran), 12)]  # 2 cp + 5 rows per layout
    assert len(per_round) == 4 and all(sorted(r) == sorted(per_round[0]) for r in per_round)
    assert len({tuple(r) for r in per_round}) == 4
    for order in per_round:
        for layout in ("ep2", "tp2"):
            at = order.index(f"reshard {layout}")
            assert order[at + 1 : at + 3] == [f"no-op {layout}", f"verify {layout}"]
    before = {(["start", *order])[order.index("reshard ep2")] for order in per_round}
    assert len(before) > 1  # the row a first conversion follows varies


def test_cp_x2_writes_two_copies_of_the_source(tiny_and_work):
    src, work = tiny_and_work
    results = bench.rounds(src, work, ["ep2"], 1, False, only=("cp", "cp x2"))
    written = {r["row"]: r["bytes_written"] for r in results}
    assert written["cp x2"] == 2 * written["cp"] == 2 * bench.dir_bytes(src)


@pytest.mark.parametrize(
    "rows, said",
    [("cp,reshard tp9", "no row named 'reshard tp9'"), ("reshard tp8", "include cp")],
)
def test_rows_must_name_rows_of_the_run_and_cp(rows, said, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--layouts", "tp8", "--rows", rows])
    assert stop.value.code == 2
    assert said in capsys.readouterr().err


def _row(name: str, gb: float, *walls: float) -> list[dict]:
    return [{"row": name, "wall_s": w, "bytes_written": int(gb * GB), "peak_rss": 1} for w in walls]


def test_a_row_is_held_to_cp_for_the_same_bytes_on_a_disk_that_slows_down():
    """On the VM one copy of a 3.7 GB source stays in the disk's fast part and a second copy
    does not: a conversion that writes twice the source is held to cp x2's time, not to twice
    cp's; one that writes the source's bytes, to cp's."""
    results = [
        *_row("cp", 3.7, 9.0, 8.0, 7.0),  # median 8 s
        *_row("cp x2", 7.4, 18.0, 20.0),  # median 19 s: the second copy cost 11 s
        *_row("reshard ep4tp4", 7.4, 20.9),
        *_row("reshard tp8", 3.7, 9.6),
        *_row("reshard ep8", 5.55, 13.5),  # halfway between: cp's line gives 13.5 s
        *_row("no-op tp8", 0, 0.2),
    ]
    rows = {r["row"]: r for r in bench.summarize(results, source_bytes=int(3.7 * GB))}
    assert rows["reshard ep4tp4"]["vs_cp_same_bytes"] == pytest.approx(1.1)
    assert rows["reshard ep4tp4"]["vs_cp_per_byte"] == pytest.approx(20.9 / 16)
    assert rows["reshard tp8"]["vs_cp_same_bytes"] == pytest.approx(1.2)
    assert rows["reshard ep8"]["vs_cp_same_bytes"] == pytest.approx(1.0)
    assert rows["no-op tp8"]["vs_cp_same_bytes"] == pytest.approx(0.2 / 8)
    assert rows["cp x2"]["vs_cp_same_bytes"] == pytest.approx(1.0)


def test_without_cp_x2_the_same_bytes_are_held_to_cp_per_byte():
    results = [*_row("cp", 3.7, 8.0), *_row("reshard ep4tp4", 7.4, 20.0)]
    (_, row) = bench.summarize(results, source_bytes=int(3.7 * GB))
    assert row["vs_cp_same_bytes"] == pytest.approx(row["vs_cp_per_byte"]) == pytest.approx(1.25)


def _points(row: str, fixed: float, s_per_gb: float, sizes: list[float]) -> list[dict]:
    return [
        {"row": row, "bytes_written": int(g * GB), "wall_s": fixed + s_per_gb * g} for g in sizes
    ]


def test_the_fit_tells_the_cost_per_byte_from_the_cost_of_starting():
    """A row with a 2 s start and 1.2x cp's seconds per byte is 1.2x per byte, though on 6.2 GB
    its time per byte is 1.34x cp's."""
    points = [
        *_points("cp", 0.5, 1.5, [3.7, 6.2, 12.4]),
        *_points("reshard ep4tp4", 2.0, 1.8, [6.2, 10.4, 20.8]),  # writes more bytes than cp
        *_points("naive tp8", 1.0, 4.0, [3.7]),  # one size only: no line through it
    ]
    fits = {f["row"]: f for f in bench.per_byte(points)}
    assert sorted(fits) == ["cp", "reshard ep4tp4"]
    assert fits["reshard ep4tp4"]["fixed_s"] == pytest.approx(2.0)
    assert fits["reshard ep4tp4"]["s_per_gb"] == pytest.approx(1.8)
    assert fits["reshard ep4tp4"]["vs_cp_per_byte"] == pytest.approx(1.2)
    assert fits["cp"]["vs_cp_per_byte"] == pytest.approx(1.0)


def test_without_cp_there_is_no_ratio():
    fits = bench.per_byte(_points("reshard tp8", 1.0, 2.0, [1.0, 2.0]))
    assert fits[0]["s_per_gb"] == pytest.approx(2.0) and fits[0]["vs_cp_per_byte"] is None


def test_the_benchmark_says_when_torch_compiles_at_every_import(tmp_path, monkeypatch, capsys):
    """A host with PYTHONDONTWRITEBYTECODE=1 and a torch installed without .pyc files compiled
    torch at every import (3.7-5 s, inside every reshard row): the benchmark says so, and how
    to compile it as pip does at install."""
    import py_compile

    package = tmp_path / "fake_torch_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")

    start = bench.torch_start(1, module="fake_torch_pkg")
    assert start["import_torch_s"] > 0 and start["bytecode_cached"] is False
    bench.print_start(start)
    assert "compileall" in capsys.readouterr().out

    py_compile.compile(str(package / "__init__.py"))  # what pip does at install
    start = bench.torch_start(1, module="fake_torch_pkg")
    assert start["bytecode_cached"] is True
    bench.print_start(start)
    assert "compileall" not in capsys.readouterr().out
