"""A small in-process fake of the Hugging Face Hub HTTP API, served on loopback only.

Why: reshard reaches the Hub only through huggingface_hub, and what can break is the
protocol between the two: which requests the client makes, which headers and fields it
relies on, how it maps error answers to exceptions, what it caches. Mocking
`hf_hub_download` would test our assumptions about the client instead of the client, so
tests run the REAL client (2.4.0 when this was written) against this server:

    with FakeHub() as hub:
        env = hub_env(hub, tmp_path, token="hf_test")   # for a subprocess
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        assert hub.downloads("org/name") == ["config.json"]

Pointing the client here. huggingface_hub reads its environment ONCE, at import, into
`huggingface_hub.constants` (ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_HUB_DISABLE_XET, ...) and derives more from it at import time: the URL template in
`constants.HUGGINGFACE_CO_URL_TEMPLATE`, the trusted origins in `utils._http._HUB_ORIGINS`,
and the endpoint of the module-level `HfApi` behind `huggingface_hub.create_repo` & co. So:

1. Subprocess (recommended, what `tests/test_fake_hub.py` uses for the end-to-end flows):
   `hub_env(hub, tmp_path, token=None, offline=False)` returns a full environment with every
   inherited HF_* variable dropped and HF_ENDPOINT, HF_HOME / HF_HUB_CACHE (under
   tmp_path, so calls with the same tmp_path share one cache), HF_HUB_DISABLE_XET=1 (else
   uploads and downloads go through hf_xet, which this fake does not speak),
   HF_HUB_DISABLE_TELEMETRY=1 (else the first request fetches /api/agent-harnesses to build
   the user agent), HF_TOKEN and HF_HUB_OFFLINE set. Nothing leaks between tests.
2. In-process: `with patched_client(hub, tmp_path, token=None, offline=False):` patches the
   constants above (and the module-level HfApi's endpoint) with pytest.MonkeyPatch and
   closes the client's shared httpx session on entry and exit. Faster, and lets a test use
   pytest.raises on the client's exceptions; anything that copied a constant before the
   patch (an HfApi built earlier, a module that did `from huggingface_hub.constants import
   ENDPOINT`) still points at the real Hub, hence (1) for whole programs.

What the server models: model repos "org/name" kept in memory (repo -> branches ->
commits; each commit a full snapshot {path: bytes}, its id a sha1 over parent, message and
content), created with the Hub's default .gitattributes as the first commit. LFS vs regular
follows that .gitattributes (*.safetensors, *.bin, ...) or size >= `lfs_threshold`.
Endpoints: whoami-v2, repos/create, repos/delete, validate-yaml, model info (with
?blobs=true for sizes/LFS), tree (recursive, paginated via Link headers, expand),
paths-info, refs, branch create/delete, preupload, the LFS batch API with upload + verify
actions and a "pre-signed" PUT URL on this server (sha256 checked), the ndjson commit
endpoint (file, lfsFile, deletedFile, deletedFolder, parentCommit, create_pr), and HEAD/GET
/{repo}/resolve/{revision}/{path} with X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size
(LFS), Content-Length and Range support. Revisions: a branch name or a full commit sha.

Errors, as the client maps them (utils/_http.py, hf_raise_for_status): the X-Error-Code
header decides - "RepoNotFound" -> RepositoryNotFoundError (401 without a token, 404 with
one, as the Hub does, and also for a private repo read without a valid token),
"RevisionNotFound" -> RevisionNotFoundError, "EntryNotFound" -> RemoteEntryNotFoundError
(the 404 also carries X-Repo-Commit, which the client uses to cache the absence). A bare
401 is only read as "repo not found" by the client for https URLs, so this fake always
sends the code. A token that is not `hub.token` gets 401 "Invalid credentials in
Authorization header" (a plain HfHubHTTPError). When `hub.token` is set, every request
without it gets 401, except the LFS upload URL, which is pre-signed like the Hub's S3 URLs
(the client sends no Authorization there). `fail_next(path_regex, status)` injects errors.

Not modelled: dataset/space repos, tags, gitignore-driven shouldIgnore, Xet, CDN redirects
(LFS files are served directly with 200, not via a 302 to another host), gated repos.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import itertools
import json
import os
import re
import secrets
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

# What the Hub writes as a new repo's first commit (abridged to the common patterns).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model"
        " *.msgpack *.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar"
        " *.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst"
        " *tfevents*"
    ).split()
)
LFS_THRESHOLD = 1_000_000  # bytes; files this large go to LFS whatever their name
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_")
_ENV_DROP = ("TRANSFORMERS_OFFLINE",)  # the client reads it as HF_HUB_OFFLINE


def git_blob_sha1(data: bytes) -> str:
    """The git object id of `data` (`git hash-object`): the Hub's ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file git stores for `data`; its blob id is an LFS file's `oid`."""
    digest = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {len(data)}\n".encode()


def _now() -> str:
    """The Hub's timestamp format, which huggingface_hub's parse_datetime expects."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Commit:
    """One commit: a full snapshot of the files, and which of them are stored in LFS."""

    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: Mapping[str, bytes]
    lfs: frozenset[str]


