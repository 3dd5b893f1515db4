"""Batches in `reshard run`: prompts of different lengths, left-padded to one batch, each row at
its own positions and stopping at its own eos; and the static-shape decode step (the one a CUDA
graph replays) against the eager one.

The oracle is transformers' own `generate(do_sample=False)` on each prompt alone: a padded row
must produce exactly the tokens its prompt produces with no neighbours and no padding.
llama4_text is here because padding shifts its chunked-attention boundaries and its NoPE query
temperature, both of which go by position, not by cache slot; gpt_oss because its sliding
window must count a row's own positions and its sinks change every softmax.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers_cli import one_error_line, run_reshard, run_reshard_in_process
from helpers_dist import run_on_ranks
from helpers_families import hf_greedy, load_hf_model, write_checkpoint

transformers = pytest.importorskip("transformers")

MAX_NEW_TOKENS = 8
PROMPTS = ["Why is the sky blue", "Hi", "Name three rivers of Europe, please"]  # 19, 2, 35 bytes
# deepseek_v3: MLA caches a latent; gpt_oss: sliding-window layers and attention sinks
FAMILIES = ["qwen3_moe", "llama4_text", "deepseek_v3", "gpt_oss"]


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, tuple]:
    """family -> (HF directory, transformers' model, its greedy tokens per prompt)."""
    out = {}
    for family in FAMILIES:
        directory = write_checkpoint(family, tmp_path_factory.mktemp(family) / family)
        model = load_hf_model(directory)
        out[family] = (
            directory,
            model,
            [hf_greedy(model, _ids(directory, p), MAX_NEW_TOKENS) for p in PROMPTS],
        )
    return out


def _ids(directory, prompt: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).encode(prompt).ids


def _convert(src, layout: str, out) -> str:
    from reshard.convert import convert, make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source

    convert(make_plan(open_source(str(src)), Layout.parse(layout)), out, progress=False)
    return str(out)


@pytest.mark.parametrize(
    "family, layout, suffix",
    [
        ("qwen3_moe", "tp2", ".txt"),
        ("qwen3_moe", "ep2tp2", ".jsonl"),
        ("llama4_text", "tp2", ".txt"),
        ("gpt_oss", "tp2", ".txt"),
    ],
)
def test_batched_run_matches_transformers_per_prompt(families, tmp_path, family, layout, suffix):
    directory, _, want = families[family]
    out = _convert(directory, layout, tmp_path / "ckpt")
    prompt_file = tmp_path / f"prompts{suffix}"
    lines = [json.dumps({"prompt": p}) for p in PROMPTS] if suffix == ".jsonl" else PROMPTS
    prompt_file.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is no prompt
    proc = run_reshard(
        "run", out, "--prompt-file", str(prompt_file), "--batch-size", "3",
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", "--device", "cpu", timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert [row["prompt"] for row in result["outputs"]] == PROMPTS
    assert [row["prompt_ids"] for row in result["outputs"]] == [_ids(directory, p) for p in PROMPTS]
    assert [row["output_ids"] for row in result["outputs"]] == want
    assert result["batch_size"] == 3 and result["layout"] == layout
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def _decode(rank: int, world: int, directory: str, prompts, eos, static: bool) -> list:
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.runtime.load import load_parallel_model
    from reshard.runtime.worker import Decoder

    pm = load_parallel_model(ShardedCheckpoint(directory), rank, device=torch.device("cpu"))
    decoder = Decoder(pm, torch.device("cpu"), eos, static_decode=static)
    with torch.no_grad():
        first, _ = decoder.generate(prompts, max_new_tokens=MAX_NEW_TOKENS)
        # The same batch size again: the kept cache (and, on CUDA, graph) must not leak state.
        again, _ = decoder.generate(prompts[::-1], max_new_tokens=MAX_NEW_TOKENS)
    return [first, again[::-1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_static_decode_matches_transformers_and_stops_each_row_at_its_eos(
    families, tmp_path, family
):
    """The decode step of fixed shapes (positions in a device tensor, the whole preallocated
    cache masked) gives the eager step's tokens, with padding, and rows stop on their own."""
    directory, _, want = families[family]
    out = _convert(directory, "tp1", tmp_path / "ckpt")
    prompts = [_ids(directory, p) for p in PROMPTS]
    # An eos that row 0 first produces at step 2 or later and some other row never produces:
    # row 0 stops early, the others go on (and stop where that token comes, if it does).
    eos = [
        next(
            t
            for i, t in enumerate(want[0])
            if i >= 2 and t not in want[0][:i] and any(t not in w for w in want[1:])
        )
    ]

    def until_eos(ids: list[int]) -> list[int]:
        return ids[: ids.index(eos[0]) + 1] if eos[0] in ids else ids

    expected = [until_eos(w) for w in want]
    assert len(expected[0]) < MAX_NEW_TOKENS and any(len(e) == MAX_NEW_TOKENS for e in expected)
    for static in (False, True):
        assert run_on_ranks(_decode, 1, out, prompts, eos, static) == [[expected, expected]], static


def test_prompt_file_errors(tmp_path, convert_tiny):
    directory = str(convert_tiny("tp2"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--prompt-file", str(bad)], "bad.jsonl:2"),
        (["--prompt-file", str(empty)], "no prompts in it"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "cannot read it"),
        (["--prompt", "Hi", "--batch-size", "2"], "--batch-size needs --prompt-file"),
        (["--prompt", "Hi", "--prompt-file", str(empty)], "one of them"),
        ([], "one of them"),
        (["--prompt", "Hi", "--compile"], "--compile: this run decodes eagerly"),  # CPU, 2 ranks
    ]
    for args, fragment in cases:
        command = ("run", directory, *args, "--device", "cpu")
        if "--compile" in args:  # refused by the ranks: the installed command, its ranks
            proc = run_reshard(*command, timeout=120)
        else:  # refused before any rank starts: the same entry point, in this process
            proc = run_reshard_in_process(*command)
        one_error_line(proc.returncode, proc.stderr, fragment)
