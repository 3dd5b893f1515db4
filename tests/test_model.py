"""runtime/model.py against transformers' Qwen3MoeForCausalLM on tiny CPU configs."""

import pytest
import torch

from reshard.converters import get_spec
from reshard.runtime.generate import generate, sample_next
from reshard.runtime.model import (
    CausalLM,
    Experts,
    KVCache,
    causal_lm_loss,
    grouped_expert_mlp,
)

transformers = pytest.importorskip("transformers")


parse_config = get_spec("qwen3_moe").parse_config
TOL = 1e-5

CASES = {
    "moe": {},
    "norm_topk": {"norm_topk_prob": True},
    "dense_layer_1": {"mlp_only_layers": [1]},
    "tied": {"tie_word_embeddings": True, "norm_topk_prob": True},
}


def hf_config(**overrides):
    kwargs = dict(
        vocab_size=128,
        hidden_size=32,
        moe_intermediate_size=16,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return transformers.Qwen3MoeConfig(**kwargs)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight at scales where a wrong op moves logits far beyond TOL.

    transformers' init (std 0.02, norms at 1) leaves the blocks nearly linear and
    the router nearly uniform, which would let e.g. a gate/up swap slip through.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(1.0 * noise)  # sharp routing: top-k differs between tokens
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)  # unit-scale activations


def make_pair(case: str, seed: int = 0):
    config = hf_config(**CASES[case])
    torch.manual_seed(seed)
    hf = transformers.Qwen3MoeForCausalLM(config).eval()
    randomize_(hf, seed)
    ours = CausalLM(parse_config(config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- parameter names and config parsing -------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_names_and_shapes_match_transformers(case):
    config = hf_config(**CASES[case])
    hf = transformers.Qwen3MoeForCausalLM(config)
    ours = CausalLM(parse_config(config.to_dict()))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in hf.named_parameters()]


def test_dense_layer_has_mlp_projections_and_no_experts():
    names = set(CausalLM(parse_config(hf_config(mlp_only_layers=[1]).to_dict())).state_dict())
    assert "model.layers.1.mlp.gate_proj.weight" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(n.startswith("model.layers.1.mlp.experts") for n in names)


def qwen_style_config() -> dict:
    # The spelling of Qwen's own config.json: num_experts, rope_theta, no head_dim.
    return {
        "model_type": "qwen3_moe",
        "vocab_size": 1000,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "moe_intermediate_size": 24,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "mlp_only_layers": [],
        "decoder_sparse_step": 1,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    }


def test_from_hf_config_reads_qwen_spelling():
    args = parse_config(qwen_style_config())
    assert (args.num_experts, args.top_k, args.head_dim) == (16, 4, 8)
    assert (args.num_layers, args.num_heads, args.num_kv_heads) == (3, 8, 2)
    assert args.rope_theta == 1000000.0 and args.norm_topk_prob


def test_from_hf_config_reads_transformers_spelling():
    cfg = hf_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5}).to_dict()
    assert "num_local_experts" in cfg and "num_experts" not in cfg
    args = parse_config(cfg)
    assert (args.num_experts, args.rope_theta, args.head_dim) == (8, 5e5, 8)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            {"num_key_value_heads": 3},
            ValueError,
            r"num_heads \(8\) is not divisible by num_kv_heads \(3\)",
        ),
        (
            {"num_experts_per_tok": 17},
            ValueError,
            r"top_k \(17\) must be in \[1, num_experts \(16\)\]",
        ),
        (
            {"mlp_only_layers": [1, 3]},
            ValueError,
            r"mlp_only_layers has \[3\], outside \[0, num_hidden_layers \(3\)\)",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            ValueError,
            r"rope_scaling\.rope_type 'llama3' is not supported; supported: default, yarn",
        ),
        ({"use_sliding_window": True}, ValueError, "use_sliding_window is True"),
        (
            {"num_experts": None, "num_experts_per_tok": None},
            ValueError,
            r"lacks num_experts \(or num_local_experts\), num_experts_per_tok$",
        ),
    ],
)
def test_from_hf_config_errors_name_the_field(change, error, match):
    cfg = {k: v for k, v in {**qwen_style_config(), **change}.items() if v is not None}
    with pytest.raises(error, match=match):
        parse_config(cfg)


# --- numerics against transformers ---------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    hf, ours = make_pair(case)
    ids = random_ids(2, 16)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 16, 128) and got.dtype == torch.float32
    assert want.abs().max() > 1.0  # logits are not near zero, so TOL means something
    assert max_diff(got, want) < TOL


