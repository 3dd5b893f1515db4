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
import threading
from dataclasses import dataclass, field
from pathlib import Path

from reshard.converters.lazy import (
    Assembled,
    Cat,
    LazyTensor,
    Narrow,
    SliceReader,
    SourceTensor,
)
from reshard.errors import SourceError
from reshard.safetensors_header import read_header, shown

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
    tensors: dict[str, LazyTensor]
    reader: SliceReader = field(default_factory=SliceReader)
    repo: str | None = None
    revision: str | None = None
    _hashes: dict[str, str] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._preset = self._hashes is not None  # known from a manifest, not computed

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    def side_files(self) -> list[Path]:
        return [self.path / name for name in SIDE_FILES if (self.path / name).is_file()]

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight file: free for Hub-cache blobs, which are named by it, and
        for local files unchanged since they were last hashed (reshard.hash_cache)."""
        with self._lock:  # one thread hashes; another asking waits for its answer
            return self._file_hashes()

    def _file_hashes(self) -> dict[str, str]:
        if self._hashes is None:
            from reshard.hash_cache import cached_sha256

            blobs = {f: _blob_sha256(f) for f in self.files}
            try:
                hashed = cached_sha256([f for f, sha in blobs.items() if sha is None])
            except OSError as e:
                raise SourceError(f"{e.filename}: cannot hash it ({e.strerror})") from e
            self._hashes = {f.name: blobs[f] or hashed[f] for f in self.files}
        return self._hashes

    def file_ids(self) -> dict[str, object]:
        """What identifies each weight file's content without reading it: its sha256 where
        that is free (a Hub blob's name, a sharded source's manifest), else its stat stamp,
        which any rewrite of the file changes."""
        from reshard.hash_cache import stamp

        if self._hashes is not None and self._preset:
            return dict(self._hashes)
        return {f.name: _blob_sha256(f) or stamp(f) for f in self.files}

    def describe(self) -> dict:
        return {
            "spec": self.text,
            "repo": self.repo,
            "revision": self.revision,
            "files": self.file_hashes(),
        }


def _blob_sha256(path: Path) -> str | None:
    """The sha256 a Hub-cache file is named by (its blob, behind the snapshot's symlink)."""
    blob = path.resolve().name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_NEVER_UNPICKLES = "reshard reads only safetensors and never unpickles"
INDEX = "model.safetensors.index.json"


def _weight_file(directory: Path, name: str, where: Path) -> Path:
    """`directory / name`, refusing names that lead out of the directory or name pickles."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise SourceError(f"{where}: names {name!r}, which is outside {directory}")
    if Path(name).suffix in PICKLE_SUFFIXES:
        raise SourceError(f"{where}: names pickle weights {name!r}; {_NEVER_UNPICKLES}")
    return directory / name


def _index_map(index: Path) -> dict[str, str]:
    """The index's weight_map, checked: {tensor name: file name}."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SourceError(f"{index}: weight_map must map tensor names to file names")
    if not weight_map:
        raise SourceError(f"{index}: weight_map lists no tensors")
    return weight_map


def _indexed_files(directory: Path, weight_map: dict[str, str]) -> list[Path]:
    index = directory / INDEX
    files = sorted({_weight_file(directory, name, index) for name in weight_map.values()})
    missing = [shown(f.relative_to(directory)) for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{index}: names files that are missing: {', '.join(missing)}")
    return files


def _safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    # Listed by name only: a pickle can run code when loaded, so it is never opened.
    pickles = sorted(
        p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
    )
    if pickles:
        raise SourceError(
            f"{directory}: holds PyTorch pickle weights ({', '.join(map(shown, pickles[:3]))}); "
            f"{_NEVER_UNPICKLES} (convert them to safetensors first)"
        )
    raise SourceError(f"{directory}: no *.safetensors files (and no {INDEX})")


def _headers(files: list[Path], reader: SliceReader) -> dict[str, SourceTensor]:
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        header = read_header(path, error=SourceError)
        for name, info in header.tensors.items():
            if name in tensors:
                raise SourceError(
                    f"tensor {shown(name)} is stored twice: {tensors[name].path} and {path}"
                )
            tensors[name] = SourceTensor(
                path=str(path),
                name=name,
                shape=info.shape,
                dtype=info.dtype,
                reader=reader,
                offset=header.data_start + info.start,
            )
    return tensors


def _check_index(index: Path, weight_map: dict[str, str], tensors: dict[str, SourceTensor]) -> None:
    """The index and the files must agree on where every tensor is."""
    for name, file in sorted(weight_map.items()):
        if name not in tensors:
            raise SourceError(
                f"{index}: lists {shown(name)} in {shown(file)}, which does not hold it"
            )
        where = Path(tensors[name].path)
        if where != index.parent / file:
            raise SourceError(
                f"{index}: lists {shown(name)} in {shown(file)}, "
                f"but it is in {where.relative_to(index.parent)}"
            )
    unlisted = sorted(set(tensors) - set(weight_map))
    if unlisted:
        raise SourceError(
            f"{index}: does not list {len(unlisted)} tensor(s) stored in its files: "
            f"{', '.join(map(shown, unlisted[:3]))}{', ...' if len(unlisted) > 3 else ''}"
        )


def _open_weights(directory: Path) -> tuple[list[Path], dict[str, SourceTensor], SliceReader]:
    """The weight files (the index's, else every *.safetensors) and their tensors, headers checked."""
    reader = SliceReader()
    index = directory / INDEX
    if not index.is_file():
        files = _safetensors_files(directory)
        return files, _headers(files, reader), reader
    weight_map = _index_map(index)
    files = _indexed_files(directory, weight_map)
    tensors = _headers(files, reader)
    _check_index(index, weight_map, tensors)
    return files, tensors, reader


def _hub_snapshot(repo: str, revision: str | None) -> Path:
    """Download (or find in the Hub cache) the weights, config and tokenizer files of `repo`.

    huggingface_hub reads HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE itself; its errors become
    reshard.hub's one-line messages.
    """
    from huggingface_hub import snapshot_download

    from reshard.hub import hub_errors

    with hub_errors(f"hf:{repo}" + (f"@{revision}" if revision else "")):
        # Top-level files only: repos such as Llama's keep other formats under original/.
        return Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=_HUB_PATTERNS, ignore_patterns=["*/*"]
            )
        )


