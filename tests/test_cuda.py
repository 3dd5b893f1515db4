"""CUDA + NCCL parity: the same checks as the CPU suite, on GPUs.

Skipped without CUDA (the multi-rank checks without two CUDA devices); the same code paths run
on CPU/gloo in test_runtime_parity.py and test_runtime_batch.py. On the GPU machine:

    RESHARD_RESULTS=cuda-results.jsonl python -m pytest -q tests/test_cuda.py

appends one JSON line of figures per check to $RESHARD_RESULTS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reshard(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reshard.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def record(**figures) -> None:
    path = os.environ.get("RESHARD_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    os.environ.setdefault("RESHARD_CACHE", str(tmp_path_factory.mktemp("cache")))
    from reshard.tiny import tiny_checkpoint

    return tiny_checkpoint("qwen3_moe")


def _convert(tmp_path: Path, layout: str, dtype: str = "keep") -> Path:
    out = tmp_path / f"{layout}-{dtype}"
    result = reshard(
        "convert",
        "--src",
        "tiny:qwen3_moe",
        "--layout",
        layout,
        "--out",
        str(out),
        "--dtype",
        dtype,
        "-q",
    )
    assert result.returncode == 0, result.stderr
    return out


@needs_two_gpus
@pytest.mark.parametrize("layout", ["tp2", "ep2", "tp2-tp2ep"])
def test_validate_on_cuda_matches_transformers(tiny_dir, tmp_path, layout):
    out = _convert(tmp_path, layout)
    result = reshard(
        "validate",
        str(out),
        "--against",
        "tiny:qwen3_moe",
        "--reference",
        "transformers",
        "--device",
        "cuda",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    record(check="validate", device=torch.cuda.get_device_name(0), **figures)
    assert figures["ok"]
    assert max(figures["max_abs_diff"].values()) <= 1e-4


@needs_two_gpus
@pytest.mark.parametrize(
    ("layout", "dtype"), [("tp2", "keep"), ("ep2", "keep"), ("tp2-tp2ep", "keep"), ("ep2", "bf16")]
)
def test_greedy_tokens_on_cuda_match_transformers(tiny_dir, tmp_path, layout, dtype):
    from transformers import AutoModelForCausalLM

    out = _convert(tmp_path, layout, dtype)
    prompt = "Why is the sky blue? Because"
    result = reshard(
        "run", str(out), "--prompt", prompt, "--max-new-tokens", "16", "--device", "cuda", "--json"
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch_dtype).cuda()
    ids = torch.tensor([got["prompt_ids"]], device="cuda")
    want = model.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=None)[
        0, ids.shape[1] :
    ].tolist()
    record(
        check="greedy",
        layout=layout,
        dtype=dtype,
        equal=got["output_ids"] == want,
        tokens_per_s=got["tokens_per_s"],
        text=got["text"],
    )
    assert got["output_ids"] == want[: len(got["output_ids"])]


def _graph_and_eager(
    rank: int, directory: str, prompts: list[list[int]]
) -> tuple[list, list, list[str]]:
    """Greedy tokens of the default decode (a CUDA graph in bf16) and of the eager one, and the
    expert path of each of the eager run's expert forwards, in order."""
    import torch.distributed as dist

    from reshard.checkpoint import open_checkpoint
    from reshard.runtime.load import load_parallel_model
    from reshard.runtime.model import Experts
    from reshard.runtime.worker import Decoder

    paths = []
    originals = {name: getattr(Experts, name) for name in ("_sorted", "_indexed")}
    for name, real in originals.items():

        def recorded(self, *args, real=real, path=name[1:]):
            paths.append(path)
            return real(self, *args)

        setattr(Experts, name, recorded)

    device = torch.device("cuda", 0)
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    try:
        pm = load_parallel_model(open_checkpoint(directory), 0, device=device)
        # The default: a graph where the experts run grouped_mm (bf16), eager where they loop.
        default = Decoder(pm, device, [])
        assert default.cuda_graph is (pm.model.lm_head.weight.dtype == torch.bfloat16)
        outs = []
        for decoder in (default, Decoder(pm, device, [], static_decode=False)):
            paths.clear()
            with torch.no_grad():
                outs.append(decoder.generate(prompts, max_new_tokens=16)[0])
        return *outs, list(paths)
    finally:
        dist.destroy_process_group()
        for name, real in originals.items():
            setattr(Experts, name, real)


