"""Drive the real ``huggingface_hub`` client against :class:`FakeHub`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_session,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

try:
    from hub_server import FakeHub, git_blob_oid
except ImportError:  # tests/ collected as a package
    from tests.hub_server import FakeHub, git_blob_oid

ALICE, BOB = "hf_alice_token", "hf_bob_token"
REPO = "alice/model"


@pytest.fixture(autouse=True)
def _isolated_client(isolated_hf_client) -> None:
    """Keep the client away from the user's token, cache and huggingface.co (see conftest.py)."""


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(tokens={ALICE: "alice", BOB: "bob"}) as server:
        yield server


@pytest.fixture
def api(hub: FakeHub) -> HfApi:
    return HfApi(endpoint=hub.url, token=ALICE)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def download(
    hub: FakeHub, cache: Path, filename: str, repo_id: str = REPO, token: str | bool = ALICE, **kwargs: Any
) -> bytes:
    """``hf_hub_download`` into ``cache`` and return the file's bytes."""
    path = hf_hub_download(repo_id, filename, endpoint=hub.url, token=token, cache_dir=cache, **kwargs)
    return Path(path).read_bytes()


def upload(api: HfApi, files: dict[str, bytes], repo_id: str = REPO, **kwargs: Any) -> str:
    """One commit adding ``files``; returns the commit id."""
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in files.items()]
    return api.create_commit(repo_id, operations=ops, commit_message="upload", **kwargs).oid


# ---------------------------------------------------------------------------- accounts & repos


def test_whoami(hub: FakeHub, api: HfApi) -> None:
    assert api.whoami()["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url).whoami(token="hf_wrong")
    assert err.value.response.status_code == 401


def test_create_repo_public_private_and_exist_ok(hub: FakeHub, api: HfApi) -> None:
    url = api.create_repo(REPO)
    assert (url.repo_id, url.repo_type, str(url)) == (REPO, "model", f"{hub.url}/{REPO}")
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409

    api.create_repo("alice/secret", private=True)
    assert api.model_info("alice/secret").private is True
    assert api.model_info(REPO).private is False
    # New repos hold an initial commit with a .gitattributes file, like on the Hub.
    assert api.list_repo_files(REPO) == [".gitattributes"]

    dataset = api.create_repo("alice/data", repo_type="dataset")
    assert dataset.repo_type == "dataset"
    assert api.dataset_info("alice/data").id == "alice/data"
    assert not api.repo_exists("alice/data")  # a dataset is not a model


def test_delete_repo(api: HfApi) -> None:
    api.create_repo(REPO)
    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)
    api.delete_repo(REPO, missing_ok=True)


def test_private_repo_is_hidden(hub: FakeHub, api: HfApi, cache: Path) -> None:
    api.create_repo(REPO, private=True)
    upload(api, {"w.bin": b"weights"})
    assert download(hub, cache, "w.bin") == b"weights"

    for token in (False, BOB):  # anonymous (401) and another user (404) see "not found"
        other = HfApi(endpoint=hub.url, token=token)
        with pytest.raises(RepositoryNotFoundError):
            other.model_info(REPO)
        assert not other.repo_exists(REPO)
        with pytest.raises(RepositoryNotFoundError):
            download(hub, cache / "other", "w.bin", token=token)
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(REPO, endpoint=hub.url, token=token, cache_dir=cache / "other")


def test_wrong_token_is_not_repo_not_found(hub: FakeHub, api: HfApi, cache: Path) -> None:
    api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as err:
        download(hub, cache, ".gitattributes", token="hf_wrong")
    assert not isinstance(err.value, RepositoryNotFoundError)
    assert err.value.response.status_code == 401


def test_write_into_other_namespace_is_forbidden(hub: FakeHub, api: HfApi) -> None:
    api.create_repo(REPO)
    bob = HfApi(endpoint=hub.url, token=BOB)
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo("alice/other")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert err.value.response.status_code == 403


# ---------------------------------------------------------------------------- uploads & downloads


