"""Shared fixtures: a private reshard cache, the tiny checkpoint, converted copies, the HF oracle."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def reshard_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point RESHARD_CACHE at a fresh directory, so `tiny:` checkpoints are written there.

    Writing tiny:qwen3_moe trains it for a few hundred steps (seconds idle, minutes on a
    busy 2-core box), so the finished directory is kept in pytest's own cache
    (.pytest_cache, keyed by the tiny version and tiny.py's hash; `pytest --cache-clear`
    drops it) and copied into the fresh RESHARD_CACHE. Nothing is read from or written to
    the user's cache.
    """
    import reshard.tiny
    from reshard.tiny import TINY_CONFIGS, TINY_VERSION

    path = tmp_path_factory.mktemp("reshard-cache")
    patch = pytest.MonkeyPatch()
    patch.delenv("RESHARD_DEBUG", raising=False)
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    if cache is not None:
        from reshard.tiny import tiny_checkpoint

        code = hashlib.sha256(Path(reshard.tiny.__file__).read_bytes()).hexdigest()[:12]
        seed = cache.mkdir(f"reshard-tiny-v{TINY_VERSION}-{code}")
        patch.setenv("RESHARD_CACHE", str(seed))
        for family in TINY_CONFIGS:
            tiny_checkpoint(family)  # written once into the seed, then found there
        shutil.copytree(seed / "tiny", path / "tiny", ignore=shutil.ignore_patterns(".*"))
    patch.setenv("RESHARD_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def tiny_dir(reshard_cache: Path) -> Path:
    """The built-in tiny Qwen3-MoE checkpoint (HF layout, two files + index), written once."""
    from reshard.tiny import tiny_checkpoint

    path = tiny_checkpoint("qwen3_moe")
    assert path.is_relative_to(reshard_cache), path
    return path


@pytest.fixture(scope="session")
def hf_params(tiny_dir: Path) -> dict[str, torch.Tensor]:
    """The oracle: transformers' Qwen3MoeForCausalLM loaded from the tiny checkpoint, by param name."""
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="session")
def convert_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Callable[..., Path]:
    """`convert_tiny("ep2tp2", dtype="keep")` -> a converted directory, made once per session."""
    from reshard.convert import convert, make_plan
    from reshard.layout import Layout
    from reshard.sources import open_source

    done: dict[tuple[str, str], Path] = {}

    def make(layout: str, dtype: str = "keep") -> Path:
        key = (layout, dtype)
        if key not in done:
            out = tmp_path_factory.mktemp(f"tiny-{layout}-{dtype}")
            plan = make_plan(open_source("tiny:qwen3_moe"), Layout.parse(layout), dtype)
            convert(plan, out, progress=False)
            done[key] = out
        return done[key]

    return make