@needs_gpu
@pytest.mark.parametrize("dtype", ["keep", "bf16"])
def test_cuda_graph_decode_matches_eager_and_transformers(tiny_dir, tmp_path, dtype):
    """tp1 on one GPU decodes through a replayed CUDA graph by default: a padded batch gives the
    eager step's tokens, and `reshard run` gives transformers' greedy tokens (bf16 too)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    out = _convert(tmp_path, "tp1", dtype)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch_dtype).cuda()
    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    prompts = [tok.encode(p).ids for p in ("Why is the sky blue? Because", "Hello")]
    graph, eager, paths = _graph_and_eager(0, str(out), prompts)
    assert graph == eager
    # The prefill (a few rows) takes the sorted path; in bf16 the decode steps the kernel.
    layers = model.config.num_hidden_layers
    assert paths[:layers] == ["sorted"] * layers, paths
    decode = set(paths[layers:])
    assert decode == ({"indexed"} if dtype == "bf16" else {"sorted"}), paths
    result = reshard(
        "run", str(out), "--prompt", "Why is the sky blue? Because", "--max-new-tokens", "16",
        "--device", "cuda", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    ids = torch.tensor([got["prompt_ids"]], device="cuda")
    want = model.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=None)[
        0, ids.shape[1] :
    ].tolist()
    record(check="cuda-graph", dtype=dtype, equal=got["output_ids"] == want, **got)
    assert got["output_ids"] == want[: len(got["output_ids"])]
    assert graph[0][: len(got["output_ids"])] == got["output_ids"]  # the CLI stops at eos


@needs_gpu
def test_compiled_decode_gives_the_graph_decode_tokens(tmp_path):
    """`reshard run --compile` (torch.compile, then the CUDA graph) changes speed, not tokens."""
    out = _convert(tmp_path, "tp1", "bf16")
    runs = {}
    for flags in ((), ("--compile",)):
        result = reshard(
            "run", str(out), "--prompt", "Why is the sky blue? Because", "--max-new-tokens", "16",
            "--device", "cuda", "--json", *flags, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[flags] = json.loads(result.stdout.strip().splitlines()[-1])
    record(check="compiled", **{" ".join(k) or "graph": v for k, v in runs.items()})
    assert runs[("--compile",)]["output_ids"] == runs[()]["output_ids"]


def _convert_dir(src: Path, out: Path, layout: str, dtype: str = "keep") -> Path:
    result = reshard(
        "convert", "--src", str(src), "--layout", layout, "--out", str(out), "--dtype", dtype, "-q"
    )
    assert result.returncode == 0, result.stderr
    return out


def _greedy_cli(out: Path, prompt: str) -> dict:
    result = reshard(
        "run", str(out), "--prompt", prompt, "--max-new-tokens", "12", "--device", "cuda", "--json"
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_gpu
def test_gpt_oss_on_cuda_matches_transformers_in_bf16_graphs_and_mxfp4(tmp_path):
    """gpt_oss on one GPU: attention sinks, sliding windows and expert biases on grouped_mm
    (bf16) decode a padded batch through the CUDA graph as the eager step does; fp32 shards,
    and MXFP4 shards dequantized per layer, give transformers' greedy tokens."""
    from helpers_families import load_hf_model, write_checkpoint
    from helpers_mxfp4 import load_hf_mxfp4_model, write_mxfp4_checkpoint
    from tokenizers import Tokenizer

    src = write_checkpoint("gpt_oss", tmp_path / "src")
    mx = write_mxfp4_checkpoint(tmp_path / "mxfp4")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    prompts = [tok.encode(p).ids for p in ("Why is the sky blue", "Hi")]
    graph, eager, _ = _graph_and_eager(
        0, str(_convert_dir(src, tmp_path / "bf16", "tp1", "bf16")), prompts
    )
    record(check="gpt_oss-cuda-graph", equal=graph == eager)
    assert graph == eager
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.24"):
        # 5.17 (the GPU image's) gives other GPT-OSS logits than 5.24 on the CPU as well (5.4
        # apart on this model), where ours and 5.24's agree: no oracle.
        pytest.skip(f"transformers {transformers.__version__} < 5.24 is no GPT-OSS oracle")
    for out, model in (
        (_convert_dir(src, tmp_path / "fp32", "tp1"), load_hf_model(src)),
        (_convert_dir(mx, tmp_path / "mx", "tp1"), load_hf_mxfp4_model(mx)),
    ):
        got = _greedy_cli(out, "Why is the sky blue")
        ids = torch.tensor([got["prompt_ids"]], device="cuda")
        with torch.no_grad():
            want = model.cuda().generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=None)
        want = want[0, ids.shape[1] :].tolist()
        record(check="gpt_oss-greedy", source=out.name, equal=got["output_ids"] == want)
        assert got["output_ids"] == want[: len(got["output_ids"])], out.name