@pytest.mark.parametrize("disable_xet", [False, True], ids=["pipelined", "legacy"])
def test_upload_folder(
    hub: FakeHub, api: HfApi, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disable_xet: bool
) -> None:
    """upload_folder takes a different code path whether hf_xet is importable or not."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", disable_xet)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    api.create_repo(REPO)
    commit = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="add folder")
    assert commit.oid == hub.branch_head(REPO)
    assert api.list_repo_files(REPO) == [".gitattributes", "config.json", "sub/weights.bin"]
    assert download(hub, cache, "weights.bin", subfolder="sub") == bytes(range(256)) * 40
    assert hub.unhandled == []  # in particular, no xet-write-token / LFS endpoint was needed


def test_download_by_branch_tag_and_commit(hub: FakeHub, api: HfApi, cache: Path) -> None:
    api.create_repo(REPO)
    first = upload(api, {"model.bin": b"v1", "notes/readme.txt": b"hello"})
    api.create_tag(REPO, tag="v1.0")
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="model.bin", repo_id=REPO).oid
    assert first != second

    assert download(hub, cache, "model.bin") == b"v2"
    assert download(hub, cache, "model.bin", revision="v1.0") == b"v1"
    assert download(hub, cache, "model.bin", revision=first) == b"v1"
    assert download(hub, cache, "model.bin", revision=second) == b"v2"
    assert download(hub, cache, "readme.txt", subfolder="notes", revision="v1.0") == b"hello"
    # The cache records the commit each ref pointed to.
    refs = cache / "models--alice--model" / "refs"
    assert (refs / "main").read_text() == second
    assert (refs / "v1.0").read_text() == first


def test_branches_and_refs(hub: FakeHub, api: HfApi, cache: Path) -> None:
    api.create_repo(REPO)
    base = upload(api, {"a.txt": b"main"})
    api.create_branch(REPO, branch="feature/x")  # '/' in a branch name is URL-encoded by the client
    api.create_branch(REPO, branch="feature/x", exist_ok=True)
    dev = upload(api, {"a.txt": b"dev"}, revision="feature/x")

    assert download(hub, cache, "a.txt", revision="feature/x") == b"dev"
    assert download(hub, cache, "a.txt") == b"main"
    refs = api.list_repo_refs(REPO)
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", base), ("feature/x", dev)}
    api.create_tag(REPO, tag="release", revision="feature/x")
    assert [(t.name, t.ref, t.target_commit) for t in api.list_repo_refs(REPO).tags] == [
        ("release", "refs/tags/release", dev)
    ]
    api.delete_branch(REPO, branch="feature/x")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main"]


def test_create_commit_with_deletions(hub: FakeHub, api: HfApi) -> None:
    api.create_repo(REPO)
    upload(api, {"keep.txt": b"k", "old.txt": b"o", "ckpt/1.bin": b"1", "ckpt/2.bin": b"2"})
    ops = [
        CommitOperationDelete(path_in_repo="old.txt"),
        CommitOperationDelete(path_in_repo="ckpt/"),
        CommitOperationAdd(path_in_repo="new.txt", path_or_fileobj=b"n"),
    ]
    api.create_commit(REPO, operations=ops, commit_message="cleanup")
    assert api.list_repo_files(REPO) == [".gitattributes", "keep.txt", "new.txt"]
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("missing.txt", repo_id=REPO)


def test_unchanged_upload_makes_no_commit(hub: FakeHub, api: HfApi) -> None:
    api.create_repo(REPO)
    head = upload(api, {"a.txt": b"same"})
    assert upload(api, {"a.txt": b"same"}) == head == hub.branch_head(REPO)


def test_commit_preconditions(hub: FakeHub, api: HfApi) -> None:
    api.create_repo(REPO)
    first = upload(api, {"a.txt": b"1"})
    upload(api, {"a.txt": b"2"})
    with pytest.raises(HfHubHTTPError) as err:  # stale parent
        upload(api, {"a.txt": b"3"}, parent_commit=first)
    assert err.value.response.status_code == 412
    with pytest.raises(RevisionNotFoundError):
        upload(api, {"a.txt": b"3"}, revision="no-such-branch")
    api.create_tag(REPO, tag="v1")
    with pytest.raises(HfHubHTTPError) as err:  # tags are not branches
        upload(api, {"a.txt": b"3"}, revision="v1")
    assert err.value.response.status_code == 400


def test_snapshot_download_allow_patterns(hub: FakeHub, api: HfApi, cache: Path) -> None:
    api.create_repo(REPO)
    upload(api, {"config.json": b"{}", "model.safetensors": b"w", "logs/run.txt": b"log"})
    patterns = ["*.json", "*.safetensors"]
    folder = Path(snapshot_download(REPO, endpoint=hub.url, token=ALICE, cache_dir=cache, allow_patterns=patterns))
    assert folder.name == hub.branch_head(REPO)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "config.json",
        "model.safetensors",
    ]


# ---------------------------------------------------------------------------- listing & info


def test_model_info_tree_and_commits(hub: FakeHub, api: HfApi) -> None:
    api.create_repo(REPO)
    first = upload(api, {"a.txt": b"abc", "sub/deep/b.bin": b"bb"})
    api.create_tag(REPO, tag="v1")
    second = upload(api, {"c.txt": b"c"})

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == second and info.author == "alice"
    assert {s.rfilename: (s.size, s.blob_id) for s in info.siblings}["a.txt"] == (3, git_blob_oid(b"abc"))
    assert api.model_info(REPO, revision="v1").sha == first
    assert "c.txt" not in api.list_repo_files(REPO, revision=first)

    root = {e.path: type(e) for e in api.list_repo_tree(REPO)}
    assert root == {".gitattributes": RepoFile, "a.txt": RepoFile, "c.txt": RepoFile, "sub": RepoFolder}
    sub = [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub", recursive=True)]
    assert sub == ["sub/deep", "sub/deep/b.bin"]
    (entry,) = api.get_paths_info(REPO, ["a.txt"], expand=True)
    assert entry.last_commit.oid == first

    commits = api.list_repo_commits(REPO)
    assert [c.commit_id for c in commits][:2] == [second, first]
    assert commits[-1].title == "initial commit"


def test_error_classes(hub: FakeHub, api: HfApi, cache: Path) -> None:
    api.create_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, cache, "a.txt", repo_id="alice/missing")
    with pytest.raises(RepositoryNotFoundError):  # FakeHub repos are always namespaced
        download(hub, cache, "config.json", repo_id="gpt2")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("gpt2", revision="main")
    with pytest.raises(RemoteEntryNotFoundError) as err:
        download(hub, cache, "missing.txt")
    assert isinstance(err.value, EntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        download(hub, cache, ".gitattributes", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    assert api.file_exists(REPO, ".gitattributes") and not api.file_exists(REPO, "missing.txt")
    assert not api.revision_exists(REPO, "nope")


# ---------------------------------------------------------------------------- cache & offline


def test_offline_cache_hit(hub: FakeHub, api: HfApi, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api.create_repo(REPO)
    upload(api, {"w.bin": b"cached"})
    kwargs = dict(endpoint=hub.url, token=ALICE, cache_dir=cache)
    online_path = hf_hub_download(REPO, "w.bin", **kwargs)
    n_requests = len(hub.requests)

    # Per call: local_files_only=True makes no HTTP request at all.
    assert hf_hub_download(REPO, "w.bin", local_files_only=True, **kwargs) == online_path
    # Process-wide: HF_HUB_OFFLINE is a module constant read at import time, so setting the env
    # var in a running process is too late; patch `constants.HF_HUB_OFFLINE` instead.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hf_hub_download(REPO, "w.bin", **kwargs) == online_path
    assert Path(snapshot_download(REPO, **kwargs)) == Path(online_path).parent
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "never-downloaded.bin", **kwargs)
    assert len(hub.requests) == n_requests
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    hub.stop()  # connection refused => the client silently falls back to its cache
    assert hf_hub_download(REPO, "w.bin", **kwargs) == online_path
    # (Not asserted here: an *uncached* file with the Hub unreachable only raises
    # LocalEntryNotFoundError after ~23 s of retries with backoff, 1+2+4+8+8 s.)


# ---------------------------------------------------------------------------- server features


def test_request_log_and_token_only_in_header(hub: FakeHub, api: HfApi, cache: Path) -> None:
    api.create_repo(REPO)
    upload(api, {"a.txt": b"a"})
    download(hub, cache, "a.txt")
    assert hub.requests and all(r.has_auth for r in hub.requests)
    assert not any(ALICE in r.path for r in hub.requests)
    assert hub.unhandled == []


def test_unknown_endpoint_is_a_plain_404(hub: FakeHub, api: HfApi) -> None:
    api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as err:
        list(api.list_repo_likers(REPO))
    assert err.value.response.status_code == 404
    assert hub.unhandled == [f"GET /api/models/{REPO}/likers"]


def test_default_endpoint_can_be_patched(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For code that takes no ``endpoint=``: HF_ENDPOINT is read at import, so patch the constants."""
    hub.add_repo(REPO, {"sub/a.txt": b"a"})
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    assert HfApi(token=False).list_repo_files(REPO) == [".gitattributes", "sub/a.txt"]
    path = hf_hub_download(REPO, "a.txt", subfolder="sub", token=False, local_dir=tmp_path / "local")
    assert Path(path) == tmp_path / "local" / "sub" / "a.txt" and Path(path).read_bytes() == b"a"


def test_range_requests(hub: FakeHub) -> None:
    """Ranges are what the client sends to resume an interrupted download."""
    hub.add_repo(REPO, {"a.bin": b"0123456789"})
    url = f"{hub.url}/{REPO}/resolve/main/a.bin"
    response = get_session().get(url, headers={"Range": "bytes=4-"})
    assert (response.status_code, response.content) == (206, b"456789")
    assert response.headers["Content-Range"] == "bytes 4-9/10"
    assert get_session().get(url, headers={"Range": "bytes=0-1"}).content == b"01"


def test_redirecting_resolve(tmp_path: Path) -> None:
    with FakeHub(tokens={ALICE: "alice"}, redirect_resolve=True) as hub:
        sha = hub.add_repo(REPO, {"a.txt": b"seeded"})
        assert download(hub, tmp_path, "a.txt") == b"seeded"
        resolve_calls = [(r.method, r.path) for r in hub.requests if "/resolve/" in r.path]
        assert resolve_calls == [
            ("HEAD", f"/{REPO}/resolve/main/a.txt"),  # answered 307 -> followed by the client
            ("HEAD", f"/{REPO}/resolve/{sha}/a.txt"),
            ("GET", f"/{REPO}/resolve/{sha}/a.txt"),
        ]
