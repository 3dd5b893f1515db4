"""What reshard cannot convert yet is named for what it is: the model type (with the nearest
supported one) and tensors of quantized formats (GPTQ; MXFP4 blocks and FP8 block scales
without their quantization_config: here and tests/test_fp8.py; MXFP4 itself:
tests/test_mxfp4.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers_cli import one_error_line, reshard_cmd

from reshard.converters import get_spec, supported_model_types
from reshard.errors import ConversionError
from reshard.writer import save_tensors


def _reshard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*reshard_cmd(), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "model_type, nearest",
    [
        ("qwen3_moe_v2", "qwen3_moe"),
        ("glm4moe", "glm4_moe"),
        ("Mixtral", "mixtral"),
        ("mystery", None),
    ],
)
def test_unknown_model_type_names_the_nearest_supported(model_type, nearest):
    with pytest.raises(ConversionError) as e:
        get_spec(model_type)
    message = str(e.value)
    assert f"model_type {model_type!r} is not supported" in message
    assert f"supported: {', '.join(supported_model_types())}" in message
    assert "qwen3_moe" in supported_model_types() and "mixtral" in supported_model_types()
    assert (f"(nearest: {nearest})" in message) == (nearest is not None), message


@pytest.mark.parametrize(
    "suffix, what, why",
    [
        (".gate_up_proj_blocks", "MXFP4 weights", "need config.json's quantization_config"),
        (".qweight", "GPTQ/AWQ quantized weights", "not supported yet"),
    ],
)
def test_quantized_tensors_are_named_for_what_they_are(tiny_dir, tmp_path, suffix, what, why):
    src = Path(shutil.copytree(tiny_dir, tmp_path / "src"))
    name = "model.layers.0.mlp.experts.0.down_proj" + suffix
    extra = src / "model-00003-of-00003.safetensors"
    save_tensors(extra, {name: torch.ones(2, 2)})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = extra.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    result = _reshard("plan", "--src", str(src), "--layout", "tp2")
    error = one_error_line(result.returncode, result.stderr, what, why, name)
    assert "no converter maps" not in error
