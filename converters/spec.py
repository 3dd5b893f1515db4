"""WeightConverter, WeightRenaming and the per-family ModelSpec.

Patterns are key suffixes; `*` matches a module-list index. A converter whose
source patterns have one `*` more than its targets merges a module list (and
its reverse splits one), so

    WeightConverter(
        ["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
        "mlp.experts.gate_up_proj",
        [MergeModulelist(dim=0), Concatenate(dim=1)],
    )

turns `model.layers.3.mlp.experts.{0..E-1}.{gate,up}_proj.weight` into
`model.layers.3.mlp.experts.gate_up_proj [E, 2I, H]`, lazily.

Conversion is total: every source key is converted, renamed, kept under its
own name (when the model has that parameter) or dropped on purpose; anything
else is an error listing the keys.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reshard.architecture import ModelArgs, param_shapes
from reshard.converters import fp8
from reshard.converters.lazy import LazyTensor
from reshard.converters.ops import ConversionOp
from reshard.errors import ConversionError

# Tensors of checkpoint formats reshard does not convert yet, named for what they are, so a
# user learns "FP8" rather than "source keys no converter maps".
UNSUPPORTED_TENSORS = {
    "*.weight_scale": "quantized weights with per-tensor scales (weight_scale) are not supported yet",
    "*.input_scale": "FP8 activation scales (input_scale) are not supported yet",
    # make_plan reads MXFP4 checkpoints (converters.mxfp4.unpacked) before they reach here
    "*_blocks": "MXFP4 weights (*_blocks, *_scales) are read only through converters.mxfp4",
    "*.qweight": "GPTQ/AWQ quantized weights (qweight) are not supported yet",
}


def check_supported(keys: list[str], model_type: str) -> None:
    """Refuse tensors of a format reshard cannot convert, naming the format and the keys."""
    for glob, what in UNSUPPORTED_TENSORS.items():
        hits = [k for k in keys if fnmatch.fnmatchcase(k, glob)]
        if hits:
            raise ConversionError(
                f"{model_type}: {what}; convert from the bf16 release instead ({_listing(hits, 2)})"
            )


def _listing(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _pattern_regex(pattern: str) -> re.Pattern:
    body = r"(\d+)".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(rf"^(?P<prefix>(?:.*\.)?){body}$")


def _fill(pattern: str, indices: tuple[str, ...]) -> str:
    parts = pattern.split("*")
    out = parts[0]
    for index, part in zip(indices, parts[1:]):
        out += index + part
    return out


@dataclass(frozen=True)
class WeightRenaming:
    """Rename keys by regex substitution (`block_sparse_moe.` -> `mlp.`)."""

    source: str
    target: str

    def apply(self, name: str) -> str:
        return re.sub(self.source, self.target, name)

    def reversed(self) -> WeightRenaming:
        return WeightRenaming(re.escape(self.target), self.source.replace("\\", ""))


@dataclass(frozen=True)
class WeightConverter:
    """Many source tensors -> many target tensors through a chain of ops."""

    source_patterns: tuple[str, ...] | list[str] | str
    target_patterns: tuple[str, ...] | list[str] | str
    operations: tuple[ConversionOp, ...] | list[ConversionOp] = ()

    def __post_init__(self):
        for name in ("source_patterns", "target_patterns"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "operations", tuple(self.operations))
        stars = {p.count("*") for p in self.source_patterns} | {
            p.count("*") for p in self.target_patterns
        }
        if max(stars) - min(stars) > 1:
            raise ValueError(f"{self}: source and target patterns differ by more than one '*'")

    @property
    def _list_in_source(self) -> bool:
        return self.source_patterns[0].count("*") > self.target_patterns[0].count("*")

    @property
    def _list_in_target(self) -> bool:
        return self.target_patterns[0].count("*") > self.source_patterns[0].count("*")

    def reversed(self) -> WeightConverter:
        """The converter that undoes this one (target names back to source names)."""
        ops, n = [], len(self.source_patterns)
        for op in self.operations:
            ops.append(op.inverse(n))
            n = op.out_groups(n)
        return WeightConverter(self.target_patterns, self.source_patterns, list(reversed(ops)))

    def convert(
        self, tensors: Mapping[str, LazyTensor], members: int | None = None
    ) -> tuple[dict[str, LazyTensor], set[str]]:
        """Apply to every match in `tensors`; return the new tensors and the keys consumed.

        `members`: how long every merged module list must be (the expert count);
        without it, the longest list found among the source patterns.
        """
        matches: dict[tuple[str, tuple[str, ...]], list[dict[int, str]]] = {}
        regexes = [_pattern_regex(p) for p in self.source_patterns]
        for key in tensors:
            for i, regex in enumerate(regexes):
                m = regex.match(key)
                if not m:
                    continue
                indices = m.groups()[1:]
                list_index = int(indices[-1]) if self._list_in_source else 0
                shared = indices[:-1] if self._list_in_source else indices
                slots = matches.setdefault((m["prefix"], shared), [{} for _ in regexes])
                slots[i][list_index] = key
        out, used = {}, set()
        for (prefix, shared), slots in sorted(matches.items()):
            groups = [
                self._members(tensors, prefix, shared, pattern, slot, slots, members)
                for pattern, slot in zip(self.source_patterns, slots)
            ]
            used.update(k for slot in slots for k in slot.values())
            for op in self.operations:
                groups = op.apply(groups)
            if len(groups) != len(self.target_patterns):
                raise ConversionError(
                    f"{self}: produced {len(groups)} groups for {len(self.target_patterns)} target patterns"
                )
            for pattern, group in zip(self.target_patterns, groups):
                if self._list_in_target:
                    for j, t in enumerate(group):
                        out[prefix + _fill(pattern, (*shared, str(j)))] = t
                else:
                    (t,) = group
                    out[prefix + _fill(pattern, shared)] = t
        return out, used

    def _members(self, tensors, prefix, shared, pattern, slot, slots, members) -> list[LazyTensor]:
        """One source pattern's matches in list order, checked: none missing, none extra, one shape."""
        if not self._list_in_source:
            return [tensors[slot[0]]]
        n = members if members is not None else 1 + max(max(s, default=-1) for s in slots)
        name = lambda i: prefix + _fill(pattern, (*shared, str(i)))  # noqa: E731
        missing = [name(i) for i in range(n) if i not in slot]
        if missing:
            raise ConversionError(f"missing source tensors ({n} expected): {_listing(missing)}")
        extra = [slot[i] for i in slot if i >= n]
        if extra:
            raise ConversionError(
                f"source tensors beyond the {n} the config declares: {_listing(extra)}"
            )
        keys = [slot[i] for i in range(n)]
        shapes = [tuple(tensors[k].shape) for k in keys]
        common = max(set(shapes), key=shapes.count)
        odd = [f"{k} {list(s)}" for k, s in zip(keys, shapes) if s != common]
        if odd:
            raise ConversionError(
                f"{_listing(odd)}: shape differs from the other members' {list(common)}"
            )
        return [tensors[k] for k in keys]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything reshard knows about one model family, as data.

    Attributes:
        model_type: the `model_type` of the HF config this spec reads.
        parse_config: config.json dict -> ModelArgs (validated; features the runtime lacks
            are refused there). `reshard.architecture.param_shapes` of the result is the
            table of target names and shapes: conversion builds no model.
        renamings / converters: source (HF) names -> target (transformers v5 parameter) names.
        ignore: globs of source keys dropped on purpose (e.g. rotary caches).
        plan: glob on the target name -> parallel style(s) (see reshard.plan).
        kv_params: globs of k/v tensors whose heads replicate when tp > kv heads.
        fit: what must divide what (`common.FitRule`), checked first, named in the error.
        drop_layers_past_config: layers numbered past num_hidden_layers (multi-token
            prediction heads) are dropped on purpose, as transformers drops them.
    """

    model_type: str
    parse_config: Callable[[dict], ModelArgs]
    renamings: tuple[WeightRenaming, ...] = ()
    converters: tuple[WeightConverter, ...] = ()
    ignore: tuple[str, ...] = ("*.rotary_emb.inv_freq",)
    plan: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    kv_params: tuple[str, ...] = ("*.self_attn.k_proj.*", "*.self_attn.v_proj.*")
    fit: tuple[Any, ...] = ()
    drop_layers_past_config: bool = False

    def target_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        """Global shape of every model tensor, by target name, in model order."""
        return param_shapes(args)

    def _ignored(self, key: str, args: ModelArgs) -> bool:
        if any(fnmatch.fnmatchcase(key, g) for g in self.ignore):
            return True
        if self.drop_layers_past_config:
            m = re.match(r"model\.layers\.(\d+)\.", key)
            return bool(m) and int(m[1]) >= args.num_layers
        return False

    def styles_for(self, name: str) -> tuple[str, ...]:
        """The plan's styles for target parameter `name` (first matching glob wins)."""
        for glob, styles in self.plan.items():
            if fnmatch.fnmatchcase(name, glob):
                return (styles,) if isinstance(styles, str) else tuple(styles)
        raise ConversionError(f"{self.model_type}: no plan entry matches parameter {name}")

    def to_targets(
        self, sources: Mapping[str, LazyTensor], args: ModelArgs
    ) -> dict[str, LazyTensor]:
        """Source tensors (HF names) -> target tensors (parameter names), checked for totality."""
        check_supported(list(sources), self.model_type)
        tensors = {k: v for k, v in sources.items() if not self._ignored(k, args)}
        for renaming in self.renamings:
            tensors = {renaming.apply(k): v for k, v in tensors.items()}
        expected = self.target_shapes(args)
        members = args.num_experts or None
        targets, used = {}, set()
        for converter in self._with_scales():
            rest = {k: v for k, v in tensors.items() if k not in used}
            produced, consumed = converter.convert(rest, members)
            targets.update(produced)
            used |= consumed
        for key, tensor in tensors.items():
            if key in used:
                continue
            if key not in expected and fp8.weight_of(key) not in expected:
                continue  # reported below as unmapped
            targets[key] = tensor
            used.add(key)
        unmapped = [k for k in tensors if k not in used]
        if unmapped:
            raise ConversionError(
                f"{self.model_type}: source keys no converter maps: {_listing(unmapped)}"
            )
        missing = [k for k in expected if k not in targets]
        if missing:
            raise ConversionError(
                f"{self.model_type}: the source has no tensors for: {_listing(missing)}"
            )
        extra = [k for k in targets if k not in expected and fp8.weight_of(k) not in expected]
        if extra:
            raise ConversionError(
                f"{self.model_type}: converters made unexpected tensors: {_listing(extra)}"
            )
        for name, shape in expected.items():
            if tuple(targets[name].shape) != tuple(shape):
                raise ConversionError(
                    f"{name}: shape {list(targets[name].shape)} from the source, the config says {list(shape)}"
                )
        # Model order, each FP8 scale (converted by its weight's converter) after its weight.
        return {
            n: targets[n] for name in expected for n in (name, name + fp8.SCALE) if n in targets
        }

    def _with_scales(self) -> tuple[WeightConverter, ...]:
        """The converters, and for FP8 checkpoints their twins that carry the scales alike."""
        return self.converters + fp8.scale_converters(self.converters)

    def to_sources(self, targets: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
        """Target tensors back to HF names: every converter read backwards."""
        tensors, used = {}, set()
        for converter in self._with_scales():
            produced, consumed = converter.reversed().convert(
                {k: v for k, v in targets.items() if k not in used}
            )
            tensors.update(produced)
            used |= consumed
        tensors.update({k: v for k, v in targets.items() if k not in used})
        for renaming in reversed(self.renamings):
            tensors = {renaming.reversed().apply(k): v for k, v in tensors.items()}
        return tensors
