"""A small Hub-compatible HTTP server for the tests: the real ``huggingface_hub`` client talks to it on 127.0.0.1.

It speaks the subset of the Hub API that ``create_repo``, ``create_commit`` (preupload, LFS batch + basic
transfer, NDJSON commit), ``model_info``, ``list_repo_tree``, ``hf_hub_download`` and ``snapshot_download`` use
(huggingface_hub 2.4, with ``HF_HUB_DISABLE_XET=1``), plus ``/api/validate-yaml``. Repositories live in memory as
a list of commits (full file snapshots); LFS objects are kept by sha256. A commit is applied all at once or not at
all, as on the Hub.

Faults for the tests are armed with :meth:`HubServer.fail_next`: ``"commit_500"`` (the commit endpoint answers
500), ``"commit_cut"`` (the connection is dropped halfway through reading the commit body) and ``"lfs_put_cut"``
(halfway through an LFS upload). Each fires once.

Usage::

    with HubServer() as hub:
        env = hub.client_env(cache_dir)   # HF_ENDPOINT, HF_HUB_DISABLE_XET=1, HF_HUB_CACHE, ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".nii", ".nii.gz", ".npz")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """The git blob id (of the LFS pointer for LFS files), as the Hub reports it."""
        if not self.lfs:
            return git_blob_sha1(self.data)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        return git_blob_sha1(pointer.encode())


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, StoredFile]
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        sha = self.branches.get(revision, revision)
        for c in self.commits:
            if c.sha == sha or (len(sha) >= 7 and c.sha.startswith(sha)):
                return c
        return None


class HubServer:
    """Threaded in-memory Hub. ``url`` is the endpoint to give the client."""

    def __init__(self, host: str = "127.0.0.1"):
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.faults: list[str] = []
        self.seen_tokens: set[str] = set()
        self.log: list[str] = []  # "METHOD path" of every request
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, cache_dir: str, **extra: str) -> dict[str, str]:
        """Environment variables pointing a (sub)process's huggingface_hub at this server."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_CACHE": str(cache_dir),
            "HF_HOME": str(cache_dir) + "-home",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        env.update(extra)
        return env

    # ------------------------------------------------------------------ test helpers
    def fail_next(self, fault: str) -> None:
        assert fault in ("commit_500", "commit_cut", "lfs_put_cut"), fault
        with self.lock:
            self.faults.append(fault)

    def _take_fault(self, fault: str) -> bool:
        with self.lock:
            if fault in self.faults:
                self.faults.remove(fault)
                return True
            return False

    def create_repo(self, repo_id: str) -> Repo:
        with self.lock:
            if repo_id not in self.repos:
                repo = Repo(repo_id)
                first = Commit(_new_sha(repo_id, "initial"), "initial commit",
                               {".gitattributes": StoredFile(GITATTRIBUTES, False)}, None)
                repo.commits.append(first)
                repo.branches["main"] = first.sha
                self.repos[repo_id] = repo
            return self.repos[repo_id]

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        return {p: f.data for p, f in commit.files.items()}


def _new_sha(*parts: str) -> str:
    return hashlib.sha1(("\0".join(parts) + repr(time.time_ns())).encode()).hexdigest()


