"""Single-process references for `reshard validate`: logits, loss and every gradient
of a fixed batch, written to one safetensors file that each rank then reads
slice by slice (the same slice machinery as convert).

- `streamed_reference`: the same model code, unsharded, streamed layer by layer
  from the source checkpoint: one layer's weights in memory at a time, layer
  inputs kept, backward by recomputing each layer. It fits where the full
  model does not.
- `transformers_reference`: transformers' own model, when installed (the
  optional oracle; `--reference transformers`).
"""

# Shape suffixes: B = batch, T = tokens, H = hidden, V = vocab.

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reshard.convert import make_plan
from reshard.layout import Layout
from reshard.runtime.model import causal_lm_loss, meta_model, rope_cos_sin
from reshard.sources import Source
from reshard.writer import ShardWriter

GRAD = "grad/"


def fixed_batch(vocab_size: int, batch: int = 3, seq_len: int = 13, seed: int = 0) -> torch.Tensor:
    """The validation batch: seeded random ids. 13 tokens and 3 x 13 = 39 rows, so no
    power-of-two tp (sequence padding) or ep size (token-chunk padding) divides them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


def _entries(names_shapes, ids_BT, vocab) -> list:
    B, T = ids_BT.shape
    return [
        ("input_ids", torch.int64, (B, T)),
        ("logits", torch.float32, (B, T, vocab)),
        ("loss", torch.float32, ()),
        *[(GRAD + n, torch.float32, s) for n, s in names_shapes],
    ]


def streamed_reference(source: Source, ids_BT: torch.Tensor, out: Path) -> None:
    """Forward and backward of `ids_BT` (labels = ids) on `source`, one layer in memory at a time."""
    plan = make_plan(source, Layout.parse("tp1"))
    args = plan.args
    skeleton = meta_model(args)

    def load(module: nn.Module, prefix: str) -> nn.Module:
        state = {n: plan.targets[prefix + n].materialize().float() for n in module.state_dict()}
        module.load_state_dict(state, assign=True)
        return module

    def params(module: nn.Module, prefix: str) -> list[tuple[str, nn.Parameter]]:
        return [(prefix + n, p) for n, p in module.named_parameters()]

    layers = skeleton.model.layers
    order = [(n, p.shape) for n, p in params(skeleton.lm_head, "lm_head.")]
    order += [(n, p.shape) for n, p in params(skeleton.model.norm, "model.norm.")]
    for i in reversed(range(len(layers))):
        order += [(n, p.shape) for n, p in params(layers[i], f"model.layers.{i}.")]
    order += [(n, p.shape) for n, p in params(skeleton.model.embed_tokens, "model.embed_tokens.")]
    if args.tie_word_embeddings:
        order = [(n, s) for n, s in order if n != "lm_head.weight"]

    B, T = ids_BT.shape
    cos_TD, sin_TD = rope_cos_sin(
        torch.arange(T),
        args.rotary_dim,
        args.rope_theta,
        torch.float32,
        args.rope_interleaved,
        yarn=args.yarn,
        polar=args.rope_fp32,
    )
    with ShardWriter(out, _entries(order, ids_BT, args.vocab_size)) as writer:
        writer.write("input_ids", ids_BT)
        embed = load(skeleton.model.embed_tokens, "model.embed_tokens.")
        with torch.no_grad():
            inputs = [embed(ids_BT)]
            for i, layer in enumerate(layers):
                inputs.append(load(layer, f"model.layers.{i}.")(inputs[-1], cos_TD, sin_TD))
                layer.to("meta")  # drop the layer's weights; only its input is kept
        h_BTH = inputs.pop().requires_grad_()
        norm, head = load(skeleton.model.norm, "model.norm."), load(skeleton.lm_head, "lm_head.")
        if args.tie_word_embeddings:
            head.weight = embed.weight
        logits_BTV = head(norm(h_BTH)).float()
        loss = causal_lm_loss(logits_BTV, ids_BT)
        loss.backward()
        writer.write("logits", logits_BTV.detach())
        writer.write("loss", loss.detach())
        for name, p in params(head, "lm_head.") + params(norm, "model.norm."):
            if not (args.tie_word_embeddings and name == "lm_head.weight"):
                writer.write(GRAD + name, p.grad)
        grad_BTH = h_BTH.grad
        for i in reversed(range(len(layers))):
            layer = load(layers[i], f"model.layers.{i}.")
            x_BTH = inputs.pop().requires_grad_()
            layer(x_BTH, cos_TD, sin_TD).backward(grad_BTH)  # recompute, then backward
            for name, p in params(layer, f"model.layers.{i}."):
                writer.write(GRAD + name, p.grad)
            grad_BTH = x_BTH.grad
            layer.to("meta")
        embed(ids_BT).backward(grad_BTH)
        writer.write(GRAD + "model.embed_tokens.weight", embed.weight.grad)


def transformers_reference(source: Source, ids_BT: torch.Tensor, out: Path) -> None:
    """The same numbers from transformers' own model (needs `pip install transformers`)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        from reshard.errors import ReshardError

        raise ReshardError(
            "--reference transformers needs transformers: pip install 'reshard[test]'"
        ) from e
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = {}
    if (source.config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        # Dequantized on load: transformers' MXFP4 kernels need a GPU (or accelerate, kernels).
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32, **kwargs)
    out_ = model(input_ids=ids_BT, labels=ids_BT)
    out_.loss.backward()
    named = [(n, p) for n, p in model.named_parameters()]
    with ShardWriter(
        out, _entries([(n, p.shape) for n, p in named], ids_BT, model.config.vocab_size)
    ) as writer:
        writer.write("input_ids", ids_BT)
        writer.write("logits", out_.logits.detach().float())
        writer.write("loss", out_.loss.detach().float())
        for name, p in named:
            writer.write(GRAD + name, p.grad)
