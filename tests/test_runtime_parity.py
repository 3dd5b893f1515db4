"""The parallel runtime against transformers, one row per layout, through the real CLI.

For every layout in CASES the checkpoint is converted, then `reshard validate
--json` (torchrun, gloo, one process per rank) compares the parallel forward
and backward of a fixed batch with a single-process reference: transformers'
own Qwen3MoeForCausalLM (`--reference transformers`) or the streamed
reference (the default). `reshard run --json` must generate exactly the
tokens that transformers' `generate(do_sample=False)` produces, from a prompt
whose length no tp / ep / world size divides (so the padding paths run in the
prefill, and every decode step is a single token split over the ranks).

Sources: the built-in tiny:qwen3_moe, and a checkpoint written by transformers
itself (`save_pretrained`, with a tokenizer.json made here with `tokenizers`).

Launching ranks costs seconds, so the launches of all selected tests are
started up front, two at a time, in a background pool; each test waits for its
own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers_cli import reshard_cmd
from helpers_families import FAMILIES as HF_FAMILIES
from helpers_families import load_hf_model, write_byte_tokenizer, write_checkpoint

transformers = pytest.importorskip("transformers")

TOL = 1e-4
MAX_NEW_TOKENS = 12
JOB_TIMEOUT_S = 420  # 16 CPU ranks on a busy 2-core machine
COLLECTIVE_TIMEOUT_S = "180"  # no rank waits longer than this in a collective
CONCURRENT_LAUNCHES = 2

TINY = "tiny"
# Decoded at tp2 against transformers, per prompt, by tests/test_runtime_batch.py: a launch
# here would repeat it (each costs CI minutes).
DECODED_IN_BATCH = {"llama4_text", "gpt_oss"}
HF_WRITTEN = "hf-written"
# Families beside qwen3_moe, each a checkpoint transformers writes (tests/helpers_families.py).
FAMILIES = [family for family in HF_FAMILIES if family != "qwen3_moe"]
PROMPTS = {
    TINY: "Why is the sea blue? It reflects",  # 13 tokens of tiny's BPE
    HF_WRITTEN: "Why is the sky blue",  # 19 tokens: the tokenizer written below is byte-level
    **{family: "Why is the sky blue" for family in FAMILIES},  # byte-level too
}


@dataclass(frozen=True)
class Case:
    source: str
    layout: str
    references: tuple[str, ...]  # validate against each of these
    generate: bool = True
    why: str = ""

    @property
    def id(self) -> str:
        return f"{self.source}-{self.layout}"


CASES = [
    Case(TINY, "tp1", ("transformers",), why="one rank: the worker starts without torchrun"),
    # qwen3_moe at tp2 is HF_WRITTEN's tp2 case below (both references, and the decode).
    Case(TINY, "ep2", ("transformers",), why="pad rows: 13 prompt tokens, 1 per decode step"),
    Case(TINY, "ep2tp2", ("transformers",), why="experts: Shard(0) over ep, strided over tp"),
    Case(TINY, "tp4-tp2ep", ("transformers",), why="EP on the TP mesh, whole experts"),
    Case(TINY, "tp2-sp", ("transformers",), generate=False, why="sequence-sharded activations"),
    Case(TINY, "tp4-sp", (), why="every 1-token decode step is padded to 4 rows"),
    Case(TINY, "ep2tp2-sp", ("streamed",), generate=False),
    Case(TINY, "ep4tp4", ("transformers",), generate=False, why="16 ranks: one launch is enough"),
    Case(HF_WRITTEN, "tp2", ("transformers", "streamed")),
    # The streamed reference and the decode of this source are its tp2 case's (CI time).
    Case(HF_WRITTEN, "ep2", ("transformers",), generate=False),
    # 2 kv heads over tp4: every rank holds a repeated k/v head (4 ranks, where tiny needs tp8).
    Case(HF_WRITTEN, "tp4", ("transformers",), generate=False, why="tp > kv heads"),
    # Each family decodes at tp2 and is validated at tp4-tp2ep, which splits its attention and
    # dense layers over more ranks (CI time): decoding through EP on the TP mesh is
    # tiny-tp4-tp2ep's.
    *[Case(family, "tp2", ()) for family in FAMILIES if family not in DECODED_IN_BATCH],
    *[
        Case(
            family,
            "tp4-tp2ep",
            ("transformers",),
            generate=False,
            why="shared experts beside EP on tp",
        )
        for family in FAMILIES
    ],
    # Experts cut over tp inside each ep group: only where a family stores its experts in its
    # own way (the others share qwen3_moe's [E, 2I, H] path, covered by tiny-ep2tp2 above).
    *[
        Case(family, "ep2tp2", ("transformers",), generate=False, why=why)
        for family, why in (
            ("llama4_text", "transposed [E, H, 2I] experts, input-scaled"),
            ("gpt_oss", "interleaved gate_up, expert biases added once per tp group"),
        )
    ],
]
VALIDATE = [(c, ref) for c in CASES for ref in c.references]
GENERATE = [c for c in CASES if c.generate]


def _mesh(layout: str) -> dict[str, int]:
    head = layout.split("-")[0]
    return {name: int(size) for name, size in re.findall(r"(dp|ep|tp)(\d+)", head)}


def _world(layout: str) -> int:
    world = 1
    for size in _mesh(layout).values():
        world *= size
    return world


# --- a checkpoint written by transformers ----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_written_dir(tmp_path_factory) -> Path:
    """`Qwen3MoeForCausalLM(config).save_pretrained()`, plus a byte-level tokenizer.json.

    transformers' own init is nearly uniform (std 0.02, norms all ones): greedy
    tokens and top-k routing would hinge on near ties. Every weight is redrawn
    with std 0.2 and every norm as 1 + N(0, 0.1), seeded.
    """
    config = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        norm_topk_prob=True,
        max_position_embeddings=128,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.2 if p.ndim > 1 else 1 + 0.1 * noise)
    directory = tmp_path_factory.mktemp("hf-written") / "qwen3-moe"
    model.save_pretrained(str(directory))
    write_byte_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def sources(tiny_dir, hf_written_dir, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """source name -> (the --against / --src spec, the HF directory)."""
    root = tmp_path_factory.mktemp("families")
    families = {family: write_checkpoint(family, root / family) for family in FAMILIES}
    return {
        TINY: ("tiny:qwen3_moe", tiny_dir),
        HF_WRITTEN: (str(hf_written_dir), hf_written_dir),
        **{family: (str(d), d) for family, d in families.items()},
    }


@pytest.fixture(scope="module")
def hf_models(sources) -> dict[str, torch.nn.Module]:
    """The oracle: transformers' own *ForCausalLM loaded from each source directory."""
    return {name: load_hf_model(d) for name, (_, d) in sources.items()}


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json"))


