"""Tiny FP8 block-scaled checkpoints, quantized and dequantized by transformers' own code.

The `-FP8` releases (Qwen3-30B-A3B-FP8, DeepSeek-V3) store each quantized Linear as
`X.weight` float8_e4m3fn plus `X.weight_scale_inv` float32 per [128, 128] block. transformers
5.24 cannot load them on a CPU-only machine without accelerate, so the oracle is its
FineGrainedFP8 integration used piece by piece, never our own formula:

* which tensors are quantized, and the names and shapes of their scales in memory
  (`q_proj.weight_scale_inv`, fused `experts.gate_up_proj_scale_inv [E, 2I/b, H/b]`): the
  parameters of the model `replace_with_fp8_linear` builds (`fp8_param_table`), with
  `lm_head` left out as its quantizer leaves it out;
* the FP8 values and scales: `Fp8Quantize._quantize_one`, applied to the per-expert tensors
  `save_pretrained` writes (the checkpoint) and, independently, to the fused tensors
  transformers holds in memory (the global tensors every rank is checked against);
* the dequantized values: `Fp8Dequantize._dequantize_one`.

The tiny models have hidden 64, so blocks are [16, 16] instead of [128, 128]: tp2 splits
whole blocks, tp4 cuts the 32-row experts into 8-row pieces (refused), as tp4 cuts
Qwen3-30B-A3B-FP8's 768-row experts into 192-row pieces of 128-row blocks. Tensors left
unquantized stay float32 (the releases keep them in bf16), so the runtime's parity with
transformers is held at fp32 tolerances.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from helpers_families import FAMILIES, build_model, hf_state, write_checkpoint
from safetensors.torch import load_file, save_file

BLOCK = (16, 16)
NOT_CONVERTED = ["lm_head"]  # transformers' quantizer keeps the output head unquantized


def fp8_config(block=BLOCK):
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config(
        weight_block_size=tuple(block), modules_to_not_convert=list(NOT_CONVERTED)
    )


def fp8_param_table(model_type: str, block=BLOCK) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of every tensor of transformers' FP8 model of this family (built
    on meta)."""
    import transformers
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(FAMILIES[model_type].config())
    model = replace_with_fp8_linear(
        model,
        modules_to_not_convert=list(NOT_CONVERTED),
        quantization_config=fp8_config(block),
        pre_quantized=True,
    )
    # state_dict: parameters and persistent buffers (deepseek_v3's e_score_correction_bias)
    return {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}


def _quantizer(block=BLOCK):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    return Fp8Quantize(types.SimpleNamespace(quantization_config=fp8_config(block)))


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' own dequantization (`Fp8Dequantize._dequantize_one`)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=dtype)


def _quantized_modules(model_type: str, block) -> set[str]:
    return {
        n.removesuffix("_scale_inv").rsplit(".", 1)[0]
        for n in fp8_param_table(model_type, block)
        if n.endswith("_scale_inv")
    }


def write_fp8_checkpoint(model_type: str, directory: Path, *, block=BLOCK, seed: int = 0) -> Path:
    """`write_checkpoint(model_type)` with every weight transformers' FP8 model quantizes
    quantized by transformers' `Fp8Quantize` (per expert, as the releases store them), and
    `quantization_config` in config.json.

    A file tensor belongs to a quantized module when its name less `.weight` is one, or lies
    under a quantized `experts` module (transformers fuses those at load). Families whose
    files rename modules (mixtral's block_sparse_moe) are not mapped here.
    """
    directory = write_checkpoint(model_type, Path(directory), seed=seed)
    modules = _quantized_modules(model_type, block)
    quantize = _quantizer(block)
    for f in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(f))
        out = {}
        for key, value in tensors.items():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and (
                module in modules or any(module.startswith(m + ".") for m in modules)
            ):
                out.update(quantize._quantize_one(key, value))
            else:
                out[key] = value
        save_file(out, str(f), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": list(NOT_CONVERTED),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def fused_fp8_state(model_type: str, *, block=BLOCK, seed: int = 0) -> dict[str, torch.Tensor]:
    """The global tensors of the FP8 model, in memory (fused experts): transformers' in-memory
    state of `build_model`, each weight of transformers' FP8 table quantized as a whole by
    `Fp8Quantize` (its scale under transformers' FP8 name)."""
    table = fp8_param_table(model_type, block)
    quantize = _quantizer(block)
    out = {}
    for name, tensor in hf_state(build_model(model_type, seed=seed)).items():
        scale = name + "_scale_inv"
        if scale in table:
            q = quantize._quantize_one(name, tensor)
            assert set(q) == {name, scale}, (name, sorted(q))
            out.update(q)
        else:
            out[name] = tensor
    return out


def write_dequantized_copy(src: Path, dst: Path) -> Path:
    """The FP8 checkpoint `src` dequantized to float32 by transformers' own function, as an
    unquantized checkpoint (no quantization_config): what transformers runs as the oracle."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            out = {}
            for key, value in tensors.items():
                if key.endswith("_scale_inv"):
                    continue
                scale = tensors.get(key + "_scale_inv")
                out[key] = value if scale is None else dequantize(value, scale, torch.float32)
            save_file(out, str(dst / f.name), metadata={"format": "pt"})
        elif f.name == "config.json":
            config = json.loads(f.read_text())
            config.pop("quantization_config")
            (dst / f.name).write_text(json.dumps(config, indent=2))
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst
