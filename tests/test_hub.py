"""Publishing to and loading from the Hub, through the real huggingface_hub client and the CLI,
against the fake Hub of tests/fake_hub.py (loopback only, no internet).

What the server received is the oracle: the files and card metadata of an upload, and for
every command which files were downloaded (each rank its own rank file, nothing else).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, hub_env
from helpers_cli import one_error_line, reshard_cmd
from helpers_files import flip_a_data_byte

TOKEN = "hf_reshardTestToken0123456789abcdef"
REPO = "me/tiny-ep2tp2"
RANKS = [f"rank-{r:05d}-of-00004.safetensors" for r in range(4)]


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as hub:
        hub.token = TOKEN
        yield hub


def reshard(hub: FakeHub, tmp: Path, *args: str, token: str | None = TOKEN, offline=False):
    # RESHARD_CACHE stays the session's (conftest): tiny:qwen3_moe is already there, so no
    # command trains it again.
    env = hub_env(hub, tmp, token=token, offline=offline)
    return subprocess.run(
        [*reshard_cmd(), *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


def load_rank(hub: FakeHub, tmp: Path, spec: str, rank: int) -> subprocess.CompletedProcess:
    """`load_local_tensors(spec, rank=rank)` in a fresh process talking to `hub`; prints the
    number of tensors it returned."""
    code = f"from reshard.runtime import load_local_tensors\nprint(len(load_local_tensors({spec!r}, rank={rank})))"
    return subprocess.run(
        [sys.executable, "-c", code], env=hub_env(hub, tmp, token=TOKEN),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def gets(hub: FakeHub, repo: str) -> list[str]:
    return sorted(hub.downloads(repo))


@pytest.fixture(scope="module")
def published(hub, convert_tiny, tmp_path_factory) -> Path:
    """tiny ep2tp2 uploaded to REPO; the tmp dir whose Hub cache the upload used."""
    tmp = tmp_path_factory.mktemp("publish")
    directory = Path(shutil.copytree(convert_tiny("ep2tp2"), tmp / "ckpt"))
    result = reshard(hub, tmp, "upload", directory, "--repo", REPO, "-q")
    assert result.returncode == 0, result.stderr
    return tmp


# --- upload --------------------------------------------------------------------------------------


def test_upload_sends_the_checkpoint_and_a_card_and_prints_the_commit(hub, published):
    files = hub.files(REPO)
    assert set(RANKS) <= set(files)
    for name in ("reshard.json", "config.json", "tokenizer.json", "README.md"):
        assert name in files, name
    local = published / "ckpt"
    for name in [*RANKS, "reshard.json", "config.json"]:
        assert files[name] == (local / name).read_bytes(), name
    card = files["README.md"].decode()
    meta = card.split("---")[1]
    assert "library_name: reshard" in meta
    for tag in ("reshard", "moe", "ep2tp2", "qwen3_moe"):
        assert f"- {tag}" in meta, tag
    assert f"reshard run hf:{REPO}" in card
    assert f'load_local_tensors("hf:{REPO}")' in card
    assert "| 3 | ep=1, tp=1 | 8-15 |" in card


def test_upload_prints_url_and_sha_and_a_second_upload_sends_no_weights_again(
    hub, published, convert_tiny
):
    before = hub.lfs_bytes_uploaded(REPO)
    result = reshard(hub, published, "upload", published / "ckpt", "--repo", REPO, "-q")
    assert result.returncode == 0, result.stderr
    head = hub.head(REPO)
    assert f"(commit {head})" in result.stdout and REPO in result.stdout
    assert hub.lfs_bytes_uploaded(REPO) == before  # resumable: what the Hub has is not resent


def test_upload_refuses_a_damaged_checkpoint_and_sends_nothing(hub, convert_tiny, tmp_path):
    directory = Path(shutil.copytree(convert_tiny("ep2tp2"), tmp_path / "ckpt"))
    flip_a_data_byte(directory / RANKS[2])
    hub.clear_requests()
    result = reshard(hub, tmp_path, "upload", directory, "--repo", "me/damaged")
    one_error_line(result.returncode, result.stderr, RANKS[2], "sha256")
    assert hub.requests == []


def test_upload_to_a_branch_and_private(hub, convert_tiny, tmp_path):
    directory = Path(shutil.copytree(convert_tiny("tp2"), tmp_path / "ckpt"))
    result = reshard(
        hub, tmp_path, "upload", directory, "--repo", "me/tp2", "--private",
        "--revision", "bf16", "--commit-message", "tp2 for tests", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert hub.repos["me/tp2"].private
    assert "rank-00001-of-00002.safetensors" in hub.files("me/tp2", "bf16")
    assert "rank-00001-of-00002.safetensors" not in hub.files("me/tp2", "main")


# --- loading -------------------------------------------------------------------------------------


def test_inspect_reads_only_the_manifest(hub, published, tmp_path):
    hub.clear_requests()
    result = reshard(hub, tmp_path, "inspect", f"hf:{REPO}")
    assert result.returncode == 0, result.stderr
    assert "layout ep2tp2" in result.stdout
    assert gets(hub, REPO) == ["reshard.json"]


def test_each_rank_downloads_only_its_own_file_and_a_second_run_nothing(hub, published, tmp_path):
    hub.clear_requests()
    result = reshard(hub, tmp_path, "run", f"hf:{REPO}", "--prompt", "Why", "--json",
                     "--max-new-tokens", "4", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout.splitlines()[-1])["output_ids"]) == 4
    weights = [f for f in hub.downloads(REPO) if f.endswith(".safetensors")]
    assert sorted(weights) == RANKS  # every rank file once: each by its own rank
    hub.clear_requests()
    again = reshard(hub, tmp_path, "run", f"hf:{REPO}", "--prompt", "Why", "--json",
                    "--max-new-tokens", "4", "--device", "cpu", offline=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert hub.requests == []  # offline from the cache: nothing fetched, nothing asked


def test_python_api_fetches_one_rank_file(hub, published, tmp_path):
    hub.clear_requests()
    result = load_rank(hub, tmp_path, f"hf:{REPO}", 2)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 25
    assert [f for f in hub.downloads(REPO) if f.endswith(".safetensors")] == [RANKS[2]]


def test_verify_from_the_hub_and_revisions_are_pinned(hub, published, tmp_path):
    result = reshard(hub, tmp_path, "verify", f"hf:{REPO}", "-q")
    assert result.returncode == 0, result.stderr
    old = hub.head(REPO)
    hub.commit(REPO, {"reshard.json": b"{}"})  # main moves on, to something broken
    pinned = reshard(hub, tmp_path, "inspect", f"hf:{REPO}@{old}")
    assert pinned.returncode == 0 and "layout ep2tp2" in pinned.stdout, pinned.stderr
    # after an inspect cached the manifest alone, a run still gets the tokenizer
    fresh = tmp_path / "fresh"
    assert reshard(hub, fresh, "inspect", f"hf:{REPO}@{old}").returncode == 0
    ran = reshard(hub, fresh, "run", f"hf:{REPO}@{old}", "--prompt", "Hi", "--max-new-tokens",
                  "2", "--device", "cpu")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    moved = reshard(hub, tmp_path, "inspect", f"hf:{REPO}")
    assert moved.returncode == 1 and "reshard.json" in moved.stderr
    hub.commit(REPO, {"reshard.json": hub.files(REPO, old)["reshard.json"]})


def test_reshard_from_the_hub_into_a_local_layout(hub, published, tmp_path, tiny_dir):
    out = tmp_path / "tp2"
    result = reshard(hub, tmp_path, "convert", "--src", f"hf:{REPO}", "--layout", "tp2",
                     "--out", out, "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    check = reshard(hub, tmp_path, "verify", out, "--against", tiny_dir, "-q")
    assert check.returncode == 0, check.stderr


def test_convert_from_a_hub_model_and_push_records_the_base_model(hub, tiny_dir, tmp_path):
    hub.create_repo("org/tiny")
    hub.commit("org/tiny", {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()})
    result = reshard(hub, tmp_path, "convert", "--src", "hf:org/tiny", "--layout", "ep2",
                     "--out", tmp_path / "out", "--push-to-hub", "me/tiny-ep2", "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads(hub.files("me/tiny-ep2")["reshard.json"])
    assert manifest["source"]["repo"] == "org/tiny"
    assert manifest["source"]["revision"] == hub.head("org/tiny")
    meta = hub.files("me/tiny-ep2")["README.md"].decode().split("---")[1]
    assert "base_model: org/tiny" in meta and "base_model_relation: quantized" in meta


# --- errors, and the token -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, args, what",
    [
        ("no such repo", ("inspect", "hf:me/absent"), "no such repository"),
        ("wrong token", ("inspect", f"hf:{REPO}"), "authentication failed"),
        ("no revision", ("inspect", f"hf:{REPO}@nope"), "no such revision"),
    ],
)
def test_hub_errors_are_one_line(hub, published, tmp_path, case, args, what):
    token = "hf_wrong" if case == "wrong token" else TOKEN
    result = reshard(hub, tmp_path, *args, token=token)
    one_error_line(result.returncode, result.stderr, what)


def test_server_errors_and_no_connection_are_one_line(hub, published, tmp_path):
    # (creating a repo is not retried; downloads retry 5xx for 23 s before giving up)
    hub.fail_next(r"/api/repos/create", 500, times=1)
    upload = reshard(hub, tmp_path, "upload", published / "ckpt", "--repo", "me/other", "-q")
    one_error_line(upload.returncode, upload.stderr, "answered 500", "try again")
    hub.fail_next(r"/commit/", 403, times=1)
    upload = reshard(hub, tmp_path, "upload", published / "ckpt", "--repo", "me/other", "-q")
    one_error_line(upload.returncode, upload.stderr, "write access")
    with FakeHub() as gone:
        env_hub = gone  # closed: its port refuses connections
    result = reshard(env_hub, tmp_path, "upload", published / "ckpt", "--repo", "me/x", "-q")
    one_error_line(result.returncode, result.stderr, "cannot reach")


def test_the_token_is_never_printed_or_written(hub, published, tmp_path):
    outputs = []
    for args in (("inspect", f"hf:{REPO}"), ("verify", f"hf:{REPO}"), ("inspect", "hf:me/x")):
        result = reshard(hub, tmp_path, *args)
        outputs += [result.stdout, result.stderr]
    assert not [o for o in outputs if TOKEN in o]
    for root in (tmp_path, published):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_repo_ids_are_checked_before_anything_is_sent(hub, convert_tiny, tmp_path):
    hub.clear_requests()
    result = reshard(hub, tmp_path, "upload", convert_tiny("tp2"), "--repo", "not a repo")
    one_error_line(result.returncode, result.stderr, "not a Hub repository id")
    assert hub.requests == []
    assert re.search(r"hf:org/name", result.stderr)


def test_a_rank_in_parts_downloads_exactly_its_parts(hub, tmp_path):
    out = tmp_path / "parted"
    made = reshard(hub, tmp_path, "convert", "--src", "tiny:qwen3_moe", "--layout", "ep2",
                   "--out", out, "--max-file-size", "300KB", "-q")  # fmt: skip
    assert made.returncode == 0, made.stderr
    mine = sorted(p.name for p in out.glob("rank-00001-of-00002-part-*.safetensors"))
    assert len(mine) >= 2
    assert reshard(hub, tmp_path, "upload", out, "--repo", "me/parted", "-q").returncode == 0
    assert set(mine) <= set(hub.files("me/parted"))
    hub.clear_requests()
    result = load_rank(hub, tmp_path / "c", "hf:me/parted", 1)
    assert result.returncode == 0, result.stderr
    assert sorted(f for f in hub.downloads("me/parted") if f.endswith(".safetensors")) == mine


def test_many_files_go_up_in_commits_of_under_100_and_the_manifest_last(hub, tmp_path):
    out = tmp_path / "many"
    made = reshard(hub, tmp_path, "convert", "--src", "tiny:qwen3_moe", "--layout", "ep4tp4",
                   "--out", out, "--max-file-size", "40KB", "-q")  # fmt: skip
    assert made.returncode == 0, made.stderr
    weights = sorted(p.name for p in out.glob("rank-*.safetensors"))
    assert len(weights) > 50
    assert reshard(hub, tmp_path, "upload", out, "--repo", "me/many", "-q").returncode == 0
    repo = hub.repos["me/many"]
    chain, oid = [], repo.branches["main"]
    while oid is not None:
        chain.append(repo.commits[oid])
        oid = repo.commits[oid].parent
    chain.reverse()  # oldest first: .gitattributes, rank batches, then the manifest
    added = [set(c.files) - set(p.files) for p, c in zip(chain, chain[1:])]
    assert all(len(a) < 100 for a in added)
    assert "reshard.json" in added[-1] and not any("reshard.json" in a for a in added[:-1])
    assert set(weights) <= set().union(*added[:-1])


def test_a_rank_file_missing_from_the_repo_is_one_line(hub, published, tmp_path):
    hub.create_repo("me/holey")
    files = hub.files(REPO)
    hub.commit("me/holey", {k: v for k, v in files.items() if k != RANKS[3]})
    result = reshard(hub, tmp_path, "verify", "hf:me/holey", "-q")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("FAIL ") and RANKS[3] in line and "no such file" in line, line
    api = load_rank(hub, tmp_path / "c", "hf:me/holey", 3)
    assert api.returncode != 0 and f"{RANKS[3]}: the repository has no such file" in api.stderr


class _Endpoint:
    """What patched_client needs of a FakeHub, picklable for another process."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint


def _agree(rank: int, world: int, endpoint: str, tmp: str) -> str:
    from fake_hub import patched_client

    from reshard.hub import agree_on_revision

    with patched_client(_Endpoint(endpoint), Path(tmp) / f"rank{rank}", TOKEN):
        return agree_on_revision(f"hf:{REPO}")


def test_ranks_take_rank_0s_commit_and_only_rank_0_resolves(hub, published, tmp_path):
    from helpers_dist import run_on_ranks

    hub.clear_requests()
    pinned = run_on_ranks(_agree, 2, hub.endpoint, str(tmp_path), timeout_s=120)
    assert pinned == [f"hf:{REPO}@{hub.head(REPO)}"] * 2
    asked = [r for r in hub.requests if r.method == "HEAD" and "/resolve/main/" in r.path]
    assert len(asked) == 1, asked  # one resolution of `main`, rank 0's: rank 1 took its sha


def test_a_hub_source_downloads_only_top_level_weights_and_side_files(hub, tiny_dir, tmp_path):
    hub.create_repo("org/with-original")
    files = {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}
    files["original/consolidated.00.safetensors"] = b"another format's copy" * 1000
    files["original/params.json"] = b"{}"
    hub.commit("org/with-original", files)
    hub.clear_requests()
    result = reshard(hub, tmp_path, "plan", "--src", "hf:org/with-original", "--layout", "ep2")
    assert result.returncode == 0, result.stderr
    fetched = hub.downloads("org/with-original")
    assert fetched and not [f for f in fetched if f.startswith("original/")], fetched
    assert {p.name for p in tiny_dir.glob("*.safetensors")} <= set(fetched)