# --- launching: all selected launches up front, two at a time -------------------------------------


@dataclass
class Launch:
    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        assert lines, (
            f"no JSON from `{' '.join(self.cmd)}` (exit {self.returncode}):\n{self.stderr[-3000:]}"
        )
        return json.loads(lines[-1])


class Launcher:
    """Runs CLI commands in a small thread pool; each in its own session, killed on timeout."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[tuple, Future] = {}
        self.sessions: set[int] = set()
        self.lock = threading.Lock()

    def submit(self, key: tuple, cmd: list[str]) -> None:
        if key not in self.futures:
            self.futures[key] = self.pool.submit(self._run, cmd)

    def result(self, key: tuple) -> Launch:
        return self.futures[key].result()

    def _run(self, cmd: list[str]) -> Launch:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        with self.lock:
            self.sessions.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n[test] killed after {JOB_TIMEOUT_S}s"
        finally:
            with self.lock:
                self.sessions.discard(proc.pid)
        return Launch(cmd, proc.returncode, out, err)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self.lock:
            for pgid in self.sessions:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _validate_cmd(directory: Path, against: str, reference: str) -> list[str]:
    return [
        *reshard_cmd(), "validate", str(directory), "--against", against,
        "--reference", reference, "--json", "--device", "cpu", "--timeout", COLLECTIVE_TIMEOUT_S,
    ]  # fmt: skip


def _run_cmd(directory: Path, prompt: str) -> list[str]:
    return [
        *reshard_cmd(), "run", str(directory), "--prompt", prompt,
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", "--device", "cpu",
        "--timeout", COLLECTIVE_TIMEOUT_S,
    ]  # fmt: skip


def _selected(request, name: str) -> list:
    """The `name` parameter of every selected test of this module, in run order."""
    out = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is sys.modules[__name__] and spec is not None and name in spec.params:
            out.append(spec.params[name])
    return out


@pytest.fixture(scope="module")
def converted(request, sources, convert_tiny, tmp_path_factory) -> dict[str, Path]:
    """case id -> converted directory, for every case a selected test needs."""
    from reshard.convert import convert, make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source

    out = {}
    for case in _selected(request, "case"):
        if case.id in out:
            continue
        if case.source == TINY:
            out[case.id] = convert_tiny(case.layout)
        else:
            spec, _ = sources[case.source]
            directory = tmp_path_factory.mktemp(case.id)
            convert(
                make_plan(open_source(spec), Layout.parse(case.layout)), directory, progress=False
            )
            out[case.id] = directory
    return out


@pytest.fixture(scope="module")
def launches(request, sources, converted):
    """Start every selected test's launch now; tests wait for their own."""
    launcher = Launcher(CONCURRENT_LAUNCHES)
    jobs = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is not sys.modules[__name__] or spec is None or "case" not in spec.params:
            continue
        case = spec.params["case"]
        against, _ = sources[case.source]
        if "reference" in spec.params:
            ref = spec.params["reference"]
            key, cmd = ("validate", case.id, ref), _validate_cmd(converted[case.id], against, ref)
        else:
            key, cmd = ("run", case.id), _run_cmd(converted[case.id], PROMPTS[case.source])
        jobs.append((_world(case.layout), key, cmd))
    # Most ranks first: the long 16-rank launch overlaps with the short ones.
    for _, key, cmd in sorted(jobs, key=lambda job: -job[0]):
        launcher.submit(key, cmd)
    yield launcher
    launcher.close()


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, reference", VALIDATE, ids=[f"{c.id}-{ref}" for c, ref in VALIDATE])
def test_validate_matches_reference(case, reference, launches, hf_models):
    launch = launches.result(("validate", case.id, reference))
    result = launch.json()
    assert launch.returncode == 0, (result, launch.stderr[-3000:])
    assert result["ok"] is True, result
    assert result["reference"] == reference
    assert result["layout"] == case.layout and result["world_size"] == _world(case.layout)
    diffs = result["max_abs_diff"]
    assert set(diffs) == {"logits", "loss", "grad"}, diffs
    for what, value in diffs.items():
        assert 0 <= value <= TOL, (
            f"{case.id}: max abs diff of {what} is {value} (worst grad {result['worst_grad']})"
        )
    # every tensor transformers saves: parameters and persistent buffers (router biases)
    assert result["params_checked"] == len(hf_models[case.source].state_dict())


@pytest.fixture(scope="module")
def hf_tokens_per_expert(hf_models) -> dict[str, list[list[int]]]:
    """Per MoE layer, how many (token, expert) pairs transformers' routers pick for each expert,
    on the batch that `reshard validate` runs."""
    from reshard.runtime.reference import fixed_batch

    out = {}
    for name, model in hf_models.items():
        picks: list[torch.Tensor] = []
        k = model.config.num_experts_per_tok

        def chosen(module, args, out, picks=picks, k=k):
            # (logits, weights, indices), group limits and score corrections included (GPT-OSS's
            # `mlp.router` too); Llama 4's router returns (scores, logits) and picks the top-k
            # logits.
            picks.append(out[2] if len(out) == 3 else out[1].topk(k, dim=-1).indices)

        routers = [
            m
            for n, m in model.named_modules()
            if n.endswith((".mlp.gate", ".mlp.router", ".feed_forward.router"))
        ]
        hooks = [r.register_forward_hook(chosen) for r in routers]
        with torch.no_grad():
            model(input_ids=fixed_batch(model.config.vocab_size))
        for hook in hooks:
            hook.remove()
        experts = routers[0].weight.shape[0]
        out[name] = [torch.bincount(p.reshape(-1), minlength=experts).tolist() for p in picks]
    return out


@pytest.mark.parametrize("case, reference", VALIDATE, ids=[f"{c.id}-{ref}" for c, ref in VALIDATE])
def test_tokens_per_expert_match_transformers_routing(
    case, reference, launches, hf_tokens_per_expert
):
    """The load statistics count every real token once: no pad rows (EP chunks, -sp sequence)."""
    result = launches.result(("validate", case.id, reference)).json()
    assert result["tokens_per_expert"] == hf_tokens_per_expert[case.source], case.id


@pytest.mark.parametrize("case", GENERATE, ids=[c.id for c in GENERATE])
def test_greedy_generation_matches_transformers(case, launches, sources, hf_models):
    _, directory = sources[case.source]
    prompt = PROMPTS[case.source]
    prompt_ids = _tokenizer(directory).encode(prompt).ids
    # The prompt must not split evenly: prefill pads over tp (-sp) and over the EP group.
    mesh = _mesh(case.layout)
    for size in {*mesh.values(), _world(case.layout)} - {1}:
        assert len(prompt_ids) % size != 0, (case.layout, size, len(prompt_ids))

    model = hf_models[case.source]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    want = out.sequences[0, len(prompt_ids) :].tolist()
    # The oracle's choices are clear: no step hinges on a near tie of the top two logits.
    for step, logits in enumerate(out.logits):
        top2 = logits[0].float().topk(2).values
        assert top2[0] - top2[1] > 1e-3, f"step {step}: near tie in transformers' own logits"

    launch = launches.result(("run", case.id))
    result = launch.json()
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert result["prompt_ids"] == prompt_ids
    assert result["layout"] == case.layout and result["world_size"] == _world(case.layout)
    assert result["output_ids"] == want, f"{case.id}: {result['output_ids']} != {want}"
    assert len(want) == MAX_NEW_TOKENS  # no early stop hides a difference after it
    assert result["text"] == _tokenizer(directory).decode(want, skip_special_tokens=True)
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def _routing_counts(rank: int, world: int, directory: str) -> tuple[int, int]:
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.runtime.load import load_parallel_model

    ckpt = ShardedCheckpoint(directory)
    pm = load_parallel_model(ckpt, rank, device=torch.device("cpu"))
    ids_BT = torch.arange(10)[None] % ckpt.manifest.config["vocab_size"]
    with torch.no_grad():
        pm.model(ids_BT)
        off = sum(int(h.tokens_per_expert.sum()) for h in pm.moe_hooks)
        pm.record_routing()
        pm.model(ids_BT)
        on = sum(int(h.tokens_per_expert.sum()) for h in pm.moe_hooks)
    return off, on


def test_routing_statistics_are_counted_only_when_asked(convert_tiny):
    """Counting routed tokens costs an all-reduce and a host sync per MoE layer: generation
    skips it, validate turns it on (and then every real (token, expert) pair counts once)."""
    from helpers_dist import run_on_ranks

    from reshard.checkpoint import ShardedCheckpoint

    directory = convert_tiny("ep2")
    ckpt = ShardedCheckpoint(directory)
    k = ckpt.manifest.config["num_experts_per_tok"]
    layers = sum(1 for name in ckpt.params if name.endswith("mlp.experts.gate_up_proj"))
    assert run_on_ranks(_routing_counts, 2, str(directory)) == [(0, 10 * k * layers)] * 2


def _decode_step_logits(rank: int, world: int, directory: str) -> dict:
    """After the same prefill, one decode step's logits through the all_to_all dispatch and
    inside `decode_steps` (each EP rank applies its own experts to every row, then a sum), and
    which path each MoE layer took."""
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.runtime.decode import decode_steps
    from reshard.runtime.load import load_parallel_model
    from reshard.runtime.model import KVCache

    ckpt = ShardedCheckpoint(directory)
    pm = load_parallel_model(ckpt, rank, device=torch.device("cpu"))
    vocab = ckpt.manifest.config["vocab_size"]
    prompt_BT = (torch.arange(14).view(2, 7) * 5 + 1) % vocab
    next_B1 = torch.tensor([[3], [11]])
    out = {}
    with torch.no_grad():
        for how in ("exchange", "in place"):
            cache = KVCache(16)
            pm.model(prompt_BT, 0, cache)
            if how == "in place":
                with decode_steps(torch.device("cpu")):
                    logits = pm.model(next_B1, 7, cache)
            else:
                logits = pm.model(next_B1, 7, cache)
            out[how] = (logits, [h.state.in_place for h in pm.moe_hooks])
    return out


def test_a_decode_step_applies_the_experts_in_place_of_the_exchange(convert_tiny):
    """Under EP a decode step needs no all_to_all sized by the routing (a host round trip per
    layer): every rank applies its own experts to all rows and the outputs are summed. Same
    logits as the exchange (fp32, to rounding), on every rank, with expert TP too (ep2tp2)."""
    from helpers_dist import run_on_ranks

    results = run_on_ranks(_decode_step_logits, 4, str(convert_tiny("ep2tp2")))
    for rank, result in enumerate(results):
        (exchange, paths_exchange), (in_place, paths_in_place) = (
            result["exchange"],
            result["in place"],
        )
        assert paths_exchange and not any(paths_exchange), (rank, paths_exchange)
        assert paths_in_place and all(paths_in_place), (rank, paths_in_place)
        torch.testing.assert_close(in_place, exchange, rtol=1e-5, atol=1e-5, msg=f"rank {rank}")
        torch.testing.assert_close(in_place, results[0]["in place"][0], rtol=0, atol=0)


def _static_and_eager_tokens(rank: int, world: int, directory: str) -> list:
    from reshard.checkpoint import ShardedCheckpoint
    from reshard.runtime.load import load_parallel_model
    from reshard.runtime.worker import Decoder

    pm = load_parallel_model(ShardedCheckpoint(directory), rank, device=torch.device("cpu"))
    prompts = [[5, 9, 2, 7, 1], [4, 8]]  # padded: per-row positions in the static step
    with torch.no_grad():
        return [
            Decoder(pm, torch.device("cpu"), [], static_decode=static).generate(
                prompts, max_new_tokens=6
            )[0]
            for static in (True, False)
        ]


def test_static_shape_decode_under_ep_gives_the_eager_tokens(convert_tiny):
    """The static decode step (fixed shapes: the position in a device tensor, the experts applied
    in place of the exchange), which a CUDA graph could capture, at ep2tp2: the eager step's
    greedy tokens on a padded batch, on every rank."""
    from helpers_dist import run_on_ranks

    results = run_on_ranks(_static_and_eager_tokens, 4, str(convert_tiny("ep2tp2")))
    static, eager = results[0]
    assert static == eager and all(len(row) == 6 for row in static), (static, eager)
    assert all(r == results[0] for r in results), results