@needs_gpu
@pytest.mark.parametrize("rows", [1, 8, 128])
@pytest.mark.parametrize("transposed", [False, True])
def test_indexed_expert_kernel_matches_torch_matmul(rows, transposed):
    """The decode kernel (`runtime.indexed_experts`): each routed row times its own expert's
    weight, plus that expert's bias, equals torch's fp32 matmul of the same bf16 values up to
    one bf16 rounding; stored and transposed weights alike."""
    from reshard.runtime.indexed_experts import indexed_linear

    torch.manual_seed(0)
    E, N, K_in, top_k = 16, 96, 200, 4  # K_in not a multiple of the kernel's block
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    if transposed:  # stored [E, in, out], handed over as a view
        weight_ENK = torch.randn(E, K_in, N, device=dev, dtype=bf16).transpose(-2, -1)
    else:
        weight_ENK = torch.randn(E, N, K_in, device=dev, dtype=bf16)
    bias_EN = torch.randn(E, N, device=dev, dtype=bf16)
    ids_M = torch.randint(0, E, (rows,), device=dev)
    tokens = -(-rows // top_k)
    x_TK = torch.randn(tokens, K_in, device=dev, dtype=bf16)
    got = indexed_linear(x_TK, ids_M, weight_ENK, bias_EN, rows_per_x=top_k)
    rows_x = x_TK[torch.arange(rows, device=dev) // top_k].float()
    want = torch.einsum("mk,mnk->mn", rows_x, weight_ENK[ids_M].float()) + bias_EN[ids_M].float()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2)
    assert got.dtype == bf16 and got.shape == (rows, N)


@needs_gpu
def test_indexed_and_sorted_experts_agree_for_every_family_variant():
    """`Experts.forward` at a decode's few rows (the indexed kernel) and at the sorted grouped
    GEMM give the same outputs in bf16 for the expert variants: Qwen's, Llama 4's (transposed,
    input scaling), GPT-OSS's (biases, interleaved clamped SwiGLU)."""
    from reshard.architecture import ModelArgs
    from reshard.runtime.decode import decode_steps
    from reshard.runtime.model import Experts

    base = dict(vocab_size=8, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    base.update(head_dim=32, intermediate_size=96, moe_intermediate_size=48, num_experts=8)
    variants = {
        "qwen3_moe": {},
        "llama4": dict(experts_transposed=True, expert_input_scaling=True),
        "gpt_oss": dict(
            experts_transposed=True, expert_bias=True, experts_interleaved=True, swiglu_limit=7.0
        ),
    }
    torch.manual_seed(0)
    for name, extra in variants.items():
        experts = Experts(ModelArgs(**base, top_k=2, **extra)).cuda().to(torch.bfloat16)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.1)
        x_TH = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
        ids_TK = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(4)])
        weights_TK = torch.rand(4, 2, device="cuda").to(torch.bfloat16)
        with torch.no_grad(), decode_steps(torch.device("cuda")):
            fast = experts(x_TH, ids_TK, weights_TK)  # 8 rows: the indexed kernel
        sorted_ = experts(x_TH, ids_TK, weights_TK)  # with grad: the sorted path
        torch.testing.assert_close(fast, sorted_.detach(), rtol=2e-2, atol=2e-2, msg=name)


@needs_gpu
@pytest.mark.parametrize("chunk", [None, 4096], ids=["default", "4kB-reads"])
def test_a_rank_loads_onto_the_gpu_as_safetensors_reads_it(tmp_path, chunk, monkeypatch):
    """`load_rank(device="cuda")` (pinned buffers, a stream per thread) gives the tensors that
    safetensors' own `load_file(device="cuda")` gives, also when reads cut every tensor."""
    from safetensors.torch import load_file

    import reshard.device_read as device_read
    from reshard.checkpoint import open_checkpoint

    if chunk is not None:
        monkeypatch.setattr(device_read, "CHUNK", chunk)
    ckpt = open_checkpoint(_convert(tmp_path, "ep2", "bf16"))
    got = ckpt.load_rank(1, device="cuda")
    want = load_file(str(ckpt.rank_path(1)), device="cuda")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].device.type == "cuda", name
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