def test_comparison_detects_a_gate_up_swap():
    # A plausible converter bug must fail the logits check above by a wide margin.
    hf, ours = make_pair("moe")
    with torch.no_grad():
        gate_up = ours.model.layers[0].mlp.experts.gate_up_proj
        gate_up.copy_(torch.cat(gate_up.chunk(2, dim=1)[::-1], dim=1))
        ids = random_ids(2, 16)
        assert max_diff(ours(ids), hf(ids).logits) > 1e-2


def test_routing_is_not_degenerate():
    # With near-uniform routing most tokens would pick the same experts and
    # the expert bookkeeping (sort, counts, un-sort) would go untested.
    _, ours = make_pair("moe")
    seen = {}
    moe = ours.model.layers[0].mlp
    moe.gate.register_forward_hook(lambda m, i, out: seen.update(ids=out[0]))
    with torch.no_grad():
        ours(random_ids(2, 16))
    assert len(seen["ids"].unique()) == 8
    assert len({tuple(sorted(r)) for r in seen["ids"].tolist()}) > 4


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_match_transformers(case):
    hf, ours = make_pair(case)
    hf.train(), ours.train()
    ids = random_ids(2, 16)
    want = hf(ids, labels=ids).loss
    got = causal_lm_loss(ours(ids), ids)
    want.backward()
    got.backward()
    assert abs(got.item() - want.item()) < TOL
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name  # every weight, every expert, gets signal
        assert max_diff(p.grad, hf_grads[name].grad) < TOL, name


def test_loss_skips_ignored_labels():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[0, 3, -100, 7]])
    want = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([3, 7]))
    assert abs(causal_lm_loss(logits, labels).item() - want.item()) < 1e-6


# --- KV cache and generation ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["moe", "dense_layer_1"])
def test_cached_decoding_equals_full_forward(case):
    _, ours = make_pair(case)
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(max_seq_len=16)
        # Prefill, a multi-token chunk on top of the cache, then single tokens.
        pieces = [ours(ids[:, :5], 0, cache), ours(ids[:, 5:8], 5, cache)]
        pieces += [ours(ids[:, t : t + 1], t, cache) for t in range(8, 12)]
    assert max_diff(torch.cat(pieces, dim=1), full) < TOL


def test_kv_cache_refuses_overflow():
    _, ours = make_pair("moe")
    with pytest.raises(
        ValueError, match=r"sequence length \(9\) exceeds the KV cache max_seq_len \(8\)"
    ):
        ours(random_ids(1, 9), 0, KVCache(max_seq_len=8))


def cached_step(model: CausalLM, max_seq_len: int = 64):
    cache = KVCache(max_seq_len)
    return lambda ids, start_pos: model(ids, start_pos, cache)


@pytest.mark.parametrize("case, B", [("moe", 1), ("norm_topk", 2), ("dense_layer_1", 1)])
def test_greedy_generate_matches_transformers(case, B):
    hf, ours = make_pair(case)
    prompt = random_ids(B, 7, seed=3)
    want = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=0,
    )
    got = generate(cached_step(ours), prompt, max_new_tokens=12)
    assert got.shape == (B, 7 + 12)
    assert got.tolist() == want.tolist()
    assert len(set(got[0, 7:].tolist())) > 1  # not a single repeated token


def test_generate_stops_at_eos_and_pads_finished_rows():
    _, ours = make_pair("moe")
    prompt = random_ids(2, 5, seed=4)
    free = generate(cached_step(ours), prompt, max_new_tokens=10)
    eos = free[0, 5 + 2].item()  # row 0 emits this at its third new token
    out = generate(cached_step(ours), prompt, max_new_tokens=10, eos_token_ids=[eos])
    row0 = out[0, 5:].tolist()
    assert row0[: row0.index(eos) + 1] == free[0, 5 : 5 + row0.index(eos) + 1].tolist()
    assert set(row0[row0.index(eos) :]) == {eos}
    assert out.shape[1] == 15 or (out[:, 5:] == eos).any(dim=1).all()


def test_sampling_is_seeded_and_top_p_narrows_to_argmax():
    _, ours = make_pair("moe")
    prompt = random_ids(1, 5, seed=5)
    greedy = generate(cached_step(ours), prompt, max_new_tokens=8)

    def sampled(seed, top_p=1.0):
        return generate(
            cached_step(ours), prompt, max_new_tokens=8, temperature=1.0, top_p=top_p, seed=seed
        )

    assert torch.equal(sampled(7), sampled(7))
    assert any(not torch.equal(sampled(7), sampled(s)) for s in range(8, 12))
    # A tiny nucleus keeps only the most likely token: sampling becomes greedy.
    assert torch.equal(sampled(7, top_p=1e-6), greedy)


