"""Sharded checkpoints on the Hugging Face Hub: publish one, and load it rank by rank.

    reshard upload q3-ep4tp4 --repo me/Qwen3-30B-A3B-ep4tp4
    reshard run hf:me/Qwen3-30B-A3B-ep4tp4 --prompt "..."

Loading fetches `reshard.json` and the config / tokenizer files first, pinned to the
commit sha the revision resolves to at that moment; then each rank downloads only its
own rank file, into the normal Hub cache, at that same sha (so ranks never mix
revisions, and a second run downloads nothing). Everything goes through
huggingface_hub, which honours HF_HUB_OFFLINE, HF_HUB_CACHE, HF_ENDPOINT and HF_TOKEN
itself; reshard never reads, prints or stores the token.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from reshard.checkpoint import ShardedCheckpoint
from reshard.errors import ReshardError, SourceError
from reshard.manifest import MANIFEST
from reshard.sources import SIDE_FILES

# The small files every command needs before any rank file: manifest, card, config, tokenizer.
SMALL_FILES = (MANIFEST, "README.md", *SIDE_FILES)
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
FILES_PER_COMMIT = 50  # the Hub recommends commits of under 100 files


def parse_spec(text: str) -> tuple[str, str | None]:
    """`hf:org/name[@revision]` -> (repo id, revision or None)."""
    repo, _, revision = text.removeprefix("hf:").partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise SourceError(f"{text}: not a Hub repository id (hf:org/name[@revision])")
    return repo, revision or None


@contextlib.contextmanager
def hub_errors(name: str, error: type[ReshardError] = SourceError) -> Iterator[None]:
    """Turn what huggingface_hub raises into one line that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise error(
            f"{name}: not in the local Hub cache ({constants.HF_HUB_CACHE}) and {why}"
        ) from e
    except GatedRepoError as e:
        raise error(
            f"{name}: the repository is gated; accept its terms on the Hub, then log in"
        ) from e
    except RepositoryNotFoundError as e:
        raise error(
            f"{name}: no such repository, or it is private (set HF_TOKEN or run `hf auth login`)"
        ) from e
    except RevisionNotFoundError as e:
        raise error(f"{name}: no such revision (branch, tag or commit)") from e
    except EntryNotFoundError as e:
        raise error(f"{name}: the repository has no such file") from e
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 401:
            what = "authentication failed: set HF_TOKEN or run `hf auth login`"
        elif status == 403:
            what = "the token may not do this (it needs write access to the repository)"
        elif status is not None and status >= 500:
            what = f"the Hub answered {status}; try again later"
        else:
            what = f"the Hub refused the request ({status})"
        raise error(f"{name}: {what}") from e
    except (ConnectionError, TimeoutError) as e:
        raise error(f"{name}: cannot reach {constants.ENDPOINT} ({type(e).__name__})") from e
    except Exception as e:
        # httpx's connection errors are not OSErrors; anything else from the client too.
        if "Connect" in type(e).__name__ or "Timeout" in type(e).__name__:
            raise error(f"{name}: cannot reach {constants.ENDPOINT} ({type(e).__name__})") from e
        raise


def _cached_snapshot(repo: str, revision: str, files: tuple[str, ...]) -> Path | None:
    """The snapshot directory of `repo` at commit `revision` if `files` are all cached."""
    from huggingface_hub import try_to_load_from_cache

    if not COMMIT_SHA.fullmatch(revision):
        return None
    cached = [try_to_load_from_cache(repo, f, revision=revision) for f in files]
    if not all(isinstance(c, str) for c in cached):
        return None
    return Path(cached[0]).parent


def _fetch_small_files(
    repo: str, revision: str | None, name: str, manifest_only: bool = False
) -> Path | None:
    """Fetch the manifest, pinning the revision; then the small files at that sha.

    Returns the snapshot directory (named by the commit sha), or None when the
    repository holds no reshard.json (an ordinary Hugging Face checkpoint).
    """
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    with hub_errors(name):
        try:
            manifest = Path(hf_hub_download(repo, MANIFEST, revision=revision))
        except LocalEntryNotFoundError as e:
            if e.__cause__ is not None and not constants.HF_HUB_OFFLINE:
                raise e.__cause__ from e  # the Hub failed (5xx, no connection): say so
            # Offline and not cached: no sharded checkpoint we can open; an ordinary one may
            # still be cached, and its own reader says what is missing.
            return None
        except EntryNotFoundError:
            return None
        sha = manifest.parent.name
        if manifest_only:
            return manifest.parent
        snapshot_download(
            repo, revision=sha, allow_patterns=list(SMALL_FILES), ignore_patterns=["*/*"]
        )
    return manifest.parent