@dataclass
class Repo:
    """A model repo: branches name commit ids; LFS objects are kept per repo, like the Hub."""

    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    pull_requests: int = 0


@dataclass
class Request:
    """One request as the server saw it; `route`/`repo_id`/`revision`/`filename` once routed."""

    method: str
    path: str  # percent-decoded, without the query
    raw_path: str  # as sent: a revision's or folder's own "/" stays %2F here
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body_size: int
    status: int = 0
    route: str = ""
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None


@dataclass(frozen=True)
class LfsUpload:
    """Bytes that reached the LFS upload URL: what a re-upload must not send again."""

    repo_id: str
    oid: str
    size: int


@dataclass
class _Failure:
    pattern: re.Pattern[str]
    status: int
    remaining: int
    method: str | None
    error_code: str | None


class _HubError(Exception):
    """An error answer, raised inside a route and turned into a JSON response."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


_Response = tuple[int, dict[str, str], bytes]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return (
        status,
        {"Content-Type": "application/json", **(headers or {})},
        json.dumps(data).encode(),
    )


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true", "yes")


class FakeHub:
    """The fake Hub: a ThreadingHTTPServer on 127.0.0.1, started on construction.

    Use it as a context manager (or call `close()`). State is plain attributes so tests can
    seed and inspect it directly: `repos`, `requests`, `lfs_uploads`, `token`.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        user: str = "fake-user",
        lfs_threshold: int = LFS_THRESHOLD,
        tree_page_size: int = 1000,
    ) -> None:
        self.token = token
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.tree_page_size = tree_page_size
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lfs_uploads: list[LfsUpload] = []
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._serial = itertools.count()
        self._secret = secrets.token_bytes(16)
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(  # a short poll: close() returns in ~50 ms
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="FakeHub",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if not self._closed:
            self._closed = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)

    # -- seeding and inspection, without HTTP ------------------------------------------

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        """Create `repo_id` with `main` holding the Hub's default .gitattributes."""
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists")
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
                raise ValueError(f"{repo_id}: repo ids are 'org/name'")
            repo = Repo(repo_id=repo_id, private=private, created_at=_now())
            self.repos[repo_id] = repo
            self._add_commit(
                repo,
                "main",
                {".gitattributes": DEFAULT_GITATTRIBUTES.encode()},
                frozenset(),
                "initial commit",
                "",
            )
            return repo

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        branch: str = "main",
        message: str = "Update files",
        delete: Iterable[str] = (),
    ) -> str:
        """Commit `files` (and deletions) on `branch` directly; returns the new commit id.

        Lets a test move a branch under a client (e.g. to check pinned revisions). Files are
        stored as LFS by the same rule preupload uses.
        """
        with self._lock:
            repo = self.repos[repo_id]
            head = repo.commits[repo.branches[branch]]
            snapshot = dict(head.files)
            lfs = set(head.lfs)
            for path in delete:
                snapshot.pop(path)
                lfs.discard(path)
            for path, data in files.items():
                snapshot[path] = data
                if self._is_lfs(head, path, len(data)):
                    repo.lfs_objects[hashlib.sha256(data).hexdigest()] = data
                    lfs.add(path)
                else:
                    lfs.discard(path)
            return self._add_commit(repo, branch, snapshot, frozenset(lfs), message, "").oid

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit id `branch` points at."""
        with self._lock:
            return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The snapshot at `revision` (a branch or a commit id)."""
        with self._lock:
            return dict(self._resolve(self.repos[repo_id], revision).files)

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Paths whose bytes were served (GET on /resolve answered 2xx), in order."""
        return self._resolved("GET", repo_id)

    def heads(self, repo_id: str | None = None) -> list[str]:
        """Paths whose metadata was served (HEAD on /resolve answered 2xx), in order."""
        return self._resolved("HEAD", repo_id)

    def lfs_bytes_uploaded(self, repo_id: str | None = None) -> int:
        """Total bytes received on LFS upload URLs (for `repo_id` if given)."""
        with self._lock:
            return sum(u.size for u in self.lfs_uploads if repo_id in (None, u.repo_id))

    def clear_requests(self) -> None:
        """Forget the request log (e.g. after seeding through the client)."""
        with self._lock:
            self.requests.clear()

    def fail_next(
        self,
        path_regex: str,
        status: int,
        times: int = 1,
        *,
        method: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Answer the next `times` requests whose decoded path matches (re.search) with `status`.

        `error_code` goes out as X-Error-Code (e.g. "GatedRepo"). Mind the client's retries:
        it retries 5xx/429 on some calls (http_backoff: preupload, LFS, tree listing;
        download HEADs once more when nothing is cached), with sleeps of 1, 2, 4, 8 s.
        """
        with self._lock:
            self._failures.append(
                _Failure(
                    re.compile(path_regex), status, times, method and method.upper(), error_code
                )
            )

    # -- internals: state --------------------------------------------------------------

    def _resolved(self, method: str, repo_id: str | None) -> list[str]:
        with self._lock:
            return [
                r.filename
                for r in self.requests
                if r.route == "resolve"
                and r.method == method
                and 200 <= r.status < 300
                and r.filename is not None
                and repo_id in (None, r.repo_id)
            ]

    def _add_commit(
        self,
        repo: Repo,
        branch: str,
        files: Mapping[str, bytes],
        lfs: frozenset[str],
        title: str,
        description: str,
    ) -> Commit:
        parent = repo.branches.get(branch)
        digest = hashlib.sha1(f"{parent}\n{next(self._serial)}\n{title}\n{description}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{hashlib.sha256(files[path]).hexdigest()}\n".encode())
        commit = Commit(digest.hexdigest(), parent, title, description, _now(), dict(files), lfs)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _is_lfs(self, commit: Commit, path: str, size: int) -> bool:
        """The preupload rule: matched by the repo's .gitattributes, or large."""
        if size == 0:
            return False
        if size >= self.lfs_threshold:
            return True
        attributes = commit.files.get(".gitattributes", b"").decode(errors="replace")
        for line in attributes.splitlines():
            pattern, *attrs = line.split() or ["#"]
            if not pattern.startswith("#") and "filter=lfs" in attrs:
                target = path if "/" in pattern else path.rsplit("/", 1)[-1]
                if fnmatch(target, pattern):
                    return True
        return False

    def _blob_meta(self, commit: Commit, path: str) -> dict[str, Any]:
        """size / blob id / LFS info of one file, in the tree listing's field names."""
        data = commit.files[path]
        if path in commit.lfs:
            pointer = lfs_pointer(data)
            lfs = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": len(pointer),
            }
            return {"size": len(data), "oid": git_blob_sha1(pointer), "lfs": lfs}
        return {"size": len(data), "oid": git_blob_sha1(data)}

    def _last_commit(self, repo: Repo, commit: Commit, prefix: str) -> dict[str, str]:
        """The newest commit that changed `prefix` (a file, or a folder when it ends in /)."""

        def view(c: Commit) -> dict[str, bytes]:
            return {p: d for p, d in c.files.items() if p == prefix or p.startswith(prefix)}

        current = commit
        while current.parent is not None and view(repo.commits[current.parent]) == view(current):
            current = repo.commits[current.parent]
        return {"id": current.oid, "title": current.title, "date": current.date}

    def _entry(self, repo: Repo, commit: Commit, path: str, *, expand: bool) -> dict[str, Any]:
        if path in commit.files:
            meta = self._blob_meta(commit, path)
            entry = {"type": "file", "oid": meta["oid"], "size": meta["size"], "path": path}
            if "lfs" in meta:
                entry["lfs"] = meta["lfs"]
            if expand:
                entry["lastCommit"] = self._last_commit(repo, commit, path)
            return entry
        listing = "".join(sorted(p for p in commit.files if p.startswith(path + "/")))
        entry = {
            "type": "directory",
            "oid": hashlib.sha1(listing.encode()).hexdigest(),
            "size": 0,
            "path": path,
        }
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path + "/")
        return entry

    def _is_dir(self, commit: Commit, path: str) -> bool:
        return path == "" or any(p.startswith(path + "/") for p in commit.files)

    # -- internals: HTTP ---------------------------------------------------------------

    def _authenticate(self, req: Request, *, repo_scoped: bool) -> bool:
        """Whether the request carries an accepted token; raises 401 as the Hub would."""
        header = req.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or (self.token is not None and value != self.token):
                raise _HubError(401, "Invalid credentials in Authorization header")
            return True
        if self.token is not None:
            if repo_scoped:  # what the Hub says about a private repo to an anonymous caller
                raise _HubError(401, "Repository not found", code="RepoNotFound")
            raise _HubError(401, "Invalid username or password.")
        return False

    def _repo(self, req: Request, repo_id: str, *, write: bool = False) -> Repo:
        req.repo_id = repo_id
        authenticated = self._authenticate(req, repo_scoped=True)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authenticated):
            status = 404 if authenticated else 401
            raise _HubError(status, "Repository not found", code="RepoNotFound")
        if write and not authenticated:
            raise _HubError(401, "You must be authenticated to write to a repository")
        return repo

    def _take_failure(self, req: Request) -> _Failure | None:
        for failure in self._failures:
            if failure.remaining > 0 and failure.method in (None, req.method):
                if failure.pattern.search(req.path):
                    failure.remaining -= 1
                    return failure
        return None

    def _dispatch(self, req: Request, raw_path: str, body: bytes) -> _Response:
        """Route one request. Runs under the lock: the fake favours simplicity over speed."""
        failure = self._take_failure(req)
        if failure is not None:
            raise _HubError(
                failure.status, f"Injected failure ({failure.status})", failure.error_code
            )
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        method = req.method
        if segs[:1] == ["api"]:
            return self._api(req, segs[1:], body)
        if len(segs) == 4 and segs[0] == "__lfs" and method == "PUT":
            return self._lfs_put(req, f"{segs[1]}/{segs[2]}", segs[3], body)
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{segs[0]}/{segs[1][: -len('.git')]}"
            if segs[5] == "batch" and method == "POST":
                return self._lfs_batch(req, repo_id, body)
            if segs[5] == "verify" and method == "POST":
                return self._lfs_verify(req, repo_id, body)
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(req, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise _HubError(404, f"FakeHub: no route for {method} {req.path}")

    def _api(self, req: Request, segs: list[str], body: bytes) -> _Response:
        method = req.method
        if segs == ["whoami-v2"] and method == "GET":
            req.route = "whoami"
            if not self._authenticate(req, repo_scoped=False):
                raise _HubError(401, "Invalid username or password.")
            return _json(
                {
                    "type": "user",
                    "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                    "name": self.user,
                    "fullname": "Fake User",
                    "email": f"{self.user}@example.invalid",
                    "emailVerified": True,
                    "isPro": False,
                    "orgs": [],
                    "auth": {
                        "type": "access_token",
                        "accessToken": {"displayName": "fake", "role": "write"},
                    },
                }
            )
        if segs == ["agent-harnesses"] and method == "GET":  # only without HF_HUB_DISABLE_TELEMETRY
            req.route = "agent-harnesses"
            return _json({"standardEnvVars": [], "harnesses": {}})
        if segs == ["validate-yaml"] and method == "POST":
            req.route = "validate-yaml"
            self._authenticate(req, repo_scoped=False)
            return _json({"errors": [], "warnings": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(req, json.loads(body or b"{}"))
        if segs == ["repos", "delete"] and method == "DELETE":
            req.route = "delete-repo"
            payload = json.loads(body or b"{}")
            repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
            self._repo(req, repo_id, write=True)
            del self.repos[repo_id]
            return _json({})
        if len(segs) >= 3 and segs[0] == "models":
            return self._repo_api(req, f"{segs[1]}/{segs[2]}", segs[3:], body)
        if segs[:1] in (["datasets"], ["spaces"], ["kernels"]):
            raise _HubError(404, "FakeHub serves model repos only", code="RepoNotFound")
        raise _HubError(404, f"FakeHub: no route for {method} {req.path}")

    def _create_repo(self, req: Request, payload: dict[str, Any]) -> _Response:
        req.route = "create-repo"
        if not self._authenticate(req, repo_scoped=False):
            raise _HubError(401, "You must be authenticated to create a repository")
        if payload.get("type") not in (None, "model"):
            raise _HubError(400, "FakeHub serves model repos only")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        req.repo_id = repo_id
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return _json({"error": "You already created this model repo", "url": url}, 409)
        private = payload.get("visibility", "private" if payload.get("private") else "public")
        self.create_repo(repo_id, private=private == "private")
        return _json(
            {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}
        )

    def _repo_api(self, req: Request, repo_id: str, rest: list[str], body: bytes) -> _Response:
        method = req.method
        if not rest and method == "GET":
            req.route = "info"
            return self._info(req, self._repo(req, repo_id), "main")
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            req.route = "info"
            return self._info(req, self._repo(req, repo_id), rest[1])
        if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
            req.route = "tree"
            return self._tree(req, self._repo(req, repo_id), rest[1], "/".join(rest[2:]))
        if rest == ["refs"] and method == "GET":
            req.route = "refs"
            return self._refs(req, self._repo(req, repo_id))
        if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
            req.route = "paths-info"
            return self._paths_info(req, self._repo(req, repo_id), rest[1], body)
        if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
            req.route = "preupload"
            return self._preupload(req, self._repo(req, repo_id, write=True), rest[1], body)
        if len(rest) == 2 and rest[0] == "commit" and method == "POST":
            req.route = "commit"
            return self._commit(req, self._repo(req, repo_id, write=True), rest[1], body)
        if len(rest) == 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
            req.route = "branch"
            return self._branch(req, self._repo(req, repo_id, write=True), rest[1], body)
        raise _HubError(404, f"FakeHub: no route for {method} {req.path}")

    def _info(self, req: Request, repo: Repo, revision: str) -> _Response:
        req.revision = revision
        commit = self._resolve(repo, revision)
        blobs = _flag(req.query, "blobs")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:  # the Hub sends sizes and LFS info only for files_metadata=True
                meta = self._blob_meta(commit, path)
                sibling.update(size=meta["size"], blobId=meta["oid"])
                if "lfs" in meta:
                    lfs = meta["lfs"]
                    sibling["lfs"] = {
                        "size": lfs["size"],
                        "sha256": lfs["oid"],
                        "pointerSize": lfs["pointerSize"],
                    }
            siblings.append(sibling)
        return _json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "spaces": [],
                "usedStorage": sum(len(d) for d in commit.files.values()),
            }
        )

    def _tree(self, req: Request, repo: Repo, revision: str, path: str) -> _Response:
        req.revision, req.filename = revision, path or None
        commit = self._resolve(repo, revision)
        path = path.strip("/")
        if not self._is_dir(commit, path):
            raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        recursive, expand = _flag(req.query, "recursive"), _flag(req.query, "expand")
        prefix = f"{path}/" if path else ""
        children: set[str] = set()
        for file in commit.files:
            if not file.startswith(prefix):
                continue
            parts = file[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, depth + 1):
                children.add(prefix + "/".join(parts[:i]))
        dirs = sorted(c for c in children if c not in commit.files)
        files = sorted(c for c in children if c in commit.files)
        entries = dirs + files  # the Hub lists folders first
        start = int(req.query.get("cursor", ["0"])[-1])
        page = entries[start : start + self.tree_page_size]
        headers = {}
        if start + self.tree_page_size < len(entries):
            query = {"recursive": str(recursive).lower(), "expand": str(expand).lower()}
            query["cursor"] = str(start + self.tree_page_size)
            headers["Link"] = f'<{self.endpoint}{req.raw_path}?{urlencode(query)}>; rel="next"'
        return _json([self._entry(repo, commit, p, expand=expand) for p in page], headers=headers)

    def _paths_info(self, req: Request, repo: Repo, revision: str, body: bytes) -> _Response:
        req.revision = revision
        commit = self._resolve(repo, revision)
        if req.headers.get("content-type", "").startswith("application/json"):
            payload = json.loads(body or b"{}")
            paths, expand = list(payload.get("paths", [])), bool(payload.get("expand"))
        else:  # the client posts a form: paths=a&paths=b&expand=False
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _flag(form, "expand")
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files or (path and self._is_dir(commit, path)):
                entries.append(self._entry(repo, commit, path, expand=expand))
        return _json(entries)

    def _refs(self, req: Request, repo: Repo) -> _Response:
        branches, prs = [], []
        for name, oid in sorted(repo.branches.items()):
            if name.startswith("refs/pr/"):
                prs.append({"name": name, "ref": name, "targetCommit": oid})
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
        data: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if _flag(req.query, "include_prs"):
            data["pullRequests"] = prs
        return _json(data)

    def _branch(self, req: Request, repo: Repo, branch: str, body: bytes) -> _Response:
        req.revision = branch
        if req.method == "DELETE":
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if branch == "main":
                raise _HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _json({})
        if branch in repo.branches:
            raise _HubError(409, "Reference already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self._resolve(repo, start).oid
        return _json({})

    def _preupload(self, req: Request, repo: Repo, revision: str, body: bytes) -> _Response:
        req.revision = revision
        commit = self._resolve(repo, revision)
        answers = []
        for item in json.loads(body)["files"]:
            path, size = item["path"], int(item["size"])
            lfs = self._is_lfs(commit, path, size)
            answer: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            if path in commit.files:  # lets the client drop unchanged files from the commit
                data = commit.files[path]
                answer["oid"] = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            answers.append(answer)
        return _json({"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, req: Request, repo_id: str, body: bytes) -> _Response:
        req.route = "lfs-batch"
        repo = self._repo(req, repo_id, write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise _HubError(400, "FakeHub: only the LFS 'upload' operation is served")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", -1))
            if not SHA256_HEX.fullmatch(oid) or size < 0:
                error = {"code": 422, "message": "Invalid oid or size"}
                objects.append({"oid": oid, "size": size, "error": error})
            elif oid in repo.lfs_objects:  # already stored: no actions, the client skips it
                objects.append({"oid": oid, "size": size})
            else:
                signature = self._sign(repo_id, oid)
                upload = f"{self.endpoint}/__lfs/{repo_id}/{oid}?X-Signature={signature}"
                verify = f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {"upload": {"href": upload}, "verify": {"href": verify}},
                    }
                )
        data = json.dumps({"transfer": "basic", "objects": objects}).encode()
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, data

    def _sign(self, repo_id: str, oid: str) -> str:
        return hmac.new(self._secret, f"{repo_id}/{oid}".encode(), "sha256").hexdigest()[:32]

    def _lfs_put(self, req: Request, repo_id: str, oid: str, body: bytes) -> _Response:
        """The "pre-signed" upload URL: no token needed, the signature is the credential."""
        req.route, req.repo_id = "lfs-upload", repo_id
        signature = req.query.get("X-Signature", [""])[-1]
        if not hmac.compare_digest(signature, self._sign(repo_id, oid)):
            raise _HubError(403, "SignatureDoesNotMatch")
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "NoSuchBucket")
        digest = hashlib.sha256(body).hexdigest()
        if digest != oid:
            raise _HubError(400, f"sha256 of the body is {digest}, not {oid}")
        repo.lfs_objects[oid] = body
        self.lfs_uploads.append(LfsUpload(repo_id, oid, len(body)))
        return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""

    def _lfs_verify(self, req: Request, repo_id: str, body: bytes) -> _Response:
        req.route = "lfs-verify"
        repo = self._repo(req, repo_id, write=True)
        payload = json.loads(body)
        data = repo.lfs_objects.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            raise _HubError(404, "Object not found")
        return _json({"success": True})

    def _commit(self, req: Request, repo: Repo, revision: str, body: bytes) -> _Response:
        req.revision = revision
        if revision not in repo.branches:  # commits go to branches, never to a commit id
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not items or items[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit must be its header")
        header = items[0]["value"]
        head = repo.commits[repo.branches[revision]]
        parent_commit = header.get("parentCommit")
        if parent_commit and not head.oid.startswith(parent_commit):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files, lfs = dict(head.files), set(head.lfs)
        for item in items[1:]:
            key, value = item.get("key"), item.get("value", {})
            path = str(value.get("path", ""))
            if key in ("file", "lfsFile") and (
                not path or path.startswith("/") or ".." in path.split("/")
            ):
                raise _HubError(400, f"Invalid path: {path!r}")
            if key == "file":
                content = value.get("content", "")
                raw = (
                    base64.b64decode(content)
                    if value.get("encoding") == "base64"
                    else content.encode()
                )
                files[path] = raw
                lfs.discard(path)
            elif key == "lfsFile":
                data = repo.lfs_objects.get(value.get("oid", ""))
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise _HubError(
                        400,
                        "Your push was rejected because an LFS pointer pointed to a file that"
                        f" does not exist ({path})",
                    )
                files[path] = data
                lfs.add(path)
            elif key == "deletedFile":
                if path not in files:
                    raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound")
                del files[path]
                lfs.discard(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound")
                for p in doomed:
                    del files[p]
                    lfs.discard(p)
            else:
                raise _HubError(400, f"Unknown commit operation {key!r}")
        branch, pr_url = revision, None
        if _flag(req.query, "create_pr"):
            repo.pull_requests += 1
            branch = f"refs/pr/{repo.pull_requests}"
            repo.branches[branch] = head.oid
            pr_url = f"{self.endpoint}/{repo.repo_id}/discussions/{repo.pull_requests}"
        title = str(header.get("summary") or "Update")
        commit = self._add_commit(
            repo, branch, files, frozenset(lfs), title, str(header.get("description") or "")
        )
        data: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if pr_url is not None:
            data["pullRequestUrl"] = pr_url
        return _json(data)

    def _resolve_file(self, req: Request, repo_id: str, revision: str, path: str) -> _Response:
        req.route, req.revision, req.filename = "resolve", revision, path
        repo = self._repo(req, repo_id)
        commit = self._resolve(repo, revision)
        base = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            raise _HubError(404, "Entry not found", code="EntryNotFound", headers=base)
        data = commit.files[path]
        headers = {
            **base,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}";',
        }
        if path in commit.lfs:
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"'})
            headers["X-Linked-Size"] = str(len(data))
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        byte_range = req.headers.get("range")
        if byte_range is None or req.method == "HEAD":
            return 200, headers, data
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", byte_range)
        if match is None or match.groups() == ("", ""):
            raise _HubError(416, f"Unsupported range {byte_range!r}")
        first, last = match.groups()
        if first:
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        else:  # suffix range: the last N bytes
            start, end = max(len(data) - int(last), 0), len(data) - 1
        if start >= len(data) or start > end:
            headers = {**base, "Content-Range": f"bytes */{len(data)}"}
            raise _HubError(416, "Range Not Satisfiable", headers=headers)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return 206, headers, data[start : end + 1]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Reads the whole request, routes it under the hub's lock, records it, answers."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's httpx session expects

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr line; the hub's request log is the record."""

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.hub
        body = self._read_body()
        split = urlsplit(self.path)
        req = Request(
            method=self.command,
            path=unquote(split.path),
            raw_path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body_size=len(body),
        )
        with hub._lock:
            hub.requests.append(req)
            serial = len(hub.requests)
            try:
                status, headers, payload = hub._dispatch(req, split.path, body)
            except _HubError as e:
                headers = {"X-Error-Message": e.message, **e.headers}
                if e.code is not None:
                    headers["X-Error-Code"] = e.code
                status, headers, payload = _json({"error": e.message}, e.status, headers)
            except Exception:  # a bug in the fake: say so loudly, in the client's error text
                text = "FakeHub crashed:\n" + traceback.format_exc()
                status, headers, payload = 500, {"Content-Type": "text/plain"}, text.encode()
            req.status = status
        headers.setdefault("X-Request-Id", f"fake-{serial}")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


def hub_env(
    hub: FakeHub, tmp_path: Path | str, token: str | None = None, *, offline: bool = False
) -> dict[str, str]:
    """An environment for a subprocess that should talk to `hub` and nothing else.

    Inherited HF_* / HUGGINGFACE_* variables and TRANSFORMERS_OFFLINE are dropped (a
    developer's HF_TOKEN or HF_HUB_OFFLINE must not leak in); the cache lives under
    `tmp_path/hf-home`, so calls with the same tmp_path share it. Loopback bypasses proxies.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_ENV_PREFIXES) and k not in _ENV_DROP
    }
    home = Path(tmp_path) / "hf-home"
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_XET_CACHE=str(home / "xet"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_SYMLINKS_WARNING="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name, ""), "127.0.0.1", "localhost"]))
    return env


@contextlib.contextmanager
def patched_client(
    hub: FakeHub, tmp_path: Path | str, token: str | None = None, *, offline: bool = False
) -> Iterator[dict[str, str]]:
    """Point the already-imported huggingface_hub at `hub` for the block; yields hub_env's dict.

    Patches the import-time constants (see the module docstring) and the environment, then
    restores both. HfApi objects built inside the block pick up the fake endpoint.
    """
    import pytest
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    env = hub_env(hub, tmp_path, token, offline=offline)
    home = env["HF_HOME"]
    values: dict[str, Any] = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": home,
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(_ENV_PREFIXES) or name in _ENV_DROP:
                mp.delenv(name)
        for name, value in env.items():
            if name.startswith(_ENV_PREFIXES) or name.lower() == "no_proxy":
                mp.setenv(name, value)
        for name, value in values.items():
            if hasattr(constants, name):
                mp.setattr(constants, name, value)
        if hasattr(_http, "_HUB_ORIGINS"):
            mp.setattr(
                _http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(hub.endpoint)}
            )
        mp.setattr(hf_api.api, "endpoint", hub.endpoint)
        _http.close_session()  # a fresh httpx client, built under the patched environment
        try:
            yield env
        finally:
            _http.close_session()