def test_sample_next_respects_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {
        sample_next(logits, temperature=1.0, top_p=0.7, generator=gen).item() for _ in range(200)
    }
    assert draws == {0, 1}


# --- expert compute -------------------------------------------------------------------------


def looped_reference(x, counts, gate_up, down):
    """Token by token, the obvious way: the oracle for the grouped paths."""
    out, start = [], 0
    for e, n in enumerate(counts):
        for row in x[start : start + n]:
            gate, up = (gate_up[e] @ row).chunk(2)
            out.append(down[e] @ (torch.nn.functional.silu(gate) * up))
        start += n
    return torch.stack(out)


def test_grouped_expert_mlp_matches_per_token_reference():
    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1]
    x = torch.randn(9, 6, generator=gen)
    gate_up, down = torch.randn(4, 8, 6, generator=gen), torch.randn(4, 6, 4, generator=gen)
    got = grouped_expert_mlp(x, torch.tensor(counts), gate_up, down)
    assert max_diff(got, looped_reference(x, counts, gate_up, down)) < TOL


def test_experts_module_matches_transformers_experts():
    config = hf_config()
    theirs = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
    ours = Experts(parse_config(config.to_dict()))
    randomize_(theirs, seed=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 32, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=gen)
    assert max_diff(ours(x, ids, weights), theirs(x, ids, weights)) < TOL


def _gpt_oss_experts() -> tuple:
    """transformers' GptOssExperts (interleaved gate/up, biases, clamped SwiGLU) and ours, with
    the same redrawn weights."""
    config = transformers.GptOssConfig(
        hidden_size=32, intermediate_size=16, num_local_experts=8, swiglu_limit=1.0
    )
    theirs = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(config)
    randomize_(theirs, seed=2)
    ours = Experts(get_spec("gpt_oss").parse_config(config.to_dict()))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def test_experts_module_matches_transformers_gpt_oss_experts():
    theirs, ours = _gpt_oss_experts()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 32, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=gen)
    assert max_diff(ours(x, ids, weights), theirs(x, ids, weights)) < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="grouped_mm path is CUDA bf16")
def test_grouped_mm_path_with_expert_biases_matches_loop_on_cuda():
    """GPT-OSS's experts on the grouped_mm path: each row's bias found on the device."""
    _, ours = _gpt_oss_experts()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 32, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(40)])
    ids[ids == 3] = 0  # an expert with no tokens
    weights = torch.rand(40, 2, generator=gen)
    want = ours(x, ids, weights)  # fp32 on the CPU: the loop
    ours = ours.cuda().bfloat16()
    got = ours(x.cuda().bfloat16(), ids.cuda(), weights.cuda().bfloat16())
    assert max_diff(got.float().cpu(), want) < 2e-2 * want.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="grouped_mm path is CUDA bf16")
@pytest.mark.parametrize("transposed", [False, True], ids=["v5-layout", "llama4-layout"])
def test_grouped_mm_path_matches_loop_on_cuda(monkeypatch, transposed):
    # Count calls to the entry point runtime.model picks (F.grouped_mm calls
    # torch._grouped_mm itself, so only one of them is wrapped).
    calls = []
    owner, name = (
        (torch.nn.functional, "grouped_mm")
        if hasattr(torch.nn.functional, "grouped_mm")
        else (torch, "_grouped_mm")
    )
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 3, 0, 9])  # empty and unaligned groups
    x = torch.randn(34, 64, generator=gen)
    gate_up = torch.randn(6, 96, 64, generator=gen) / 8
    down = torch.randn(6, 64, 48, generator=gen) / 7
    bf16 = [t.cuda().bfloat16().requires_grad_() for t in (x, gate_up, down)]
    if transposed:  # Llama 4 stores [E, H, 2I] and [E, I, H]: the same math
        stored = [
            bf16[0],
            *(w.detach().transpose(-2, -1).contiguous().requires_grad_() for w in bf16[1:]),
        ]
        got = grouped_expert_mlp(stored[0], counts.cuda(), *stored[1:], transposed=True)
    else:
        got = grouped_expert_mlp(bf16[0], counts.cuda(), *bf16[1:])
    assert len(calls) == 2  # gate_up and down went through grouped_mm
    got.float().square().sum().backward()
    if transposed:  # gradients back in the v5 layout, to compare with the loop below
        for b, t in zip(bf16[1:], stored[1:], strict=True):
            b.grad = t.grad.transpose(-2, -1)
    fp32 = [t.detach().float().requires_grad_() for t in bf16]
    want = grouped_expert_mlp(fp32[0], counts.cuda(), *fp32[1:])  # fp32 takes the loop
    want.square().sum().backward()
    assert max_diff(got, want) < 2e-2 * want.abs().max().item()
    for name, b, f in zip(["x", "gate_up", "down"], bf16, fp32, strict=True):
        assert max_diff(b.grad, f.grad) < 2e-2 * f.grad.abs().max().item(), name