def open_hub_checkpoint(text: str, *, manifest_only: bool = False) -> ShardedCheckpoint | None:
    """The sharded checkpoint at `hf:org/name[@revision]`, rank files fetched on demand, each
    from the commit its manifest came from; None when the repository is not a sharded one.

    The config / tokenizer files come too, unless `manifest_only` (`reshard inspect`)."""
    repo, revision = parse_spec(text)
    # config.json marks the small files fetched (every checkpoint carries it), not only the
    # manifest, which `inspect` alone may have put in the cache.
    needed = (MANIFEST,) if manifest_only else (MANIFEST, "config.json")
    snapshot = _cached_snapshot(repo, revision or "", needed) or _fetch_small_files(
        repo, revision, text, manifest_only
    )
    if snapshot is None:
        return None
    sha = snapshot.name
    pinned = f"hf:{repo}@{sha}"

    def fetch(filename: str) -> Path:
        from huggingface_hub import hf_hub_download

        with hub_errors(f"{pinned}: {filename}", error=SourceError):
            return Path(hf_hub_download(repo, filename, revision=sha))

    blobs = snapshot.parent.parent / "blobs"  # where the Hub cache keeps the bytes
    return ShardedCheckpoint(snapshot, fetch=fetch, blobs=blobs, spec=pinned)


def agree_on_revision(text: str) -> str:
    """Under torch.distributed, every rank takes rank 0's commit sha for `hf:org/name`.

    Each rank resolving `main` for itself could straddle a push and mix revisions.
    """
    import torch
    import torch.distributed as dist

    repo, revision = parse_spec(text)
    if revision and COMMIT_SHA.fullmatch(revision):
        return text
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return text
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    sha = torch.zeros(40, dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        ckpt = open_hub_checkpoint(text)
        if ckpt is not None:
            sha = torch.tensor(list(ckpt.directory.name.encode()), dtype=torch.uint8, device=device)
    dist.broadcast(sha, src=0)
    if not sha.any():
        return text
    return f"hf:{repo}@{bytes(sha.cpu().tolist()).decode()}"


def upload(
    directory: Path,
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> tuple[str, str]:
    """Publish a finished sharded checkpoint; return (repo URL, commit sha).

    Every rank file is hashed against the manifest first. The model card is rebuilt for
    `repo` (its commands name it) and written into the directory before the upload.
    Rank files go up in commits of at most FILES_PER_COMMIT, then the manifest, card and
    config/tokenizer files in a last commit. Interrupted uploads resume: files the Hub
    already has are not sent again.
    """
    from huggingface_hub import HfApi

    from reshard.modelcard import model_card

    ckpt = ShardedCheckpoint(directory)
    for rank in range(ckpt.layout.world_size):
        ckpt.check_rank_file(rank)
    from reshard.writer import atomic_write_text

    atomic_write_text(Path(directory) / "README.md", model_card(ckpt.manifest, repo=repo))
    files = [f.file for r in ckpt.manifest.ranks for f in r.files]
    api = HfApi()
    name = f"hf:{repo}"
    message = (
        commit_message or f"reshard: {ckpt.manifest.model_type} sharded for {ckpt.layout.name}"
    )
    with hub_errors(name):
        url = api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        # The Hub asks for commits of under 100 files. Rank files go first, in batches; the
        # manifest goes last, so the repository never looks finished before its rank files.
        batches = [files[i : i + FILES_PER_COMMIT] for i in range(0, len(files), FILES_PER_COMMIT)]
        for k, batch in enumerate(batches, start=1):
            api.upload_folder(
                repo_id=repo,
                folder_path=str(directory),
                revision=revision,
                commit_message=f"{message} (rank files {k}/{len(batches)})",
                allow_patterns=batch,
            )
        info = api.upload_folder(
            repo_id=repo,
            folder_path=str(directory),
            revision=revision,
            commit_message=message,
            allow_patterns=list(SMALL_FILES),
        )
    return str(url), info.oid
