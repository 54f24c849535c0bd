"""A stand-in for the Hugging Face Hub on 127.0.0.1: the part of its HTTP API that huggingface_hub uses to
resolve and download model files, with fault modes for tests and one rate limit shared by all connections for
benchmarks. Used by tests/test_hub.py and evals/bench_hub.py; nothing here reaches the network.

Endpoints (as huggingface_hub 2.x calls them, see its file_download.py, hf_api.py, _snapshot_download.py):
  GET  /api/models/{repo}[/revision/{rev}][?blobs=True]   model info: sha, siblings (rfilename, size, blobId, lfs)
  GET  /api/models/{repo}/tree/{rev}[?recursive=...]       file listing: type, path, size, oid, lfs {oid, size}
  HEAD /{repo}/resolve/{rev}/{file}                        X-Repo-Commit, ETag, Content-Length (X-Linked-* for LFS)
  GET  /{repo}/resolve/{rev}/{file}                        the bytes; `Range: bytes=N-` / `bytes=N-M` -> 206
Errors carry `X-Error-Code` (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound). No xet headers are ever
sent: huggingface_hub would switch to its xet transport.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".msgpack", ".h5")
CHUNK = 256 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class ByteSource(Protocol):
    """Bytes produced on demand (evals/scale_shards.py: a 60 GB checkpoint that exists only as a recipe): its
    size and sha256 are known beforehand, `open()` gives a fresh seekable reader."""

    size: int
    sha256: str

    def open(self) -> BinaryIO: ...


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file the Hub stores in git for a large file (its blob id is the git oid listed)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class HubFile:
    """A file's bytes (in memory, a path for benchmark-sized shards, or a generator) and the ids the Hub reports."""

    name: str
    source: bytes | Path | ByteSource
    lfs: bool
    size: int = 0
    sha256: str = ""
    blob_id: str = ""

    def __post_init__(self) -> None:
        sha, sha1 = hashlib.sha256(), None
        if not isinstance(self.source, (bytes, Path)):  # generated: nothing is read now
            self.size, self.sha256 = self.source.size, self.source.sha256
            self.blob_id = git_blob_id(lfs_pointer(self.sha256, self.size))
            return
        if isinstance(self.source, bytes):
            self.size = len(self.source)
            sha.update(self.source)
            self.blob_id = git_blob_id(self.source)
        else:
            self.size = self.source.stat().st_size
            sha1 = hashlib.sha1(b"blob %d\0" % self.size)
            with open(self.source, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    sha.update(chunk)
                    sha1.update(chunk)
            self.blob_id = sha1.hexdigest()
        self.sha256 = sha.hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def open(self) -> BinaryIO:
        if isinstance(self.source, bytes):
            return io.BytesIO(self.source)
        return open(self.source, "rb") if isinstance(self.source, Path) else self.source.open()


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False  # needs one of `tokens`
    private: bool = False  # invisible without one of `tokens`
    tokens: set[str] = field(default_factory=set)


@dataclass
class Fault:
    """What goes wrong when a file is served. `cut_at` and `status` apply to the next `times` requests."""

    cut_at: int | None = None  # close the connection after this many body bytes
    truncate_to: int | None = None  # every GET sends only this many bytes (and says so in Content-Length)
    corrupt: bool = False  # one byte flipped, same size
    status: tuple[int, str] | None = None  # (HTTP status, X-Error-Code or "")
    bytes_per_second: float | None = None  # a slow file
    times: int = 1
    skip: int = 0  # GETs of the file served normally before `cut_at` applies (e.g. a header probe)


class Throttle:
    """One rate shared by every connection: each chunk reserves its slot on a common timeline.

    A link keeps sending what the kernel has buffered while the sending process waits for a CPU, so time the
    server thread loses to scheduling is not lost to the link: up to `burst_seconds` of unused rate may be
    caught up (as a socket buffer of rate x 50 ms would). The long-run rate never exceeds `bytes_per_second`.
    """

    def __init__(self, bytes_per_second: float, burst_seconds: float = 0.05) -> None:
        self.rate, self.burst, self.lock = bytes_per_second, burst_seconds, threading.Lock()
        self.free_at = time.monotonic()

    def wait(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now - self.burst, self.free_at)
            self.free_at = start + n / self.rate
            delay = self.free_at - now
        if delay > 0:
            time.sleep(delay)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    time: float


class FakeHub:
    """`with FakeHub() as hub: hub.add_repo("org/name", {"config.json": b"..."}); os.environ["HF_ENDPOINT"] =
    hub.url`. `hub.requests` logs every request; `hub.faults[(repo, file)]` injects failures."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: dict[tuple[str, str], Fault] = {}
        self.requests: list[Request] = []
        self.throttle: Throttle | None = None
        self.on_body: Callable[[str, str, int], None] | None = None  # (repo, file, bytes sent so far)
        self.chunk = CHUNK  # bytes per write: the granularity of throttling and of cuts
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path | ByteSource], *, branch: str = "main",
                 commit: str | None = None, **flags: object) -> str:
        """Publish `files` as a new commit on `branch` (creating the repo); returns the commit hash."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        for key, value in flags.items():
            setattr(repo, key, value)
        commit = commit or hashlib.sha1(f"{repo_id}{len(repo.commits)}{random.random()}".encode()).hexdigest()
        repo.commits[commit] = {name: HubFile(name, data, name.endswith(LFS_SUFFIXES)) for name, data in files.items()}
        repo.refs[branch] = commit
        return commit

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self.lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and contains in r.path)

    def log(self, method: str, path: str, range_: str | None) -> None:
        with self.lock:
            self.requests.append(Request(method, path, range_, time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: FakeHub

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _json(self, data: object) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(data).encode())

    def _route(self, method: str) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        hub.log(method, path, self.headers.get("Range"))
        parts = path.strip("/").split("/")
        try:
            if parts[:2] == ["api", "models"]:
                self._api(parts[2:], query)
            elif "resolve" in parts:
                at = parts.index("resolve")
                self._resolve("/".join(parts[:at]), parts[at + 1] if len(parts) > at + 1 else "",
                              "/".join(parts[at + 2:]))
            else:
                self._error(404, "", f"no route for {path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _repo(self, repo_id: str) -> Repo | None:
        """The repo if the request may see it; otherwise the error is already sent."""
        repo = self.server_hub.repos.get(repo_id)
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if repo is None or (repo.private and token not in repo.tokens):
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and token not in repo.tokens:
            self._error(401 if not token else 403, "GatedRepo", "Access to this model is restricted")
            return None
        return repo

    def _commit(self, repo: Repo, revision: str) -> str | None:
        commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _split_repo(self, parts: list[str]) -> tuple[str, list[str]]:
        """`org/name/rest...` or `name/rest...` (a canonical model without an org)."""
        hub = self.server_hub
        if len(parts) >= 2 and f"{parts[0]}/{parts[1]}" in hub.repos:
            return f"{parts[0]}/{parts[1]}", parts[2:]
        if parts and parts[0] in hub.repos:
            return parts[0], parts[1:]
        return "/".join(parts[:2]), parts[2:]

    # -- the API ------------------------------------------------------------------------------------------------
    def _api(self, parts: list[str], query: dict[str, list[str]]) -> None:
        repo_id, rest = self._split_repo(parts)
        repo = self._repo(repo_id)
        if repo is None:
            return
        kind, revision = (rest[0], "/".join(rest[1:2])) if rest else ("revision", "main")
        commit = self._commit(repo, revision)
        if commit is None:
            return
        files = repo.commits[commit]
        if kind == "tree":
            self._json([{"type": "file", "oid": f.blob_id, "size": f.size, "path": f.name,
                         **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {})}
                        for f in files.values()])
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [{"rfilename": f.name, **({"size": f.size, "blobId": f.blob_id} if blobs else {}),
                     **({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134}} if blobs and f.lfs else {})}
                    for f in files.values()]
        self._json({"_id": commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit,
                    "private": repo.private, "gated": "auto" if repo.gated else False, "disabled": False,
                    "tags": [], "downloads": 0, "likes": 0, "library_name": "transformers", "siblings": siblings})

    # -- files --------------------------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, revision: str, name: str) -> None:
        hub = self.server_hub
        fault = hub.faults.get((repo_id, name))
        if fault is not None and fault.status is not None and fault.times > 0:
            fault.times -= 1
            self._error(fault.status[0], fault.status[1], "injected fault")
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = self._commit(repo, revision)
        if commit is None:
            return
        entry = repo.commits[commit].get(name)
        if entry is None:
            self._error(404, "EntryNotFound", f"{name} does not exist", commit)
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, entry.size) if match.group(2) else entry.size
            if start >= entry.size and entry.size:
                self._error(416, "", "range not satisfiable")
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        if fault is not None and fault.truncate_to is not None and self.command == "GET":
            end = min(end, max(start, fault.truncate_to))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        self._body(repo_id, entry, start, end, fault)

    def _body(self, repo_id: str, entry: HubFile, start: int, end: int, fault: Fault | None) -> None:
        cut = None
        if fault is not None and fault.cut_at is not None and fault.times > 0:
            if fault.skip > 0:
                fault.skip -= 1
            else:
                fault.times -= 1
                cut = fault.cut_at
        slow = Throttle(fault.bytes_per_second) if fault is not None and fault.bytes_per_second else None
        with entry.open() as source:
            source.seek(start)
            self._send_body(repo_id, entry, source, start, end, fault, cut, slow)

    def _send_body(self, repo_id: str, entry: HubFile, source: BinaryIO, start: int, end: int, fault: Fault | None,
                   cut: int | None, slow: Throttle | None) -> None:
        hub = self.server_hub
        position = start
        while position < end:
            size = min(hub.chunk, end - position)
            if cut is not None:
                size = min(size, max(cut - (position - start), 0))
                if size == 0:  # the connection drops mid-body
                    self.wfile.flush()
                    self.close_connection = True
                    return
            for throttle in (hub.throttle, slow):
                if throttle is not None:
                    throttle.wait(size)
            if isinstance(entry.source, Path) and fault is None:  # zero-copy, so the server costs little CPU
                sent = 0
                while sent < size:
                    sent += os.sendfile(self.connection.fileno(), source.fileno(), position + sent, size - sent)
            else:
                source.seek(position)
                data = source.read(size)
                if fault is not None and fault.corrupt and position <= entry.size // 2 < position + size:
                    flip = entry.size // 2 - position
                    data = data[:flip] + bytes([data[flip] ^ 0xFF]) + data[flip + 1:]
                self.wfile.write(data)
            position += size
            if hub.on_body is not None:
                hub.on_body(repo_id, entry.name, position)


def tree_files(folder: Path, in_memory: bool = True) -> dict[str, bytes | Path]:
    """Every file of a checkpoint folder, ready for `FakeHub.add_repo`."""
    return {p.name: (p.read_bytes() if in_memory else p) for p in sorted(folder.iterdir()) if p.is_file()}


def hub_environment(hub: FakeHub, cache: Path) -> dict[str, str]:
    """Environment variables that point huggingface_hub and qopt at `hub`, with a private cache."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
