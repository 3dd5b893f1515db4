"""A tiny MXFP4 GPT-OSS checkpoint, laid out as openai/gpt-oss-120b is, and its oracles.

transformers 5.24 has no MXFP4 quantizer that runs here (`quantize_to_mxfp4` calls the Triton
kernels it downloads from the Hub), so the packing is written once below, to the OCP
Microscaling spec (v1.0, MXFP4): per 32 consecutive values of a weight's In dim, a shared
scale 2 ** e with e = floor(log2(max |v|)) - 2 (2 is e2m1's largest exponent), stored as the
byte e + 127 (e8m0), and each value v / 2 ** e rounded to the nearest e2m1 number (0, 0.5, 1,
1.5, 2, 3, 4, 6, with a sign bit; ties to the even code), saturating at 6; two codes a byte,
the first in the low nibble. Everything the tests compare against is transformers' own:
it reads the checkpoint (`Mxfp4Config(dequantize=True)`: dequantized on load, the CPU path) and
dequantizes it (`convert_moe_packed_tensors`), so a packing mistake here would only change the
test data, not the verdicts.

The checkpoint is the tiny gpt_oss family case (helpers_families.py: intermediate 64, so two
blocks of 32 per expert row, split whole over expert tp2 and cut by tp4) with its expert
weights quantized, the rest (biases, attention, router, embeddings) float32, and config.json's
`quantization_config` as the release has it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers_families import build_model, hf_state, write_byte_tokenizer
from safetensors.torch import save_file

from reshard.synth import PRESETS

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# As openai/gpt-oss-120b's config.json has it (reshard synth's preset copies the release).
QUANTIZATION_CONFIG = PRESETS["gpt-oss-120b"][0]["quantization_config"]
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An MXFP4 weight `[*L, In, Out]` -> (blocks `[*L, Out, In / 32, 16]`, scales
    `[*L, Out, In / 32]`), the checkpoint's layout (out-features first)."""
    *lead, n_in, n_out = weight.shape
    groups = weight.float().transpose(-2, -1).reshape(*lead, n_out, n_in // 32, 32)
    amax = groups.abs().amax(dim=-1)
    exponent = torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - 2
    exponent = exponent.clamp(-127, 127)
    x = groups / torch.exp2(exponent)[..., None]
    distance = (x.abs().clamp(max=6.0)[..., None] - E2M1).abs()
    distance += 1e-6 * (torch.arange(8) % 2)  # a tie goes to the even code
    code = distance.argmin(dim=-1) | ((x < 0).long() << 3)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8).contiguous()


def write_mxfp4_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    """The tiny gpt_oss model of `build_model("gpt_oss", seed=seed)` with its expert weights
    in MXFP4: `*_blocks` and `*_scales` instead of them, as the Hub release stores them."""
    model = build_model("gpt_oss", seed=seed)
    tensors = {}
    for name, tensor in hf_state(model).items():
        if name.endswith(EXPERTS):
            tensors[name + "_blocks"], tensors[name + "_scales"] = quantize(tensor)
        else:
            tensors[name] = tensor.contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {**model.config.to_dict(), "quantization_config": QUANTIZATION_CONFIG}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_byte_tokenizer(directory)
    return directory


def load_hf_mxfp4_model(directory: Path) -> torch.nn.Module:
    """transformers' own model of the MXFP4 checkpoint, dequantized on load, float32, eval."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory),
        dtype=torch.float32,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
    )
    return model.eval()


def transformers_dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """transformers' own dequantization of a 3-D expert weight (`[E, In, Out]` out)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)
