"""CUDA + NCCL parity: the same checks as the CPU suite, on GPUs.

Skipped without two CUDA devices; the same code paths run on CPU/gloo in
test_runtime_parity.py. On the GPU machine:

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
pytestmark = needs_two_gpus


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