def validate_card_yaml(content: str) -> list[str]:
    """The checks the Hub applies to README.md metadata that matter here; returns error messages."""
    if not content.startswith("---"):
        return []
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
    if not match:
        return ["YAML front matter is not closed with '---'"]
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"Invalid YAML: {exc}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["Metadata must be a mapping"]
    errors = []
    for key in ("tags", "datasets", "language", "metrics", "pipeline_tag", "library_name", "license", "base_model"):
        value = meta.get(key)
        if value is None:
            continue
        if key in ("pipeline_tag", "library_name", "license") and not isinstance(value, str):
            errors.append(f'"{key}" must be a string')
        elif key in ("tags", "datasets", "metrics", "language", "base_model") and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            errors.append(f'"{key}" must be a string or a list of strings')
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in ("adapter", "merge", "quantized", "finetune"):
            errors.append('"base_model_relation" must be one of adapter, merge, quantized, finetune')
        elif not meta.get("base_model"):
            errors.append('"base_model_relation" needs a "base_model"')
    model_index = meta.get("model-index")
    if model_index is not None:
        if not isinstance(model_index, list):
            errors.append('"model-index" must be an array')
        else:
            for entry in model_index:
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    errors.append('"model-index[].name" is required and must be a string')
                    continue
                for result in entry.get("results") or []:
                    task = result.get("task") if isinstance(result, dict) else None
                    if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                        errors.append('"model-index[].results[].task.type" is required')
                    dataset = result.get("dataset") if isinstance(result, dict) else None
                    keys = ("type", "name")
                    if not (isinstance(dataset, dict) and all(isinstance(dataset.get(k), str) for k in keys)):
                        errors.append('"model-index[].results[].dataset" needs "type" and "name" strings')
                    metrics = result.get("metrics") if isinstance(result, dict) else None
                    if not isinstance(metrics, list) or not metrics:
                        errors.append('"model-index[].results[].metrics" must be a non-empty array')
                        continue
                    for m in metrics:
                        if not isinstance(m, dict) or not isinstance(m.get("type"), str) or "value" not in m:
                            errors.append('"model-index[].results[].metrics[]" needs "type" and "value"')
                        elif not isinstance(m["value"], (int, float, str)):
                            errors.append('"model-index[].results[].metrics[].value" must be a number or a string')
    return errors


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        # -------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _cut(self, body_len: int) -> None:
            """Read about half of the request body, then drop the connection without answering."""
            self.rfile.read(max(1, body_len // 2))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
                  head: bool = False) -> None:
            data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
            self.send_response(status)
            if raw is None:
                self.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
            self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else
                       {"X-Error-Message": message}, head=head)

        def _record_token(self) -> None:
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                hub.seen_tokens.add(auth[len("Bearer "):])

        def _route(self, method: str) -> None:
            self._record_token()
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            hub.log.append(f"{method} {path}")
            try:
                self._dispatch(method, path, query)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        # -------------------------------------------------------------- routes
        def _repo_or_404(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, f"Repository Not Found for url: {hub.url}/{repo_id}.", "RepoNotFound", head=head)
            return repo

        def _commit_or_404(self, repo: Repo, revision: str, head: bool = False) -> Commit | None:
            commit = repo.resolve(revision)
            if commit is None:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
            return commit

        def _dispatch(self, method: str, path: str, query: dict) -> None:
            head = method == "HEAD"
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if method == "POST" and path == "/api/validate-yaml":
                body = json.loads(self._body() or b"{}")
                errors = validate_card_yaml(body.get("content", ""))
                if errors:
                    return self._send(400, {"errors": [{"message": e} for e in errors], "error": "; ".join(errors)})
                return self._send(200, {"errors": [], "warnings": []})
            m = re.fullmatch(r"/api/models/(.+?)/(preupload|commit)/(.+)", path)
            if m and method == "POST":
                return self._preupload(*m.group(1, 3)) if m.group(2) == "preupload" else self._commit(*m.group(1, 3))
            m = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(?:/(.*))?", path)
            if m and method == "GET":
                return self._tree(m.group(1), m.group(2), m.group(3) or "", "recursive" in query)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+|[^/]+)(?:/revision/(.+))?", path)
            if m and method == "GET":
                return self._info(m.group(1), m.group(2) or "main")
            m = re.fullmatch(r"/(.+?)\.git/info/lfs/objects/batch", path)
            if m and method == "POST":
                return self._lfs_batch(m.group(1))
            m = re.fullmatch(r"/lfs/(upload|verify)/([0-9a-f]{64})", path)
            if m and method in ("PUT", "POST"):
                return self._lfs_upload(m.group(2)) if m.group(1) == "upload" else self._lfs_verify(m.group(2))
            m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
            if m and method in ("GET", "HEAD"):
                return self._resolve(*m.group(1, 2, 3), head=head)
            self._error(404, f"no route for {method} {path}", head=head)

        def _create_repo(self) -> None:
            body = json.loads(self._body() or b"{}")
            if body.get("type", "model") != "model":
                return self._error(400, "this test server only hosts model repos")
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            with hub.lock:
                if repo_id in hub.repos:  # the Hub answers 409 with the url, which create_repo(exist_ok) reads
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{hub.url}/{repo_id}"}, {"X-Error-Message": "repo exists"})
                hub.create_repo(repo_id)
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _info(self, repo_id: str, revision: str) -> None:
            repo = self._repo_or_404(repo_id)
            if repo is None:
                return
            commit = self._commit_or_404(repo, revision)
            if commit is None:
                return
            self._send(200, {
                "_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": False,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": p, "size": len(f.data)} for p, f in sorted(commit.files.items())],
            })

        def _tree(self, repo_id: str, revision: str, prefix: str, recursive: bool) -> None:
            repo = self._repo_or_404(repo_id)
            commit = repo and self._commit_or_404(repo, revision)
            if commit is None:
                return
            prefix = prefix.strip("/")
            entries, folders = [], set()
            for p, f in sorted(commit.files.items()):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                rest = p[len(prefix) + 1:] if prefix else p
                if "/" in rest and not recursive:
                    folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                    continue
                entry = {"type": "file", "oid": f.oid, "size": len(f.data), "path": p}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                entries.append(entry)
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)]
            self._send(200, entries)

        def _preupload(self, repo_id: str, revision: str) -> None:
            body = json.loads(self._body() or b"{}")
            repo = self._repo_or_404(repo_id)
            commit = repo and self._commit_or_404(repo, revision)
            if commit is None:
                return
            files = []
            for f in body.get("files", []):
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000
                existing = commit.files.get(f["path"])
                oid = None
                if existing is not None:
                    oid = existing.sha256 if existing.lfs else existing.oid
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            self._send(200, {"files": files, "commitOid": commit.sha})

        def _lfs_batch(self, repo_id: str) -> None:
            body = json.loads(self._body() or b"{}")
            if self._repo_or_404(repo_id) is None:
                return
            objects = []
            for obj in body.get("objects", []):
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs_objects:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs/upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs/verify/{obj['oid']}"},
                    }
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects},
                       {"Content-Type": "application/vnd.git-lfs+json"})

        def _lfs_upload(self, oid: str) -> None:
            if hub._take_fault("lfs_put_cut"):
                return self._cut(int(self.headers.get("Content-Length") or 2))
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, f"uploaded content does not match sha256 {oid}")
            with hub.lock:
                hub.lfs_objects[oid] = data
            self._send(200, raw=b"", headers={"ETag": f'"{oid}"'})

        def _lfs_verify(self, oid: str) -> None:
            body = json.loads(self._body() or b"{}")
            data = hub.lfs_objects.get(oid)
            if data is None or len(data) != body.get("size"):
                return self._error(404, f"LFS object {oid} not found")
            self._send(200, {"success": True})

        def _commit(self, repo_id: str, revision: str) -> None:
            if hub._take_fault("commit_cut"):
                return self._cut(int(self.headers.get("Content-Length") or 2))
            body = self._body()
            if hub._take_fault("commit_500"):
                return self._error(500, "Internal Error - We're working hard to fix this as soon as possible!")
            repo = self._repo_or_404(repo_id)
            if repo is None:
                return
            revision = unquote(revision)
            if revision not in repo.branches:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return self._error(400, "commit payload must start with a header line")
            header = lines[0]["value"]
            with hub.lock:
                parent = repo.resolve(revision)
                if header.get("parentCommit") and not parent.sha.startswith(header["parentCommit"]):
                    return self._error(412, "A commit has happened since. Please refresh and try again.")
                files = dict(parent.files)
                for line in lines[1:]:
                    key, value = line["key"], line["value"]
                    if key == "file":
                        files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
                    elif key == "lfsFile":
                        data = hub.lfs_objects.get(value["oid"])
                        if data is None:
                            return self._error(
                                400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                        files[value["path"]] = StoredFile(data, True)
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    elif key == "deletedFolder":
                        files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                    else:
                        return self._error(400, f"unknown commit operation {key!r}")
                commit = Commit(_new_sha(repo_id, header.get("summary", "")), header.get("summary", ""), files,
                                parent.sha)
                repo.commits.append(commit)
                repo.branches[revision] = commit.sha
            self._send(200, {"success": True, "commitOid": commit.sha,
                             "commitUrl": f"{hub.url}/{repo_id}/commit/{commit.sha}", "pullRequestUrl": None})

        def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
            repo = self._repo_or_404(repo_id, head=head)
            commit = repo and self._commit_or_404(repo, revision, head=head)
            if commit is None:
                return
            f = commit.files.get(filename)
            if f is None:
                return self._error(404, f"{filename} does not exist at {revision}", "EntryNotFound", head=head)
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
            if f.lfs:
                headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": len(f.data)})
            self._send(200, raw=f.data, headers=headers, head=head)

    return Handler


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/hub/hub_server.py
    with HubServer() as server:
        print(server.url, flush=True)
        threading.Event().wait()
