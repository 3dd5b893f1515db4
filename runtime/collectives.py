"""Autograd-aware collectives, with the backward each one needs when every rank
computes the same (replicated) loss.

An activation is either *replicated* over a group (every rank holds the same
values, and receives the same gradient) or *split* (each rank holds its part),
or *partial* (the true value is the sum over ranks). Each function below moves
between two of those states, and its backward moves the gradient the other way:

| function              | forward                       | backward            |
| --------------------- | ----------------------------- | ------------------- |
| copy_to               | replicated -> used for partial| all-reduce (sum)    |
| reduce_from           | partial -> replicated         | identity            |
| sum_over              | partial -> used for partial   | all-reduce (sum)    |
| split_to              | replicated -> my chunk        | all-gather          |
| gather_from           | chunks -> replicated          | take my chunk       |
| gather_for_partial    | chunks -> used for partial    | reduce-scatter      |
| reduce_scatter_to     | partial -> my chunk           | all-gather          |
| all_to_all            | rows to their ranks           | rows back           |

Using all-reduce as the backward of `reduce_from` (as torch.distributed.nn
does) multiplies gradients by the group size when the loss is replicated
(pytorch issue 160285); the table is Megatron's f/g operators generalised.
`group=None` means "no parallelism": every function is then the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(out, x, group=group)
    return out.movedim(0, dim)


def _chunk(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n, r = group_size(group), group_rank(group)
    if x.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {n} ranks")
    return x.narrow(dim, r * (x.shape[dim] // n), x.shape[dim] // n).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, x, group=group)
    return out.movedim(0, dim)


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumOver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _AlongDim(torch.autograd.Function):
    """A collective along tensor dim `dim` whose backward is another one (the table above)."""

    @staticmethod
    def forward(ctx, x, dim, group, forward_fn, backward_fn):
        ctx.dim, ctx.group, ctx.backward_fn = dim, group, backward_fn
        return forward_fn(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.dim, ctx.group), None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group
) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def copy_to(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyTo.apply(x, group)


def reduce_from(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return _ReduceFrom.apply(x, group) if torch.is_grad_enabled() else _all_reduce_(x, group)


def sum_over(x: torch.Tensor, group: Group) -> torch.Tensor:
    """A statistic summed over ranks that each go on to use it for their own part (the RMS of a
    projection split over tp): every rank's use feeds every rank's share, so both ways sum."""
    if group_size(group) == 1:
        return x
    return _SumOver.apply(x, group) if torch.is_grad_enabled() else _all_reduce_(x, group)


def _all_reduce_(x: torch.Tensor, group: Group) -> torch.Tensor:
    """In place, without autograd (inference): every caller hands over a fresh result (a
    row-parallel output, a masked embedding, a local statistic), so no copy is needed."""
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def split_to(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _AlongDim.apply(x, dim, group, _chunk, _all_gather)


def gather_from(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _AlongDim.apply(x, dim, group, _all_gather, _chunk)


def gather_for_partial(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return (
        x
        if group_size(group) == 1
        else _AlongDim.apply(x, dim, group, _all_gather, _reduce_scatter)
    )


def reduce_scatter_to(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    return (
        x
        if group_size(group) == 1
        else _AlongDim.apply(x, dim, group, _reduce_scatter, _all_gather)
    )


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group
) -> torch.Tensor:
    """Rows `x[sum(in_splits[:j]) : ...]` go to rank j; returns the rows received, by source rank."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """`counts [n, ...]`: row j goes to rank j; returns what each rank sent us (no autograd)."""
    if group_size(group) == 1:
        return counts
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
