"""A small Hugging Face Hub API server for tests, built on the standard library only.

The real `huggingface_hub` client (1.x) can push to it and pull from it, for model and dataset repos:
create / delete / info / tree, README metadata validation, preupload, the LFS batch endpoint and PUT
(sha256 checked), the NDJSON commit, tags and resolve. Blobs live in a temporary folder; repo state
(commits, branches, tags) lives in memory.

Client setup. huggingface_hub reads `HF_ENDPOINT` and `HF_HUB_DISABLE_XET` once, at import. Two ways work:
- in-process (what `tests/test_hub.py` does): pass `endpoint=server.endpoint` to `HfApi(...)`,
  `snapshot_download(...)`, `hf_hub_download(...)`, and set `huggingface_hub.constants.HF_HUB_DISABLE_XET`
  to True (e.g. with `monkeypatch.setattr`): `is_xet_available()` reads that attribute at every call;
- subprocess (e.g. the `hf` CLI): set `HF_ENDPOINT=<server.endpoint>` and `HF_HUB_DISABLE_XET=1` in its env.
Without the Xet switch the client asks a Hub-only Xet token endpoint and fails with a 404.

Fault injection: the first `fail_first_n` requests to a write endpoint (create, preupload, commit) answer
`fail_status` (503 unless told). `counts` counts requests per endpoint name (create, preupload, lfs_batch,
lfs_put, commit, info, tree, resolve, ...) and `injected_failures`; `requests` records method, path, headers
and the first MiB of each body, so a test can check where a token travels (`token_leaks`).
Note: the client itself retries preupload and the LFS batch/PUT (5 times, 1 s to 8 s apart) but not
create_repo or the commit; a test that wants fast, visible failures lets them land on create_repo.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

WRITE_ENDPOINTS = frozenset({"create", "preupload", "commit"})
LFS_SIZE_THRESHOLD = (
    10 * 1024 * 1024
)  # bytes; the Hub stores files this large in LFS whatever .gitattributes says
RECORDED_BODY_LIMIT = 1024 * 1024  # bytes of each request body kept in `requests`
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.parquet", "*.arrow", "*.mp4")
)
_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset"}


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # path and query string, as received
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass(frozen=True)
class _File:
    sha256: str
    size: int
    lfs: bool
    git_oid: str  # git sha1 of the content, or of the LFS pointer for LFS files


@dataclass
class _Repo:
    private: bool
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)  # commit sha -> files
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class LocalHubServer:
    """Hub API on 127.0.0.1; `with LocalHubServer() as hub: HfApi(endpoint=hub.endpoint) ...`."""

    def __init__(
        self, *, fail_first_n: int = 0, fail_status: int = 503, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.fail_first_n, self.fail_status = fail_first_n, fail_status
        self.counts: Counter[str] = Counter()
        self.requests: list[RecordedRequest] = []
        self._root = Path(tempfile.mkdtemp(prefix="local-hub-"))
        self._blobs = self._root / "blobs"
        self._blobs.mkdir()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()
        self._commit_counter = 0
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://{host}:{self._httpd.server_port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> LocalHubServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        shutil.rmtree(self._root, ignore_errors=True)

    def token_leaks(self, token: str) -> list[str]:
        """Where `token` was sent other than in an Authorization header (empty list: nowhere else)."""
        return [
            f"{r.method} {r.path}: in the {where}"
            for r in self.requests
            for where, text in [("URL", r.path), ("body", r.body.decode(errors="replace"))]
            + [(f"header {k}", v) for k, v in r.headers.items() if k != "authorization"]
            if token in text
        ]

    # ---- storage helpers (called with the lock held) ----
    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        if (repo_type, repo_id) not in self._repos:
            raise HubError(404, f"Repository {repo_id} ({repo_type}) not found", "RepoNotFound")
        return self._repos[(repo_type, repo_id)]

    def _commit_sha(self, repo: _Repo, rev: str) -> str:
        sha = repo.resolve(rev)
        if sha is None:
            raise HubError(404, f"Revision {rev!r} not found", "RevisionNotFound")
        return sha

    def _store(self, data: bytes, lfs: bool) -> _File:
        sha256 = hashlib.sha256(data).hexdigest()
        (self._blobs / sha256).write_bytes(data)
        git_oid = _git_oid(_lfs_pointer(sha256, len(data)) if lfs else data)
        return _File(sha256, len(data), lfs, git_oid)

    def _new_commit(self, repo: _Repo, branch: str, files: dict[str, _File], summary: str) -> str:
        self._commit_counter += 1
        state = [branch, summary, self._commit_counter, sorted((p, f.sha256) for p, f in files.items())]
        sha = hashlib.sha1(json.dumps(state).encode()).hexdigest()
        repo.commits[sha], repo.branches[branch] = dict(files), sha
        return sha

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"

    def _is_lfs(self, files: dict[str, _File], path: str, size: int, sample: bytes) -> bool:
        if size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
            return True
        attrs = files.get(".gitattributes")
        text = (self._blobs / attrs.sha256).read_text() if attrs else ""
        for line in text.splitlines():
            pattern, *rest = line.split() or [""]
            target = path if "/" in pattern else path.rsplit("/", 1)[-1]
            if "filter=lfs" in rest and fnmatch.fnmatchcase(target, pattern.lstrip("/")):
                return True
        return False

    # ---- endpoints: each returns (status, JSON body or bytes, extra headers) ----
    def create(self, body: dict) -> tuple:
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        url = self._repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self._repos:
            return 409, {"error": "You already created this repo", "url": url}, {}
        repo = self._repos[(repo_type, repo_id)] = _Repo(private=body.get("visibility") == "private")
        gitattributes = self._store(DEFAULT_GITATTRIBUTES.encode(), lfs=False)
        self._new_commit(repo, "main", {".gitattributes": gitattributes}, "initial commit")
        return 200, {"url": url, "name": repo_id}, {}

    def delete(self, body: dict) -> tuple:
        key = (body.get("type") or "model", f"{body.get('organization') or 'user'}/{body['name']}")
        self._repo(*key)
        del self._repos[key]
        return 200, {}, {}

    def info(self, repo_type: str, repo_id: str, rev: str) -> tuple:
        repo = self._repo(repo_type, repo_id)
        sha = self._commit_sha(repo, rev)
        siblings = [{"rfilename": p, "size": f.size} for p, f in sorted(repo.commits[sha].items())]
        info = {"id": repo_id, "author": repo_id.split("/")[0], "sha": sha, "private": repo.private}
        return 200, {**info, "tags": [], "siblings": siblings}, {}

    def tree(self, repo_type: str, repo_id: str, rev: str, sub: str, recursive: bool) -> tuple:
        repo = self._repo(repo_type, repo_id)
        files = repo.commits[self._commit_sha(repo, rev)]
        prefix = f"{sub}/" if sub else ""
        entries: dict[str, dict] = {}
        for path, f in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                folder = prefix + "/".join(parts[:depth])
                folder_entry = {
                    "type": "directory",
                    "oid": _git_oid(folder.encode()),
                    "size": 0,
                    "path": folder,
                }
                entries.setdefault(folder, folder_entry)
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": path}
                if f.lfs:
                    pointer_size = len(_lfs_pointer(f.sha256, f.size))
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": pointer_size}
                entries[path] = entry
        if sub and not entries:
            raise HubError(404, f"{sub} not found", "EntryNotFound")
        return 200, [entries[k] for k in sorted(entries)], {}

    def preupload(self, repo_type: str, repo_id: str, rev: str, body: dict) -> tuple:
        repo = self._repo(repo_type, repo_id)
        head = self._commit_sha(repo, rev)
        files, out = repo.commits[head], []
        for item in body["files"]:
            path, remote = item["path"], files.get(item["path"])
            lfs = self._is_lfs(files, path, item["size"], base64.b64decode(item["sample"]))
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.git_oid)
            out.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {"files": out, "commitOid": head}, {}

    def lfs_batch(self, repo_type: str, repo_id: str, body: dict) -> tuple:
        self._repo(repo_type, repo_id)
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self._blobs / obj["oid"]).exists():  # no "actions" means: already stored, skip the upload
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/_lfs/{obj['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def lfs_put(self, oid: str, data: bytes) -> tuple:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"sha256 mismatch for LFS object {oid}")
        (self._blobs / oid).write_bytes(data)
        return 200, {}, {}

    def commit(self, repo_type: str, repo_id: str, rev: str, body: bytes) -> tuple:
        repo = self._repo(repo_type, repo_id)
        if rev not in repo.branches:
            raise HubError(404, f"Branch {rev!r} not found", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        if header.get("parentCommit") not in (None, repo.branches[rev]):
            raise HubError(412, "parentCommit is not the head of the branch")
        files = dict(repo.commits[repo.branches[rev]])
        for op in (x for x in lines if x["key"] != "header"):
            key, value = op["key"], op["value"]
            if key == "file":
                files[value["path"]] = self._store(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                blob = self._blobs / value["oid"]
                if not blob.exists():
                    raise HubError(400, f"LFS object {value['oid']} was never uploaded")
                size = blob.stat().st_size
                files[value["path"]] = _File(
                    value["oid"], size, True, _git_oid(_lfs_pointer(value["oid"], size))
                )
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        sha = self._new_commit(repo, rev, files, header["summary"])
        url = f"{self._repo_url(repo_type, repo_id)}/commit/{sha}"
        return 200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None}, {}

    def tag(self, repo_type: str, repo_id: str, rev: str, body: dict) -> tuple:
        repo = self._repo(repo_type, repo_id)
        if body["tag"] in repo.tags:
            raise HubError(409, f"Tag {body['tag']!r} already exists")
        repo.tags[body["tag"]] = self._commit_sha(repo, rev)
        return 200, {}, {}

    def resolve(self, repo_type: str, repo_id: str, rev: str, path: str) -> tuple:
        repo = self._repo(repo_type, repo_id)
        sha = self._commit_sha(repo, rev)
        f = repo.commits[sha].get(path)
        if f is None:
            raise HubError(404, f"{path} not found", "EntryNotFound", {"X-Repo-Commit": sha})
        etag = f'"{f.sha256 if f.lfs else f.git_oid}"'
        headers = {"ETag": etag, "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(f.size)}
        return 200, (self._blobs / f.sha256).read_bytes(), headers


def _route(method: str, parts: list[str], query: dict) -> tuple[str, tuple]:
    """Endpoint name and arguments for a request path split on '/' (segments already unquoted)."""
    kind = _TYPE_FROM_PLURAL.get(parts[1]) if len(parts) > 1 and parts[0] == "api" else None
    read = method in ("GET", "HEAD")
    recursive = query.get("recursive", ["false"])[0].lower() == "true"
    match parts:
        case ["api", "repos", "create"] if method == "POST":
            return "create", ()
        case ["api", "repos", "delete"] if method == "DELETE":
            return "delete", ()
        case ["api", "validate-yaml"] if method == "POST":
            return "validate_yaml", ()
        case ["api", _, ns, name] if kind and read:
            return "info", (kind, f"{ns}/{name}", "main")
        case ["api", _, ns, name, "revision", rev] if kind and read:
            return "info", (kind, f"{ns}/{name}", rev)
        case ["api", _, ns, name, "tree", rev, *sub] if kind and read:
            return "tree", (kind, f"{ns}/{name}", rev, "/".join(sub).strip("/"), recursive)
        case ["api", _, ns, name, ("preupload" | "commit" | "tag") as action, rev] if (
            kind and method == "POST"
        ):
            return action, (kind, f"{ns}/{name}", rev)
        case ["_lfs", oid] if method == "PUT":
            return "lfs_put", (oid,)
        case [*prefix, ns, name, "info", "lfs", "objects", "batch"] if (
            name.endswith(".git") and method == "POST"
        ):
            return "lfs_batch", ("dataset" if prefix == ["datasets"] else "model", f"{ns}/{name[:-4]}")
        case ["datasets", ns, name, "resolve", rev, *path] if read:
            return "resolve", ("dataset", f"{ns}/{name}", rev, "/".join(path))
        case [ns, name, "resolve", rev, *path] if read:
            return "resolve", ("model", f"{ns}/{name}", rev, "/".join(path))
    return "unknown", ()


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHubServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: object, headers: dict) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        hub, body = self.hub, self._read_body()
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        name, args = _route(self.command, parts, parse_qs(url.query))
        with hub._lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            hub.requests.append(RecordedRequest(self.command, self.path, headers, body[:RECORDED_BODY_LIMIT]))
            hub.counts[name] += 1
            if name in WRITE_ENDPOINTS and hub.counts["injected_failures"] < hub.fail_first_n:
                hub.counts["injected_failures"] += 1
                return self._send(hub.fail_status, {"error": f"Injected failure {hub.fail_status}"}, {})
            try:
                if name == "unknown":
                    raise HubError(404, f"No route for {self.command} {url.path}")
                if name == "validate_yaml":
                    return self._send(200, {"errors": [], "warnings": []}, {})
                if name in ("create", "delete", "preupload", "lfs_batch", "tag"):
                    args = (*args, json.loads(body or b"{}"))
                elif name in ("commit", "lfs_put"):
                    args = (*args, body)
                self._send(*getattr(hub, name)(*args))
            except HubError as err:
                headers = {"X-Error-Message": str(err), **({"X-Error-Code": err.code} if err.code else {})}
                self._send(err.status, {"error": str(err)}, {**headers, **err.headers})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch
