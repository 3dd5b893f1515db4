"""Make the single-device model in model.py run on local shards, per layout.

Nothing here edits the model code: we shrink the head counts on each
Attention and add forward hooks that move activations between ranks
(gpt-fast's tp.py, torchtitan's parallelize). Parameter names stay those of
transformers, so each rank's file loads with `load_state_dict(strict=True)`.

Per layout (T tokens of a step, replicated over tp after attention unless -sp):

| piece          | tp<B>                        | -sp                                   | ep<A> / -tp2ep                 |
| -------------- | ---------------------------- | ------------------------------------- | ------------------------------ |
| embed_tokens   | vocab rows; all-reduce       | vocab rows; reduce-scatter (sequence) | -                              |
| attention, MLP | local heads; all-reduce      | all-gather seq; reduce-scatter seq    | -                              |
| MoE            | expert I/B slices; all-reduce| gathered, then as without -sp         | chunk tokens over the EP group, all_to_all to the expert's rank and back, all-gather chunks |
| final norm     | -                            | all-gather seq first                  | -                              |
| lm_head        | vocab rows; all-gather logits| same                                  | -                              |

Every decision is read from the manifest's placements (the converter's plan is
the contract; there is no second copy here): attention runs head-parallel because
q_proj is Shard on tp, experts are expert-parallel over the mesh dims where
gate_up_proj is Shard(0), a whole-projection q/k norm sums its statistic over tp
because its weight is Shard(0) on tp. A parameter the manifest splits but no rule
here reads is refused, so the files and the forward cannot drift apart.

Gradients (validate): parameters that only saw part of the tokens or part of
the heads hold partial gradients; `finish_grads` sums them over that group.
"""

# Shape suffixes: B = batch, T = tokens, H = hidden, V = vocab, K = top-k,
# M = routed rows (T * K), R = rows received by this rank's experts, E = experts.

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from reshard.errors import CheckpointError
from reshard.layout import Layout
from reshard.placements import Placement, Replicate, Shard, StridedShard
from reshard.plan import ParamPlan
from reshard.runtime import collectives as C
from reshard.runtime.decode import decoding
from reshard.runtime.mla import MLAttention
from reshard.runtime.model import MLP, CausalLM, MoE, RMSNorm, inverse_permutation


def _new_group(layout: Layout, rank: int, key) -> dist.ProcessGroup | None:
    """Partition all ranks by `key(coords)` and return this rank's part as a process group.

    Every rank must call this with the same key: new_group is collective.
    """
    parts: dict[object, list[int]] = {}
    for r in range(layout.world_size):
        parts.setdefault(key(layout.coords(r)), []).append(r)
    mine = None
    for ranks in sorted(parts.values()):
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            mine = group
    return mine