def _arithmetic_step(calls: list[int] | None = None, vocab: int = 11):
    """A stand-in for a model in `generate`: the next token is (last token + row + 1) mod
    vocab; each call's start position is appended to `calls`."""

    def step(ids_BT, start_pos):
        if calls is not None:
            calls.append(start_pos)
        nxt = (ids_BT[:, -1:] + torch.arange(ids_BT.shape[0])[:, None] + 1) % vocab
        return torch.nn.functional.one_hot(nxt, vocab).float()

    return step


def test_generate_streams_each_prefix_of_row_0_once_per_step():
    from reshard.runtime.generate import generate

    seen: list[list[int]] = []
    out = generate(
        _arithmetic_step(),
        torch.tensor([[3], [5]]),
        max_new_tokens=6,
        eos_token_ids=(1,),
        on_token=lambda ids: seen.append(list(ids)),
    )
    row0 = out[0, 1:].tolist()
    assert row0 == [4, 5, 6, 7, 8, 9]
    assert out[1, 1:].tolist() == [7, 9, 0, 2, 4, 6]
    assert seen == [row0[:k] for k in range(1, 7)]


def test_logits_from_gives_the_same_last_logits_and_only_those():
    args = parse_config(hf_config().to_dict())
    model = CausalLM(args).eval()
    randomize_(model, seed=3)
    ids_BT = torch.randint(0, args.vocab_size, (2, 7))
    full_BTV = model(ids_BT)
    last_B1V = model(ids_BT, logits_from=6)
    assert last_B1V.shape == (2, 1, args.vocab_size)
    # float32's tolerances, not bit equality: the BLAS picks its kernel by the number of rows,
    # and on an AVX-512 CPU 2 rows and 14 round differently (4.8e-7 apart). The logits of
    # another position differ by orders of magnitude more.
    torch.testing.assert_close(last_B1V, full_BTV[:, -1:])
    assert not torch.allclose(last_B1V, full_BTV[:, -2:-1])
    cache = KVCache(max_seq_len=16)
    step_B1V = model(ids_BT, 0, cache, logits_from=6)
    torch.testing.assert_close(step_B1V, full_BTV[:, -1:])


def test_generate_stops_one_step_after_every_row_has_finished():
    """Generation reads each step's tokens on the host only once the next step is queued (no
    GPU idle while the host checks for eos): it runs at most one step past the last row's eos
    and drops that step's tokens, so the output ends at the last eos, each row padded with its
    own."""
    from reshard.runtime.generate import generate

    calls: list[int] = []
    seen: list[list[int]] = []
    out = generate(
        _arithmetic_step(calls),
        torch.tensor([[3], [5]]),
        max_new_tokens=8,
        eos_token_ids=(6, 9),  # row 0 ends at its 3rd token (6), row 1 at its 2nd (9)
        on_token=lambda ids: seen.append(list(ids)),
    )
    assert out.tolist() == [[3, 4, 5, 6], [5, 7, 9, 9]]
    assert len(calls) == 4  # three steps and the one queued before the eos was read
    assert seen == [[4], [4, 5], [4, 5, 6]]


def test_triton_is_imported_only_by_a_cuda_decode_step(tmp_path):
    """`import triton` costs seconds on a cold start: loading the runtime and running experts on
    the CPU, in a decode step too, never imports it (a stand-in `triton` package on the path
    records any import)."""
    import os
    import subprocess
    import sys

    (tmp_path / "triton").mkdir()
    marker = tmp_path / "imported"
    (tmp_path / "triton" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    code = """
import torch
import reshard.runtime.worker
from reshard.architecture import ModelArgs
from reshard.runtime import indexed_experts
from reshard.runtime.decode import decode_steps
from reshard.runtime.model import Experts

assert indexed_experts.HAS_TRITON  # the stand-in is found, and not imported
args = ModelArgs(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                 head_dim=8, intermediate_size=32, moe_intermediate_size=8, num_experts=4, top_k=2)
with torch.no_grad(), decode_steps(torch.device("cpu")):
    Experts(args)(torch.randn(3, 16), torch.tensor([[0, 1]] * 3), torch.ones(3, 2))
"""
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()
