"""A small in-process fake of the Hugging Face Hub HTTP API, for tests.

The real ``huggingface_hub`` client can be pointed at it (``HfApi(endpoint=hub.url)``,
``hf_hub_download(..., endpoint=hub.url)`` or ``HF_ENDPOINT``) and will upload, list and
download files as it would against huggingface.co, without network access::

    with FakeHub(tokens={"hf_alice": "alice"}) as hub:
        api = HfApi(endpoint=hub.url, token="hf_alice")
        api.create_repo("alice/model")
        api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="alice/model")
        hf_hub_download("alice/model", "a.txt", endpoint=hub.url, token="hf_alice", cache_dir=tmp)

Storage is in memory and git-like: content-addressed blobs (git blob sha1), commits with
parents (40-hex ids computed from their content), branches (default ``main``) and tags.
Every new repo starts with an "initial commit" holding a ``.gitattributes`` file, as on the
real Hub. Uploads are always answered with upload mode ``"regular"`` (base64 content inside
the commit payload), so the client never needs the LFS or Xet protocols.

Errors mimic the Hub's ``X-Error-Code`` headers so that the client raises the same
exception classes (``RepositoryNotFoundError``, ``RevisionNotFoundError``,
``RemoteEntryNotFoundError``, ``HfHubHTTPError``...). Unsupported endpoints answer a plain
404 (no error code), are logged and recorded in :attr:`FakeHub.unhandled`.

Endpoints (``{type}`` is ``models``, ``datasets`` or ``spaces``; ``{rev}`` is a branch, a tag,
``refs/heads|tags/<name>`` or a full commit id, URL-encoded as the client does)::

    GET    /api/whoami-v2
    POST   /api/repos/create                    DELETE /api/repos/delete
    POST   /api/validate-yaml                   GET    /api/agent-harnesses
    GET    /api/{type}/{repo}[/revision/{rev}]  GET    /api/{type}/{repo}/tree/{rev}[/{path}]
    POST   /api/{type}/{repo}/paths-info/{rev}  GET    /api/{type}/{repo}/refs
    GET    /api/{type}/{repo}/commits/{rev}     POST   /api/{type}/{repo}/preupload/{rev}
    POST   /api/{type}/{repo}/commit/{rev}      POST|DELETE /api/{type}/{repo}/branch/{branch}
    POST   /api/{type}/{repo}/tag/{rev}         DELETE /api/{type}/{repo}/tag/{tag}
    GET|HEAD /[datasets/|spaces/]{repo}/resolve/{rev}/{path}
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
#: URL plural -> repo type, as used in ``/api/{plural}/...`` routes.
REPO_TYPES: dict[str, str] = {"models": "model", "datasets": "dataset", "spaces": "space"}
#: Repo type -> prefix of web / ``resolve`` URLs.
URL_PREFIXES: dict[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}
#: Content of the ``.gitattributes`` file of the initial commit of every new repo.
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # exact Hub wording
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    """Git blob id of ``data`` (``git hash-object``), as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(moment: datetime) -> str:
    """Format a datetime the way the Hub does (``2024-01-31T12:00:00.000Z``)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class LoggedRequest(NamedTuple):
    """One request received by the server (``path`` includes the query string)."""

    method: str
    path: str
    has_auth: bool


class HubError(Exception):
    """An HTTP error answered the way the Hub does (JSON body + ``X-Error-*`` headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # additional fields of the JSON error body


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot of a repo: ``files`` maps each path to a blob id."""

    oid: str
    parent: str | None
    files: Mapping[str, str]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class Repo:
    """A repository: its commits, branches and tags."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> Commit | None:
        """Commit pointed to by a branch, a tag, ``refs/heads|tags/<name>`` or a full commit id."""
        if revision.startswith("refs/heads/"):
            oid = self.branches.get(revision[len("refs/heads/") :])
        elif revision.startswith("refs/tags/"):
            oid = self.tags.get(revision[len("refs/tags/") :])
        elif revision in self.branches:
            oid = self.branches[revision]
        elif revision in self.tags:
            oid = self.tags[revision]
        else:
            oid = revision if _COMMIT_SHA.match(revision) else None
        return self.commits.get(oid) if oid is not None else None

    def history(self, start: Commit) -> list[Commit]:
        """``start`` and its ancestors, newest first."""
        chain = [start]
        while chain[-1].parent is not None:
            chain.append(self.commits[chain[-1].parent])
        return chain


class FakeHub:
    """Hub-compatible HTTP server on ``127.0.0.1`` with in-memory repositories.

    Args:
        tokens: maps a bearer token to a user name, e.g. ``{"hf_alice": "alice"}``.
        redirect_resolve: if true, ``/resolve/<branch or tag>/...`` answers a 307 redirect to the
            same file at the resolved commit id (the client must follow it), instead of a 200.

    Attributes:
        tokens: the token -> user mapping (may be mutated while running).
        requests: every request received, as :class:`LoggedRequest`.
        unhandled: ``"METHOD /path"`` of requests that hit no implemented endpoint.
    """

    def __init__(self, tokens: Mapping[str, str] | None = None, *, redirect_resolve: bool = False) -> None:
        self.tokens: dict[str, str] = dict(tokens or {})
        self.redirect_resolve = redirect_resolve
        self.requests: list[LoggedRequest] = []
        self.unhandled: list[str] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: fault injection: called with (method, path) before a request is handled; returning "stall" keeps the
        #: connection open without answering (until stop()), "drop" closes it without an answer
        self.fault: Callable[[str, str], str | None] | None = None
        #: hostile-server injection: called with (method, path, real etag) for each ``resolve`` answer; a string it
        #: returns is sent as the ETag instead (e.g. ``"../../../outside"``)
        self.etag: Callable[[str, str, str], str | None] | None = None
        self._stalled = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL to pass as ``endpoint=`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("FakeHub is not running; call start() first.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        """Bind a free port on 127.0.0.1 and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeHub is already running.")
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port; stored repos are kept (``start()`` again to reuse)."""
        if self._server is None:
            return
        self._stalled.set()  # release stalled requests
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ direct (server-side) helpers

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        *,
        private: bool = False,
        repo_type: str = "model",
    ) -> str:
        """Create a repo without going through HTTP (test seeding); return the ``main`` head id."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} {repo_id} already exists")
            repo = self._create_repo(repo_type, repo_id, private)
            if files:
                self._commit(repo, DEFAULT_BRANCH, dict(files), set(), "Add files", "", repo.owner)
            return repo.branches[DEFAULT_BRANCH]

    def branch_head(self, repo_id: str, branch: str = DEFAULT_BRANCH, repo_type: str = "model") -> str:
        """Commit id at the tip of ``branch``."""
        with self._lock:
            return self._repos[(repo_type, repo_id)].branches[branch]

    def clear_log(self) -> None:
        """Forget recorded requests."""
        self.requests.clear()
        self.unhandled.clear()

    # ------------------------------------------------------------------ storage

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private, created_at=datetime.now(timezone.utc))
        self._repos[(repo_type, repo_id)] = repo
        self._commit(repo, DEFAULT_BRANCH, {".gitattributes": GITATTRIBUTES}, set(), "initial commit", "", repo.owner)
        return repo

    def _commit(
        self,
        repo: Repo,
        branch: str,
        additions: Mapping[str, bytes],
        deletions: set[str],
        title: str,
        message: str,
        author: str,
    ) -> Commit:
        """Apply deletions then additions on top of ``branch`` and advance it."""
        parent = repo.commits.get(repo.branches.get(branch, ""))
        files = dict(parent.files) if parent else {}
        for path in deletions:
            del files[path]
        for path, data in additions.items():
            oid = git_blob_oid(data)
            self._blobs[oid] = data
            files[path] = oid
        date = datetime.now(timezone.utc)
        tree = "".join(f"{path}\0{oid}\n" for path, oid in sorted(files.items()))
        body = (
            f"tree {hashlib.sha1(tree.encode()).hexdigest()}\nparent {parent.oid if parent else ''}\n"
            f"author {author} {date.timestamp()}\n\n{title}\n\n{message}"
        ).encode()
        oid = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
        commit = Commit(oid, parent.oid if parent else None, files, title, message, author, date)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit


def _folder_oid(files: Mapping[str, str], folder: str) -> str:
    """Deterministic id of a folder, derived from the files below it."""
    prefix = folder + "/"
    listing = "".join(f"{p}\0{o}\n" for p, o in sorted(files.items()) if p.startswith(prefix))
    return hashlib.sha1(listing.encode()).hexdigest()


def _is_folder(files: Mapping[str, str], path: str) -> bool:
    return path == "" or any(p.startswith(path + "/") for p in files)


class _HubHandler(BaseHTTPRequestHandler):
    """Request handler; ``hub`` is bound to the owning :class:`FakeHub` by ``FakeHub.start``."""

    hub: FakeHub
    server_version = "FakeHub/1.0"
    # Kept at HTTP/1.0: one request per connection, so no pooled keep-alive connection of the
    # client outlives stop() (a stopped hub must really look unreachable).
    protocol_version = "HTTP/1.0"

    # ------------------------------------------------------------------ plumbing

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature from base class)
        logger.debug("FakeHub: " + format, *args)

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host', '%s:%d' % self.server.server_address[:2])}"

    def _dispatch(self) -> None:
        self.hub.requests.append(LoggedRequest(self.command, self.path, "Authorization" in self.headers))
        self.body = self._read_body()
        action = self.hub.fault(self.command, self.path) if self.hub.fault is not None else None
        if action == "stall":
            self.hub._stalled.wait(120)
            self.close_connection = True
            return
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        # Split before decoding: revisions like "refs%2Fpr%2F1" are a single segment.
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            with self.hub._lock:
                self._route(segments)
        except HubError as err:
            self._send_error(err)
        except ConnectionError:  # client went away mid-response
            pass
        except Exception as exc:  # a bug in FakeHub: make it loud, and visible client-side
            logger.exception("FakeHub crashed on %s %s", self.command, self.path)
            self._send_error(HubError(500, f"FakeHub internal error: {exc!r}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed request bodies
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # optional trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json; charset=utf-8")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        # Header values must be latin-1; escape anything else (e.g. non-ASCII file names).
        headers = {"X-Error-Message": err.message.encode("ascii", "backslashreplace").decode(), **err.headers}
        if err.code is not None:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message, **err.extra}, err.status, headers)

    def _unhandled(self) -> None:
        entry = f"{self.command} {urlsplit(self.path).path}"
        logger.warning("FakeHub: unsupported endpoint %s", entry)
        self.hub.unhandled.append(entry)
        raise HubError(404, f"FakeHub does not implement {entry}")

    def _json_body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data

    # ------------------------------------------------------------------ routing

    def _route(self, seg: list[str]) -> None:
        method = self.command
        if seg[:1] == ["api"]:
            api = seg[1:]
            if api == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if api == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if api == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if api == ["validate-yaml"] and method == "POST":
                return self._send_json({"errors": [], "warnings": []})
            if api == ["agent-harnesses"] and method == "GET":  # fetched by the client for its user-agent
                return self._send_json({"standardEnvVars": [], "harnesses": {}})
            if len(api) >= 2 and api[0] in REPO_TYPES:
                repo_type, repo_id = REPO_TYPES[api[0]], "/".join(api[1:3])
                self._readable_repo(repo_type, repo_id)  # unknown repos (e.g. "gpt2") -> RepoNotFound
                return self._route_repo_api(repo_type, repo_id, api[3:])
        else:
            repo_type = "model"
            if seg[:1] in (["datasets"], ["spaces"]):
                repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
            if len(seg) >= 4 and seg[1] == "resolve":  # only namespaced repos exist here
                self._readable_repo(repo_type, seg[0])
            if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        self._unhandled()

    def _route_repo_api(self, repo_type: str, repo_id: str, rest: list[str]) -> None:
        method, action, arg = self.command, rest[0] if rest else "", "/".join(rest[1:])
        if method == "GET" and not rest:
            return self._repo_info(repo_type, repo_id, DEFAULT_BRANCH)
        if method == "GET" and action == "revision" and arg:
            return self._repo_info(repo_type, repo_id, arg)
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]).strip("/"))
        if method == "POST" and action == "paths-info" and arg:
            return self._paths_info(repo_type, repo_id, arg)
        if method == "GET" and rest == ["refs"]:
            return self._refs(repo_type, repo_id)
        if method == "GET" and action == "commits" and arg:
            return self._commits(repo_type, repo_id, arg)
        if method == "POST" and action == "preupload" and arg:
            return self._preupload(repo_type, repo_id, arg)
        if method == "POST" and action == "commit" and arg:
            return self._create_commit(repo_type, repo_id, arg)
        if method in ("POST", "DELETE") and action == "branch" and arg:
            return self._branch(repo_type, repo_id, arg)
        if method in ("POST", "DELETE") and action == "tag" and arg:
            return self._tag(repo_type, repo_id, arg)
        self._unhandled()

    # ------------------------------------------------------------------ auth

    def _user(self) -> str | None:
        """User of the bearer token; ``None`` when anonymous; 401 on an unknown token."""
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, INVALID_TOKEN_MESSAGE)
        return user

    def _readable_repo(self, repo_type: str, repo_id: str) -> tuple[Repo, str | None]:
        """The repo if the caller may see it. Missing and hidden repos look the same, as on the Hub."""
        user = self._user()
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo, user

    def _writable_repo(self, repo_type: str, repo_id: str) -> tuple[Repo, str]:
        repo, user = self._readable_repo(repo_type, repo_id)
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo, user

    @staticmethod
    def _resolve_or_404(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    @staticmethod
    def _branch_or_404(repo: Repo, revision: str) -> str:
        """Name of the branch designated by ``revision`` (commits can only go to branches)."""
        branch = revision.removeprefix("refs/heads/")
        if branch in repo.branches:
            return branch
        if repo.resolve(revision) is not None:
            raise HubError(400, f"Revision {revision} is not a branch; commits can only be pushed to a branch")
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ------------------------------------------------------------------ account & repos

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Authorization header is required")
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.base_url}/{URL_PREFIXES[repo_type]}{repo_id}"

    def _create_repo(self) -> None:
        user = self._user()
        body = self._json_body()
        name, namespace = body.get("name"), body.get("organization") or user
        repo_type = body.get("type") or "model"
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo name or type: {name!r} ({repo_type!r})")
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        repo_id = f"{namespace}/{name}"
        url = self._repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self.hub._repos:
            # The client reads "url" from this 409 body when exist_ok=True.
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = body.get("visibility") == "private" or body.get("private") is True
        self.hub._create_repo(repo_type, repo_id, private)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        body = self._json_body()
        user = self._user()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        self._writable_repo(repo_type, repo_id)
        del self.hub._repos[(repo_type, repo_id)]
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._readable_repo(repo_type, repo_id)
        commit = self._resolve_or_404(repo, revision)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, oid in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(self.hub._blobs[oid]), blobId=oid)
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(self.hub._blobs[o]) for o in set(commit.files.values())),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(info)

    # ------------------------------------------------------------------ listing

    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        """Tree / paths-info entry of a file or folder, in the Hub's JSON shape."""
        oid = commit.files.get(path)
        if oid is None:
            return {"type": "directory", "oid": _folder_oid(commit.files, path), "size": 0, "path": path}
        entry: dict[str, Any] = {"type": "file", "oid": oid, "size": len(self.hub._blobs[oid]), "path": path}
        if expand:
            last = commit
            for older in repo.history(commit)[1:]:  # oldest commit that still has this very blob
                if older.files.get(path) != oid:
                    break
                last = older
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": _iso(last.date)}
        return entry

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> None:
        repo, _ = self._readable_repo(repo_type, repo_id)
        commit = self._resolve_or_404(repo, revision)
        if not _is_folder(commit.files, folder):
            raise HubError(404, f"{folder} does not exist or is not a folder at {revision}", "EntryNotFound")
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        prefix = folder + "/" if folder else ""
        paths: set[str] = set()
        for path in commit.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, depth + 1):  # the file or folder itself, plus intermediate folders
                paths.add(prefix + "/".join(parts[:i]))
        self._send_json([self._entry(repo, commit, p, expand) for p in sorted(paths)])

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._readable_repo(repo_type, repo_id)
        commit = self._resolve_or_404(repo, revision)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = self._json_body()
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(self.body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[-1].lower() == "true"
        found = [p.strip("/") for p in paths if p.strip("/") in commit.files or _is_folder(commit.files, p.strip("/"))]
        self._send_json([self._entry(repo, commit, p, expand) for p in found])

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo, _ = self._readable_repo(repo_type, repo_id)

        def refs(table: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": o} for n, o in sorted(table.items())]

        payload: dict[str, Any] = {
            "branches": refs(repo.branches, "heads"),
            "converts": [],
            "tags": refs(repo.tags, "tags"),
        }
        if self.query.get("include_prs"):
            payload["pullRequests"] = []
        self._send_json(payload)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._readable_repo(repo_type, repo_id)
        commit = self._resolve_or_404(repo, revision)
        self._send_json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": None}],
                    "date": _iso(c.date),
                }
                for c in repo.history(commit)
            ]
        )

    # ------------------------------------------------------------------ writing

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._writable_repo(repo_type, repo_id)
        head = repo.commits[repo.branches[self._branch_or_404(repo, revision)]]
        files = self._json_body().get("files", [])
        # Always "regular": "lfs" would make the client switch to the Xet/LFS upload protocols.
        answer = []
        for item in files:
            entry = {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
            if item["path"] in head.files:
                entry["oid"] = head.files[item["path"]]  # lets the client skip unchanged files
            answer.append(entry)
        self._send_json({"files": answer, "commitOid": head.oid})

    def _create_commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, user = self._writable_repo(repo_type, repo_id)
        if self.query.get("create_pr"):
            raise HubError(400, "FakeHub does not support pull requests (create_pr)")
        branch = self._branch_or_404(repo, revision)
        head = repo.commits[repo.branches[branch]]
        header: dict[str, Any] = {}
        additions: dict[str, bytes] = {}
        deletions: set[str] = set()
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            path = str(value.get("path", "")).strip("/")
            if key != "header" and (not path or ".." in path.split("/")):
                raise HubError(400, f"Invalid path in commit: {value.get('path')!r}")
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                additions[path] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            elif key == "deletedFile":
                if path not in head.files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                deletions.add(path)
            elif key == "deletedFolder":
                below = {p for p in head.files if p.startswith(path + "/")}
                if not below:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                deletions |= below
            else:  # "lfsFile" is never needed since preupload always answers "regular"
                raise HubError(400, f"FakeHub does not support commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        title, message = header.get("summary") or "Update", header.get("description", "")
        commit = self.hub._commit(repo, branch, additions, deletions - set(additions), title, message, user)
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit.oid}",
                "hookOutput": "",
            }
        )

    def _branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo, _ = self._writable_repo(repo_type, repo_id)
        if self.command == "DELETE":
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return self._send_json({})
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._json_body().get("startingPoint") or DEFAULT_BRANCH
        repo.branches[branch] = self._resolve_or_404(repo, start).oid
        self._send_json({})

    def _tag(self, repo_type: str, repo_id: str, revision_or_tag: str) -> None:
        repo, _ = self._writable_repo(repo_type, repo_id)
        if self.command == "DELETE":
            if repo.tags.pop(revision_or_tag, None) is None:
                raise HubError(404, f"Invalid rev id: {revision_or_tag}", "RevisionNotFound")
            return self._send_json({})
        commit = self._resolve_or_404(repo, revision_or_tag)
        tag = self._json_body().get("tag")
        if not isinstance(tag, str) or not tag:
            raise HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        self._send_json({})

    # ------------------------------------------------------------------ downloads

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo, _ = self._readable_repo(repo_type, repo_id)
        commit = self._resolve_or_404(repo, revision)
        headers = {"X-Repo-Commit": commit.oid}
        oid = commit.files.get(path)
        if oid is None:
            # The client caches the non-existence of the file, keyed on X-Repo-Commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        if self.hub.redirect_resolve and revision != commit.oid:
            location = f"/{URL_PREFIXES[repo_type]}{repo_id}/resolve/{commit.oid}/{quote(path)}"
            return self._send(307, b"", {**headers, "Location": location, "Content-Type": "text/plain"})
        data = self.hub._blobs[oid]
        etag = self.hub.etag(self.command, self.path, oid) if self.hub.etag is not None else None
        headers.update({"ETag": f'"{etag or oid}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            first = int(match.group(1))
            last = min(int(match.group(2) or len(data) - 1), len(data) - 1)
            status, body = 206, data[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        self._send(status, body, headers)