@dataclass
class ParallelGroups:
    """The process groups a rank needs for `layout`.

    Attributes:
        tp: ranks that differ only in tp: attention heads, vocab rows, expert I-slices.
        ep: ranks that differ only in the expert dims (ep, and tp with -tp2ep): tokens are
            chunked over it and exchanged with all_to_all.
        kv: ranks of one tp group holding the same repeated kv head (tp > kv heads).
    """

    layout: Layout
    rank: int
    tp: C.Group = None
    ep: C.Group = None
    kv: C.Group = None

    @classmethod
    def create(cls, layout: Layout, rank: int, head_repeat: int = 1) -> ParallelGroups:
        def without(*dims):
            return lambda c: tuple((d, v) for d, v in c.items() if d not in dims)

        tp = _new_group(layout, rank, without("tp"))
        ep = _new_group(layout, rank, without(*layout.expert_dims)) if layout.expert_dims else None
        kv = None
        if head_repeat > 1:
            kv = _new_group(
                layout, rank, lambda c: (without("tp")(c), c.get("tp", 0) // head_repeat)
            )
        return cls(layout=layout, rank=rank, tp=tp, ep=ep, kv=kv)


@dataclass
class _MoEState:
    """What a MoE layer's hooks pass from its pre-hook to its post-hooks in one forward."""

    shape_BTH: torch.Size | None = None
    gathered: bool = False
    valid_T: torch.Tensor | None = None
    order_M: torch.Tensor | None = None
    in_splits: list[int] = field(default_factory=list)
    out_splits: list[int] = field(default_factory=list)
    topk: int = 0
    in_place: bool = False  # a decode step's experts applied where the rows are (before_moe)


def _pad_rows(x_TH: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x_TH.shape[0] % multiple
    return torch.cat([x_TH, x_TH.new_zeros(pad, x_TH.shape[1])]) if pad else x_TH


class _MoEHooks:
    """Token movement around one MoE layer: split -> route -> dispatch -> experts -> combine -> gather."""

    def __init__(
        self,
        moe: MoE,
        groups: ParallelGroups,
        expert_tp: C.Group,
        real_tokens: list[int] | None,
    ):
        self.groups, self.expert_tp, self.state = groups, expert_tp, _MoEState()
        # -sp: a one-element list holding the sequence length before padding (set per forward).
        self.real_tokens = real_tokens
        self.sp = sequence_sharded = real_tokens is not None
        n_ep = C.group_size(groups.ep)
        # With -sp and the tokens already split over exactly the EP group (tp2ep, no ep dim),
        # each rank routes its own sequence shard: nothing to gather or split.
        self.sp_is_split = sequence_sharded and n_ep > 1 and groups.layout.expert_dims == ("tp",)
        self.num_experts = moe.router.weight.shape[0]
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long)
        self.record_routing = False  # set by ParallelModel.record_routing (validate only)
        routed = moe.routed
        moe.routed = lambda x_BTH: self.after_moe(routed(*self.before_moe(x_BTH)))
        moe.router.register_forward_hook(self.after_router)
        moe.experts.register_forward_pre_hook(self.before_experts)
        moe.experts.register_forward_hook(self.after_experts)

    def before_moe(self, x_BTH: torch.Tensor) -> tuple[torch.Tensor]:
        s, g = self.state, self.groups
        s.gathered = self.sp and not self.sp_is_split
        if s.gathered:
            x_BTH = C.gather_from(x_BTH, 1, g.tp)
        s.shape_BTH = x_BTH.shape
        x_TH = x_BTH.reshape(-1, x_BTH.shape[-1])
        s.valid_T = self._real_rows(*x_BTH.shape[:2], device=x_BTH.device)
        n = C.group_size(g.ep)
        # A decode step's few rows are on every EP rank already: each applies its own experts
        # to all of them, and the outputs are summed (after_experts). No exchange sized by the
        # routing, so no host round trip, and the same shapes at every step.
        s.in_place = n > 1 and decoding() and not self.sp
        if n > 1 and not self.sp_is_split and not s.in_place:
            # Pad to a multiple of the EP size; pad rows are routed to expert 0 with weight 0.
            x_TH = C.split_to(_pad_rows(x_TH, n), 0, g.ep)
            chunk, pad = x_TH.shape[0], -s.valid_T.shape[0] % n
            valid_T = torch.cat([s.valid_T, s.valid_T.new_zeros(pad)])
            s.valid_T = valid_T[C.group_rank(g.ep) * chunk :][:chunk]
        return (x_TH.unsqueeze(0),)

    def _real_rows(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        """[B * T] bool: which rows are tokens of the input, not -sp sequence padding."""
        if self.real_tokens is None:
            return torch.ones(B * T, dtype=torch.bool, device=device)
        first = C.group_rank(self.groups.tp) * T if self.sp_is_split else 0
        return (torch.arange(first, first + T, device=device) < self.real_tokens[0]).repeat(B)

    def after_router(self, module, args, output):
        ids_TK, weights_TK = output
        # Pad rows (EP chunk padding, -sp sequence padding) go to expert 0 with weight 0.
        valid_T1 = self.state.valid_T[:, None]
        ids_TK = torch.where(valid_T1, ids_TK, 0)
        weights_TK = torch.where(valid_T1, weights_TK, 0)
        if self.record_routing:  # validate's load statistics: a collective and a host sync
            counts = torch.bincount(ids_TK[valid_T1.expand_as(ids_TK)], minlength=self.num_experts)
            if self.groups.ep is not None:
                dist.all_reduce(counts, group=self.groups.ep)  # no autograd
            self.tokens_per_expert = counts.cpu()
        return ids_TK, weights_TK

    def before_experts(self, module, args):
        x_TH, ids_TK, weights_TK = args
        g, s = self.groups, self.state
        x_TH, weights_TK = C.copy_to(x_TH, self.expert_tp), C.copy_to(weights_TK, self.expert_tp)
        n = C.group_size(g.ep)
        if n == 1:
            return x_TH, ids_TK, weights_TK
        if s.in_place:  # this rank's experts only: the others' choices weigh 0 here
            per = self.num_experts // n  # experts are Shard(0) over the EP group
            local_TK = ids_TK - C.group_rank(g.ep) * per
            mine_TK = (local_TK >= 0) & (local_TK < per)
            return x_TH, torch.where(mine_TK, local_TK, 0), torch.where(mine_TK, weights_TK, 0)
        T, K = ids_TK.shape
        s.topk = K
        ids_M = ids_TK.reshape(-1)
        # Global expert ids sort by owning rank first (experts are Shard(0) over the EP group).
        s.order_M = torch.argsort(ids_M, stable=True)
        send_counts = torch.bincount(ids_M, minlength=self.num_experts).view(n, -1)
        recv_counts = C.exchange_counts(send_counts, g.ep)
        s.in_splits, s.out_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        x_RH = C.all_to_all(x_TH[s.order_M // K], s.out_splits, s.in_splits, g.ep)
        w_R1 = C.all_to_all(weights_TK.reshape(-1, 1)[s.order_M], s.out_splits, s.in_splits, g.ep)
        local = torch.arange(recv_counts.shape[1], device=ids_TK.device).repeat(n)
        ids_R1 = torch.repeat_interleave(local, recv_counts.reshape(-1))[:, None]
        return x_RH, ids_R1, w_R1

    def after_experts(self, module, args, y):
        g, s = self.groups, self.state
        if s.in_place:
            y = C.reduce_from(y, g.ep)
        elif C.group_size(g.ep) > 1:
            y_MH = C.all_to_all(y, s.in_splits, s.out_splits, g.ep)
            y = y_MH[inverse_permutation(s.order_M)].view(-1, s.topk, y_MH.shape[-1]).sum(dim=1)
        return C.reduce_from(y, self.expert_tp)

    def after_moe(self, out_1TH: torch.Tensor) -> torch.Tensor:
        g, s = self.groups, self.state
        y_TH = out_1TH.reshape(-1, out_1TH.shape[-1])
        if C.group_size(g.ep) > 1 and not self.sp_is_split and not s.in_place:
            rows = s.shape_BTH[0] * s.shape_BTH[1]
            y_TH = C.gather_from(y_TH, 0, g.ep)[:rows]
        y_BTH = y_TH.view(s.shape_BTH)
        if s.gathered:
            y_BTH = C.split_to(y_BTH, 1, g.tp)
        return y_BTH


@dataclass
class ParallelModel:
    """A CausalLM wired for one rank of a layout, and the gradients to finish after backward."""

    model: CausalLM
    groups: ParallelGroups
    grad_groups: list[tuple[nn.Parameter, C.Group]] = field(default_factory=list)
    moe_hooks: list[_MoEHooks] = field(default_factory=list)

    def record_routing(self, on: bool = True) -> None:
        """Count routed (token, expert) pairs per expert in every forward (`tokens_per_expert`).
        Off by default: it costs an all-reduce and a host sync per MoE layer."""
        for hooks in self.moe_hooks:
            hooks.record_routing = on

    def finish_grads(self) -> None:
        """Sum the partial gradients of parameters that saw only part of the tokens or heads."""
        for param, group in self.grad_groups:
            if param.grad is not None and group is not None:
                dist.all_reduce(param.grad, group=group)


def _tp_region(module: nn.Module, groups: ParallelGroups, sp: bool) -> None:
    """Column-parallel in, row-parallel out: the Megatron pattern for attention and dense MLPs."""
    if sp:
        module.register_forward_pre_hook(
            lambda m, a: (C.gather_for_partial(a[0], 1, groups.tp), *a[1:])
        )
        module.register_forward_hook(lambda m, a, y: C.reduce_scatter_to(y, 1, groups.tp))
    else:
        module.register_forward_pre_hook(lambda m, a: (C.copy_to(a[0], groups.tp), *a[1:]))
        module.register_forward_hook(lambda m, a, y: C.reduce_from(y, groups.tp))


def _vocab_parallel_embedding(embedding: nn.Embedding, groups: ParallelGroups, sp: bool) -> None:
    rows = embedding.weight.shape[0]
    start = C.group_rank(groups.tp) * rows
    pad = embedding.padding_idx  # global; only the rank holding that row keeps it
    embedding.padding_idx = pad - start if pad is not None and start <= pad < start + rows else None
    masks: list[torch.Tensor] = []

    def before(module, args):
        (ids_BT,) = args
        inside = (ids_BT >= start) & (ids_BT < start + rows)
        masks[:] = [inside]
        return (torch.where(inside, ids_BT - start, 0),)

    def after(module, args, h_BTH):
        h_BTH = h_BTH * masks[0][..., None].to(h_BTH.dtype)
        return C.reduce_scatter_to(h_BTH, 1, groups.tp) if sp else C.reduce_from(h_BTH, groups.tp)

    embedding.register_forward_pre_hook(before)
    embedding.register_forward_hook(after)


def _pad_sequence_for_sp(model: CausalLM, tp: int) -> list[int]:
    """-sp splits the sequence over tp: pad it to a multiple (pads sit after the real
    tokens, so causal attention keeps them out of every real token) and drop their logits."""
    real: list[int] = []
    kept: list[int] = []  # logits of real tokens: from `logits_from` to the last real one

    def before(module, args, kwargs):
        ids_BT = args[0] if args else kwargs.pop("input_ids_BT")
        real[:] = [ids_BT.shape[1]]
        kept[:] = [ids_BT.shape[1] - kwargs.get("logits_from", 0)]
        pad = -ids_BT.shape[1] % tp
        if pad:
            ids_BT = torch.cat([ids_BT, ids_BT.new_zeros(ids_BT.shape[0], pad)], dim=1)
        return (ids_BT, *args[1:]), kwargs

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(lambda m, a, logits: logits[:, : kept[0]])
    return real


class _Placements:
    """The manifest's placements, asked per parameter and mesh dim; remembers what was asked."""

    def __init__(self, params: dict[str, ParamPlan], layout: Layout):
        self.params, self.layout, self.read = params, layout, set()

    def on(self, name: str, dim: str) -> Placement:
        self.read.add(name)
        if dim not in self.layout.mesh_dim_names:
            return Replicate()
        return self.params[name].placements[self.layout.mesh_dim_names.index(dim)]

    def split(self, name: str, dim: str, *allowed: type) -> bool:
        """Whether `name` is split over `dim`; a split of a kind not in `allowed` is refused."""
        placement = self.on(name, dim)
        if isinstance(placement, Replicate):
            return False
        if not isinstance(placement, allowed):
            raise CheckpointError(f"{name}: the runtime cannot run {placement} on {dim}")
        return True

    def split_alike(self, names: list[str], dim: str, *allowed: type) -> bool:
        """Whether the tensors of one block are split over `dim`: all of them or none."""
        splits = {n: self.split(n, dim, *allowed) for n in names if n in self.params}
        if len(set(splits.values())) > 1:
            raise CheckpointError(f"manifest splits only some of {sorted(splits)} over {dim}")
        return any(splits.values())

    def check_all_read(self) -> None:
        """A tensor the manifest splits must have been read by a rule here, else the runtime
        would run it as if whole."""
        unread = [
            n
            for n, p in self.params.items()
            if n not in self.read and any(not isinstance(pl, Replicate) for pl in p.placements)
        ]
        if unread:
            raise CheckpointError(
                f"the manifest splits {', '.join(sorted(unread)[:5])}, which the runtime does not run split"
            )


def _row_bias_once(pm: ParallelModel, linear: nn.Linear, group: C.Group) -> None:
    """A row-parallel Linear's bias is whole on every rank, while its output is a partial sum
    that `group` adds up: rank 0 of the group adds the bias, the others add 0 x bias (so that
    every rank's bias has a gradient, summed over the group after backward)."""
    if C.group_size(group) <= 1:
        return
    pm.grad_groups.append((linear.bias, group))
    if C.group_rank(group) != 0:
        linear.forward = lambda x: F.linear(x, linear.weight, linear.bias * 0)


def _sum_norm_statistic(norm: RMSNorm, group: C.Group) -> None:
    """A norm over a dim split across `group`: the mean of squares over the whole dim."""
    full = norm.weight.shape[0] * C.group_size(group)
    norm.mean_square = lambda x32: C.sum_over(x32.pow(2).sum(-1, keepdim=True), group) / full


def _parallel_mla(
    pm: ParallelModel, P: _Placements, attn: MLAttention, prefix: str, sp: bool
) -> None:
    """MLA by heads (vLLM, SGLang): the per-head up-projections split by rows, o_proj by
    columns; the low-rank down-projections and their norms whole on every rank."""
    per_head = ["q_proj", "q_b_proj", "kv_b_proj", "o_proj"]
    low_rank = ["q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm"]
    P.split_alike([f"{prefix}{n}.weight" for n in low_rank], "tp")  # any split is refused
    if not P.split_alike([f"{prefix}{n}.weight" for n in per_head], "tp", Shard):
        return
    attn.n_heads = attn.kv_b_proj.weight.shape[0] // (attn.nope_dim + attn.v_dim)
    _tp_region(attn, pm.groups, sp)
    # Whole on every rank, yet each rank's backward reached them through its own heads only.
    for name in low_rank:
        module = getattr(attn, name)
        if module is not None:
            pm.grad_groups.append((module.weight, pm.groups.tp))


def _parallel_attention(
    pm: ParallelModel, P: _Placements, attn: nn.Module, prefix: str, head_repeat: int, sp: bool
) -> None:
    if isinstance(attn, MLAttention):
        return _parallel_mla(pm, P, attn, prefix, sp)
    groups = pm.groups
    projections = [f"{prefix}{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")]
    # Attention sinks (one per query head) split with the heads.
    per_head = [*projections, f"{prefix}o_proj.weight", f"{prefix}sinks"]
    split = P.split_alike(per_head, "tp", Shard)
    P.split_alike([f"{prefix}o_proj.bias"], "tp")  # whole on every rank: a split is refused
    if split:
        attn.n_heads = attn.q_proj.weight.shape[0] // attn.head_dim
        attn.n_kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
        _tp_region(attn, groups, sp)
        if attn.o_proj.bias is not None:
            _row_bias_once(pm, attn.o_proj, groups.tp)
        if head_repeat > 1:
            pm.grad_groups += [
                (p, groups.kv) for p in (*attn.k_proj.parameters(), *attn.v_proj.parameters())
            ]
    if attn.q_norm is None:
        return
    if P.split_alike([f"{prefix}q_norm.weight", f"{prefix}k_norm.weight"], "tp", Shard):
        # Over the whole projection, split with it: the statistic is summed over tp.
        _sum_norm_statistic(attn.q_norm, groups.tp)
        _sum_norm_statistic(attn.k_norm, groups.tp)
        if head_repeat > 1:
            pm.grad_groups.append((attn.k_norm.weight, groups.kv))
    elif split:
        # Per head, whole on every rank: each rank normalised only its own heads.
        pm.grad_groups += [(attn.q_norm.weight, groups.tp), (attn.k_norm.weight, groups.tp)]


def _parallel_moe(
    pm: ParallelModel, P: _Placements, moe: MoE, prefix: str, real_tokens: list[int] | None
) -> None:
    groups, layout = pm.groups, pm.groups.layout
    experts = [f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj"]
    gate_up_bias, down_bias = (
        f"{prefix}experts.gate_up_proj_bias",
        f"{prefix}experts.down_proj_bias",
    )
    biases = [n for n in (gate_up_bias, down_bias) if n in P.params]
    for name in experts + biases:
        dims = tuple(d for d in layout.mesh_dim_names if P.on(name, d) == Shard(0))
        if dims != layout.expert_dims:
            raise CheckpointError(
                f"{name}: experts split over {dims or 'no dims'}, layout "
                f"{layout.name} runs them over {layout.expert_dims or 'none'}"
            )
    expert_tp = "tp" not in layout.expert_dims and P.split_alike(
        [*experts, gate_up_bias], "tp", StridedShard, Shard
    )
    if expert_tp:
        _check_gate_up_split(P, experts[0], moe.experts.act.interleaved)
    _down_bias_once(pm, P, moe, down_bias, expert_tp)
    pm.moe_hooks.append(_MoEHooks(moe, groups, groups.tp if expert_tp else None, real_tokens))
    router = f"{prefix}{moe.router_name}."
    P.split_alike([f"{router}weight", f"{router}bias", f"{router}e_score_correction_bias"], "tp")
    if C.group_size(groups.ep) > 1:
        # They saw only this rank's chunk of the tokens.
        pm.grad_groups.append((moe.router.weight, groups.ep))
        if moe.router.bias is not None:
            pm.grad_groups.append((moe.router.bias, groups.ep))
    if moe.shared_name is not None:
        shared = getattr(moe, moe.shared_name)
        names = [f"{prefix}{moe.shared_name}.{p}_proj.weight" for p in ("gate", "up", "down")]
        if P.split_alike(names, "tp", Shard):
            _tp_region(shared, groups, layout.sp)
    if moe.shared_expert_gate is not None:
        P.split_alike([f"{prefix}shared_expert_gate.weight"], "tp")
        if layout.sp:  # it saw only this rank's part of the sequence
            pm.grad_groups.append((moe.shared_expert_gate.weight, groups.tp))


def _down_bias_once(
    pm: ParallelModel, P: _Placements, moe: MoE, name: str, expert_tp: bool
) -> None:
    """`down_proj_bias` (GPT-OSS) is whole over tp. With expert TP each rank's experts give a
    partial sum over its I-slice, so the bias enters the sum once: on tp rank 0 (its gradient
    summed over tp), as `_row_bias_once` does for a Linear."""
    if "tp" not in pm.groups.layout.expert_dims:
        P.split_alike([name], "tp")  # a split is refused
    if expert_tp and moe.experts.down_proj_bias is not None:
        pm.grad_groups.append((moe.experts.down_proj_bias, pm.groups.tp))
        moe.experts.down_bias_share = 1.0 if C.group_rank(pm.groups.tp) == 0 else 0.0


def _check_gate_up_split(P: _Placements, name: str, interleaved: bool) -> None:
    """gate_up_proj's tp split must give a rank the gate and up columns of the I-slice its
    down_proj rows hold: the strided [gate_r; up_r] halves, or, where gate and up alternate
    (GPT-OSS), one contiguous block of pairs."""
    want = Shard if interleaved else StridedShard
    placement = P.on(name, "tp")
    if not isinstance(placement, want):
        order = "alternate" if interleaved else "are [gates; ups]"
        raise CheckpointError(
            f"{name}: {placement} on tp does not match down_proj's I-slice (gate and up "
            f"columns {order} in this model); the runtime runs {want.__name__} there"
        )


def parallelize(
    model: CausalLM, layout: Layout, groups: ParallelGroups, params: dict[str, ParamPlan]
) -> ParallelModel:
    """Wire `model` (holding, or about to hold, this rank's local shards) for `layout`, as the
    manifest's placements `params` say."""
    tp, sp = layout.size("tp"), layout.sp
    P = _Placements(params, layout)
    head_repeat = max((p.head_repeat for p in params.values()), default=1)
    pm = ParallelModel(model=model, groups=groups)
    if P.split("model.embed_tokens.weight", "tp", Shard):
        _vocab_parallel_embedding(model.model.embed_tokens, groups, sp)
    head = "model.embed_tokens.weight" if model.args.tie_word_embeddings else "lm_head.weight"
    if P.split(head, "tp", Shard):
        model.lm_head.register_forward_pre_hook(lambda m, a: (C.copy_to(a[0], groups.tp),))
        model.lm_head.register_forward_hook(lambda m, a, y: C.gather_from(y, -1, groups.tp))
    real_tokens = _pad_sequence_for_sp(model, tp) if sp else None
    if sp:
        model.model.norm.register_forward_pre_hook(
            lambda m, a: (C.gather_from(a[0], 1, groups.tp),)
        )
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        _parallel_attention(pm, P, layer.self_attn, prefix + "self_attn.", head_repeat, sp)
        if sp:
            pm.grad_groups += [
                (layer.input_layernorm.weight, groups.tp),
                (layer.post_attention_layernorm.weight, groups.tp),
            ]
        mlp = f"{prefix}{layer.mlp_name}."
        if isinstance(layer.mlp, MoE):
            _parallel_moe(pm, P, layer.mlp, mlp, real_tokens)
        elif isinstance(layer.mlp, MLP):
            names = [f"{mlp}{p}_proj.weight" for p in ("gate", "up", "down")]
            if P.split_alike(names, "tp", Shard):
                _tp_region(layer.mlp, groups, sp)
    P.check_all_read()
    return pm
