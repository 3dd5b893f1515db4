"""Where checkpoints come from: a local HF directory, `hf:org/name[@rev]`, or `tiny:<family>`.

    >>> src = open_source("tiny:qwen3_moe")
    >>> src.config["model_type"], len(src.tensors)
    ('qwen3_moe', 212)

Only headers are read here; tensor data is read later, slice by slice,
through `src.tensors[name].read(box)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from reshard.converters.lazy import SAFETENSORS_DTYPES, SliceReader, SourceTensor
from reshard.errors import SourceError
from reshard.writer import sha256_file

# Files a sharded checkpoint carries along beside the rank files.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
_HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", *SIDE_FILES]


@dataclass
class Source:
    """An opened HF checkpoint: its config and a lazy tensor per stored name."""

    text: str
    path: Path
    config: dict
    files: list[Path]
    tensors: dict[str, SourceTensor]
    reader: SliceReader = field(default_factory=SliceReader)
    repo: str | None = None
    revision: str | None = None
    _hashes: dict[str, str] | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    def side_files(self) -> list[Path]:
        return [self.path / name for name in SIDE_FILES if (self.path / name).is_file()]

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight file, computed once; free for Hub-cache blobs, which are named by it."""
        if self._hashes is None:
            self._hashes = {}
            for f in self.files:
                blob = f.resolve().name
                self._hashes[f.name] = (
                    blob if re.fullmatch(r"[0-9a-f]{64}", blob) else sha256_file(f)
                )
        return self._hashes

    def describe(self) -> dict:
        return {
            "spec": self.text,
            "repo": self.repo,
            "revision": self.revision,
            "files": self.file_hashes(),
        }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read JSON ({e})") from e


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise SourceError(f"{index}: names files that are missing: {', '.join(missing)}")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SourceError(
            f"{directory}: no *.safetensors files (and no model.safetensors.index.json)"
        )
    return files


def _headers(files: list[Path], reader: SliceReader) -> dict[str, SourceTensor]:
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in tensors:
                        raise SourceError(
                            f"tensor {name} is stored twice: {tensors[name].path} and {path}"
                        )
                    tensors[name] = SourceTensor(
                        path=str(path),
                        name=name,
                        shape=tuple(sl.get_shape()),
                        dtype=SAFETENSORS_DTYPES[sl.get_dtype()],
                        reader=reader,
                    )
        except SourceError:
            raise
        except (
            Exception
        ) as e:  # safetensors raises untyped errors, e.g. HeaderTooLarge with no path
            raise SourceError(
                f"{path}: not a readable safetensors file ({e}); a truncated download or a git-lfs pointer?"
            ) from e
    return tensors


def _hub_snapshot(repo: str, revision: str | None) -> Path:
    """Download (or find in the Hub cache) the weights, config and tokenizer files of `repo`.

    huggingface_hub reads HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE itself.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    name = f"hf:{repo}" + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise SourceError(
            f"{name}: not in the local Hub cache ({constants.HF_HUB_CACHE}) and {why}"
        ) from e
    except RepositoryNotFoundError as e:
        raise SourceError(
            f"{name}: no such repository, or it is gated (run `hf auth login`)"
        ) from e
    except HfHubHTTPError as e:
        raise SourceError(f"{name}: download failed: {e}") from e


def open_source(text: str) -> Source:
    """Open `text`: a local directory, `hf:org/name[@revision]` or `tiny:<family>`."""
    from reshard.tiny import tiny_checkpoint

    repo = revision = None
    if text.startswith("tiny:"):
        path = tiny_checkpoint(text[len("tiny:") :])
    elif text.startswith("hf:"):
        repo, _, revision = text[len("hf:") :].partition("@")
        path = _hub_snapshot(repo, revision or None)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            hint = (
                f"; for the Hub write hf:{text}" if re.fullmatch(r"[\w.-]+/[\w.-]+", text) else ""
            )
            raise SourceError(f"{text}: no such directory{hint}")
        if not path.is_dir():
            raise SourceError(f"{text}: not a directory (give the checkpoint's directory)")
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    reader = SliceReader()
    files = _weight_files(path)
    return Source(
        text=text,
        path=path,
        config=_read_json(path / "config.json"),
        files=files,
        tensors=_headers(files, reader),
        reader=reader,
        repo=repo,
        revision=revision or None,
    )
