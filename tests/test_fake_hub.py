"""The real huggingface_hub client, end to end, against tests/fake_hub.py's loopback Hub.

Upload/download flows run the client in a subprocess with `hub_env` (how reshard's CLI
tests will use it: the client reads HF_ENDPOINT & co. at import); listing and error
mapping run in-process under `patched_client`, which also proves that path works.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub, git_blob_sha1, hub_env, patched_client

pytest.importorskip("huggingface_hub")

REPO = "org/tiny"
TOKEN = "hf_fake_token"
CONFIG = b'{"model_type": "tiny", "hidden_size": 8}'
WEIGHTS = hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024 // 32)  # 2 MiB, LFS by name
_MARK = "@@FAKE_HUB_RESULT@@"


def run_client(
    hub: FakeHub, tmp_path: Path, code: str, *, token: str | None = TOKEN, offline: bool = False
) -> Any:
    """Run `code` in a fresh interpreter pointed at `hub`; return the JSON of its `result`."""
    script = textwrap.dedent(code) + f"\nimport json\nprint({_MARK!r} + json.dumps(result))\n"
    env = hub_env(hub, tmp_path, token, offline=offline)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.rsplit(_MARK, 1)[1])


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """A hub that wants TOKEN, holding REPO with a json file and an LFS weights file."""
    with FakeHub(token=TOKEN) as hub:
        hub.create_repo(REPO)
        hub.commit(REPO, {"config.json": CONFIG, "model.safetensors": WEIGHTS}, message="add")
        yield hub


def _puts(hub: FakeHub) -> list[str]:
    return [r.path for r in hub.requests if r.method == "PUT"]


def test_upload_folder_regular_and_lfs_then_reupload_sends_no_lfs_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes(CONFIG)
    (src / "model.safetensors").write_bytes(WEIGHTS)
    code = f"""
    import shutil
    from huggingface_hub import HfApi
    api = HfApi()
    result = {{"whoami": api.whoami()["name"]}}
    api.create_repo("{REPO}", private=True, exist_ok=True)
    result["url"] = str(api.create_repo("{REPO}", private=True, exist_ok=True))  # 409 -> ok
    first = api.upload_folder(repo_id="{REPO}", folder_path="{src}", commit_message="weights")
    result["first"] = [first.oid, first.commit_url]
    again = api.upload_folder(repo_id="{REPO}", folder_path="{src}")  # nothing changed
    result["again"] = again.oid
    shutil.copy("{src}/model.safetensors", "{src}/copy.safetensors")
    result["copy"] = api.upload_folder(repo_id="{REPO}", folder_path="{src}").oid
    """
    with FakeHub(token=TOKEN) as hub:
        result = run_client(hub, tmp_path, code)
        first_oid, commit_url = result["first"]
        assert result["whoami"] == "fake-user"
        assert result["url"] == f"{hub.endpoint}/{REPO}"
        assert hub.repos[REPO].private
        # The first commit holds both files; only the safetensors one went through LFS.
        first = hub.repos[REPO].commits[first_oid]
        assert commit_url == f"{hub.endpoint}/{REPO}/commit/{first_oid}"
        assert first.title == "weights"
        assert dict(first.files) == {
            ".gitattributes": hub.files(REPO, first.parent)[".gitattributes"],
            "config.json": CONFIG,
            "model.safetensors": WEIGHTS,
        }
        assert first.lfs == {"model.safetensors"}
        # Unchanged re-upload: no new commit. Same bytes under a new name: a commit, but
        # the LFS batch answers "already there", so the 2 MiB went over the wire once.
        assert result["again"] == first_oid
        assert result["copy"] == hub.head(REPO) != first_oid
        assert hub.files(REPO)["copy.safetensors"] == WEIGHTS
        assert [(u.oid, u.size) for u in hub.lfs_uploads] == [
            (hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS))
        ]
        assert len(_puts(hub)) == 1
        commits = [r for r in hub.requests if r.route == "commit"]
        assert len(commits) == 2 and all(r.body_size < 10_000 for r in commits)


def test_hf_hub_download_each_file_and_cache_layout(hub: FakeHub, tmp_path: Path) -> None:
    code = f"""
    import os
    from huggingface_hub import hf_hub_download
    result = {{}}
    for name in ("config.json", "model.safetensors"):
        path = hf_hub_download("{REPO}", name)
        result[name] = [path, os.path.realpath(path)]
    """
    result = run_client(hub, tmp_path, code)
    head = hub.head(REPO)
    repo_cache = tmp_path / "hf-home" / "hub" / "models--org--tiny"
    assert (repo_cache / "refs" / "main").read_text() == head
    for name, data in (("config.json", CONFIG), ("model.safetensors", WEIGHTS)):
        link, blob = map(Path, result[name])
        assert link == repo_cache / "snapshots" / head / name
        assert link.read_bytes() == data
        # Blobs are named by the ETag: sha256 for LFS files, the git blob id otherwise.
        lfs = name.endswith(".safetensors")
        expected = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        assert blob == repo_cache / "blobs" / expected
    assert hub.heads(REPO) == hub.downloads(REPO) == ["config.json", "model.safetensors"]


def test_snapshot_download_fetches_only_allowed_files(hub: FakeHub, tmp_path: Path) -> None:
    hub.commit(REPO, {"sub/extra.json": b"{}", "tokenizer.json": b"{}"})
    code = f"""
    import os
    from huggingface_hub import snapshot_download
    path = snapshot_download("{REPO}", allow_patterns=["*.json"], ignore_patterns=["sub/*"])
    result = sorted(os.listdir(path))
    """
    assert run_client(hub, tmp_path, code) == ["config.json", "tokenizer.json"]
    assert sorted(hub.downloads(REPO)) == ["config.json", "tokenizer.json"]
    routes = [r.route for r in hub.requests]
    assert routes.count("info") == 1 and routes.count("tree") == 1


def test_pinned_commit_download_after_main_moved(hub: FakeHub, tmp_path: Path) -> None:
    old = hub.head(REPO)
    new = hub.commit(REPO, {"config.json": b'{"model_type": "v2"}'})
    code = f"""
    from pathlib import Path
    from huggingface_hub import hf_hub_download
    result = [
        Path(hf_hub_download("{REPO}", "config.json", revision=rev)).read_text()
        for rev in ("{old}", "main", "{new}")
    ]
    """
    v2 = '{"model_type": "v2"}'
    assert run_client(hub, tmp_path, code) == [CONFIG.decode(), v2, v2]
    # `new` is what main resolved to a moment before: the cache answers, no HEAD needed.
    assert [r.revision for r in hub.requests if r.method == "HEAD"] == [old, "main"]


def test_offline_redownload_is_served_from_cache(hub: FakeHub, tmp_path: Path) -> None:
    code = f"""
    import hashlib
    from pathlib import Path
    from huggingface_hub import hf_hub_download, snapshot_download
    weights = Path(hf_hub_download("{REPO}", "model.safetensors")).read_bytes()
    folder = snapshot_download("{REPO}")
    result = [hashlib.sha256(weights).hexdigest(), sorted(p.name for p in Path(folder).iterdir())]
    """
    online = run_client(hub, tmp_path, code)
    seen = len(hub.requests)
    offline = run_client(hub, tmp_path, code, offline=True)
    assert offline == online
    assert online[0] == hashlib.sha256(WEIGHTS).hexdigest()
    assert online[1] == [".gitattributes", "config.json", "model.safetensors"]
    assert len(hub.requests) == seen  # offline: not one request reached the server


def test_error_mapping_in_a_subprocess(hub: FakeHub, tmp_path: Path) -> None:
    code = f"""
    from huggingface_hub import HfApi, hf_hub_download
    def outcome(call):
        try:
            call()
        except Exception as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            return [type(e).__name__, status]
        return ["ok", None]
    result = {{
        "repo": outcome(lambda: hf_hub_download("org/missing", "config.json")),
        "file": outcome(lambda: hf_hub_download("{REPO}", "missing.json")),
        "revision": outcome(lambda: hf_hub_download("{REPO}", "config.json", revision="nope")),
        "info": outcome(lambda: HfApi().model_info("{REPO}", revision="nope")),
        "wrong_token": outcome(lambda: hf_hub_download("{REPO}", "config.json", token="hf_bad")),
    }}
    """
    assert run_client(hub, tmp_path, code) == {
        "repo": ["RepositoryNotFoundError", 404],
        "file": ["RemoteEntryNotFoundError", 404],
        "revision": ["RevisionNotFoundError", 404],
        "info": ["RevisionNotFoundError", 404],
        "wrong_token": ["HfHubHTTPError", 401],
    }


# -- in-process, under patched_client ------------------------------------------------------


def test_listing_and_info_in_process(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    hub.tree_page_size = 2  # force the client through the Link-header pagination
    hub.commit(REPO, {"sub/a.txt": b"a", "sub/deep/b.txt": b"b"})
    with patched_client(hub, tmp_path, TOKEN):
        api = HfApi()
        info = api.model_info(REPO, files_metadata=True)
        files = api.list_repo_files(REPO)
        tree = list(api.list_repo_tree(REPO, "sub"))
        paths = api.get_paths_info(REPO, ["config.json", "sub", "absent"], expand=True)
        api.create_branch(REPO, branch="dev", exist_ok=True)
        api.create_branch(REPO, branch="dev", exist_ok=True)  # 409 -> fine
        dev_commit = api.upload_file(
            path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=REPO, revision="dev"
        )
        refs = api.list_repo_refs(REPO)
    assert info.sha == hub.head(REPO)
    sizes = {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings}
    assert sizes["model.safetensors"] == (len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest())
    assert sizes["config.json"] == (len(CONFIG), None)
    assert files == [".gitattributes", "config.json", "model.safetensors", "sub/a.txt"] + [
        "sub/deep/b.txt"
    ]
    assert [(type(e).__name__, e.path) for e in tree] == [
        ("RepoFolder", "sub/deep"),
        ("RepoFile", "sub/a.txt"),
    ]
    assert isinstance(paths[0], RepoFile) and paths[0].blob_id == git_blob_sha1(CONFIG)
    assert isinstance(paths[1], RepoFolder) and len(paths) == 2
    assert paths[0].last_commit is not None and paths[0].last_commit.title == "add"
    assert {b.name: b.target_commit for b in refs.branches} == {
        "main": hub.head(REPO),
        "dev": dev_commit.oid,
    }
    assert hub.files(REPO, "dev")["dev.txt"] == b"dev" and "dev.txt" not in hub.files(REPO)
    tree_pages = [r for r in hub.requests if r.route == "tree"]
    assert len(tree_pages) > 2 and any("cursor" in r.query for r in tree_pages)


def test_error_mapping_in_process(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    with patched_client(hub, tmp_path, TOKEN):
        api = HfApi()
        with pytest.raises(RepositoryNotFoundError) as missing:
            api.model_info("org/missing")
        assert missing.value.response.status_code == 404  # authenticated: 404
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(REPO, "missing.json")
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download(REPO, "config.json", revision="f" * 40)
        with pytest.raises(HfHubHTTPError) as wrong:
            api.whoami(token="hf_wrong")
        assert wrong.value.response.status_code == 401
        hub.fail_next(r"^/api/models/org/tiny$", 500)
        with pytest.raises(HfHubHTTPError) as crashed:
            api.model_info(REPO)
        assert crashed.value.response.status_code == 500
        assert api.model_info(REPO).sha == hub.head(REPO)  # the failure was one-shot
        # A 503 on the metadata HEAD: with nothing cached the client asks once more.
        hub.fail_next(r"/resolve/", 503, method="HEAD")
        path = hf_hub_download(REPO, "config.json")
        assert Path(path).read_bytes() == CONFIG
        assert [r.status for r in hub.requests if r.method == "HEAD"][-2:] == [503, 200]

    with patched_client(hub, tmp_path / "anon", None):  # no token: 401, as for a private repo
        with pytest.raises(RepositoryNotFoundError) as anonymous:
            hf_hub_download(REPO, "config.json")
        assert anonymous.value.response.status_code == 401


def test_private_repo_needs_a_token_even_on_an_open_hub(tmp_path: Path) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with FakeHub() as hub:
        hub.create_repo("org/secret", private=True)
        hub.create_repo("org/open")
        with patched_client(hub, tmp_path, None):
            assert HfApi().model_info("org/open").id == "org/open"
            with pytest.raises(RepositoryNotFoundError):
                HfApi().model_info("org/secret")
        with patched_client(hub, tmp_path, "any-token"):
            assert HfApi().model_info("org/secret").private is True
    assert os.environ.get("HF_ENDPOINT") != hub.endpoint  # patched_client restored the env


def test_resolve_headers_and_ranges(hub: FakeHub) -> None:
    url = f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    head = urllib.request.urlopen(urllib.request.Request(url, headers=auth, method="HEAD"))
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    assert head.headers["X-Repo-Commit"] == hub.head(REPO)
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{sha}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(WEIGHTS))
    part = urllib.request.urlopen(
        urllib.request.Request(url, headers={**auth, "Range": "bytes=10-19"})
    )
    assert part.status == 206 and part.read() == WEIGHTS[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(WEIGHTS)}"
    tail = urllib.request.urlopen(
        urllib.request.Request(url, headers={**auth, "Range": "bytes=-5"})
    )
    assert tail.read() == WEIGHTS[-5:]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{hub.endpoint}/{REPO}/resolve/main/nope.bin")  # no token
    assert missing.value.code == 401 and missing.value.headers["X-Error-Code"] == "RepoNotFound"