def open_source(text: str) -> Source:
    """Open `text`: a local directory, `hf:org/name[@revision]` or `tiny:<family>`."""
    from reshard.tiny import tiny_checkpoint

    repo = revision = None
    if text.startswith("tiny:"):
        path = tiny_checkpoint(text[len("tiny:") :])
    elif text.startswith("hf:"):
        from reshard.hub import open_hub_checkpoint

        sharded = open_hub_checkpoint(text)
        if sharded is not None:  # published by `reshard upload`: reshard it
            return _open_sharded(text, sharded)
        repo, _, revision = text[len("hf:") :].partition("@")
        path = _hub_snapshot(repo, revision or None)
        revision = path.name  # the snapshot directory is named by the commit sha it resolved to
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
    if (path / "reshard.json").is_file():
        from reshard.checkpoint import ShardedCheckpoint
        from reshard.errors import ReshardError

        try:
            ckpt = ShardedCheckpoint(path)
        except ReshardError as e:
            raise SourceError(f"{text}: not a usable sharded checkpoint: {e}") from e
        return _open_sharded(text, ckpt)
    config = _read_json(path / "config.json")
    if not isinstance(config.get("model_type"), str):
        raise SourceError(f"{path / 'config.json'}: no model_type; which model is this?")
    files, tensors, reader = _open_weights(path)
    return Source(
        text=text,
        path=path,
        config=config,
        files=files,
        tensors=tensors,
        reader=reader,
        repo=repo,
        revision=revision or None,
    )


def _window(leaf: LazyTensor, box: tuple[tuple[int, int], ...]) -> LazyTensor:
    for dim, (start, stop) in enumerate(box):
        if (start, stop) != (0, leaf.shape[dim]):
            leaf = Narrow(leaf, dim, start, stop - start)
    return leaf


def _unrepeat(t: LazyTensor, block: int, repeats: int) -> LazyTensor:
    """The k/v tensor before its heads were repeated for tp > kv heads: every `repeats`-th block."""
    heads = t.shape[0] // (block * repeats)
    return Cat([Narrow(t, 0, j * repeats * block, block) for j in range(heads)], dim=0)


def _open_sharded(text: str, ckpt) -> Source:
    """A `reshard convert` output as a source: each tensor assembled lazily from the rank files
    that hold its pieces, so resharding reads only the bytes each new rank needs.

    Every rank file's sha256 is checked against the manifest first: resharding damaged files
    would hand the damage on under fresh, valid hashes.
    """
    from reshard.converters import get_spec
    from reshard.errors import ReshardError
    from reshard.placements import boxes, selection_shape

    try:
        for rank in range(ckpt.layout.world_size):
            ckpt.check_rank_file(rank, recorded=True)
        head_dim = get_spec(ckpt.manifest.model_type).parse_config(ckpt.manifest.config).head_dim
    except (ReshardError, KeyError, ValueError, TypeError) as e:
        raise SourceError(f"{text}: not a usable sharded checkpoint: {e}") from e
    reader = SliceReader()
    world = ckpt.layout.world_size
    tensors: dict[str, LazyTensor] = {}
    for name, p in ckpt.params.items():
        pieces: dict[tuple, LazyTensor] = {}  # replicas hold the same piece: read it once
        for rank in range(world):
            selection = ckpt.selection(name, rank)
            local = SourceTensor(
                path=str(ckpt.tensor_file(rank, name)),
                name=name,
                shape=selection_shape(selection),
                dtype=p.dtype,
                reader=reader,
            )
            for global_slices, local_slices in boxes(selection):
                key = tuple((s.start, s.stop) for s in global_slices)
                if key not in pieces:
                    box = tuple((s.start, s.stop) for s in local_slices)
                    pieces[key] = _window(local, box)
        tensor: LazyTensor = Assembled(p.shape, p.dtype, list(pieces.items()))
        if p.head_repeat > 1:
            quant = ckpt.manifest.quantization or {}
            block = head_dim
            if name in quant.get("scales", {}).values():  # an FP8 scale: a head is fewer rows
                block = head_dim // quant["weight_block_size"][0]
            tensor = _unrepeat(tensor, block, p.head_repeat)
        tensors[name] = tensor
    files = [path for r in range(world) for path, _ in ckpt.rank_files(r)]
    hashes = {e.file: e.sha256 for r in range(world) for e in ckpt.manifest.ranks[r].files}
    return Source(
        text=text,
        path=ckpt.directory,
        config=ckpt.manifest.config,
        files=files,
        tensors=tensors,
        reader=reader,
        _hashes=hashes,
    )
