"""Shards of a Hub model fetched one after another in a background thread while the loader consumes the
previous one: the download of shard k+1 overlaps the quantization and placement of shard k.

Each shard is written to a `.incomplete` file, hashed as it arrives and checked against the Hub's LFS sha256
(or git object id) in the download thread; only a verified file is published, so a kill at any moment leaves
the HF cache as huggingface_hub would (blobs complete, snapshot links only to complete blobs), and the next run
resumes the partial file with an HTTP range. With `keep_download=False` the shards go to a scratch folder
outside the cache and each is deleted once consumed: at most two shards are on disk at a time (the one being
read and the one arriving). Blobs already in the HF cache are read in place and never deleted.

The HTTP transfer is huggingface_hub's own (`http_get`: retries, resume within a run, progress bar).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DownloadError, HubError
from ..utils import format_bytes
from .hub import ModelSource, RemoteFile, hub_error, is_connection_error, repo_folder, silent_tqdm

logger = logging.getLogger(__name__)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_JOIN_SECONDS = 5.0


class Cancelled(Exception):
    """The consumer stopped (an error, Ctrl-C): the download thread leaves at its next chunk."""


def _event(kind: str, index: int, name: str) -> None:
    """One step of the downloads, for logs and for tests that check the order of downloads and consumption."""
    logger.debug("shard %d (%s): %s", index, name, kind, extra={"qopt_event": (kind, index)})


@dataclass
class _Job:
    name: str
    path: Path  # where the consumer reads it
    remote: RemoteFile | None  # None: already on disk
    delete_after: bool = False


class ShardDownloader:
    """Iterate to get each shard's local path in order; use as a context manager so that a failure or Ctrl-C
    stops the download thread and removes the scratch folder."""

    def __init__(self, source: ModelSource, shards: list[Path], keep_download: bool | None = None) -> None:
        self.source = source
        self.keep = source.keep_download if keep_download is None else keep_download
        self.scratch: Path | None = None
        self.jobs: list[_Job] = []
        for path in shards:
            if path.is_file():
                self.jobs.append(_Job(path.name, path, None))
                continue
            remote = source.files.get(path.name)
            if remote is None:
                raise HubError(f"{source.label}: shard {path.name} is neither in the cache nor in the repo's file "
                               f"list")
            self.jobs.append(_Job(path.name, path, remote, delete_after=not self.keep))
        self.total_bytes = sum(j.path.stat().st_size if j.remote is None else j.remote.size or 0 for j in self.jobs)
        self._cond = threading.Condition()
        self._ready: dict[int, Path] = {}
        self._error: tuple[int, BaseException] | None = None
        self._consuming = 0
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ShardDownloader:
        if any(j.delete_after for j in self.jobs):
            self.scratch = Path(tempfile.mkdtemp(prefix="qopt-download-"))
            for job in self.jobs:
                if job.delete_after:
                    job.path = self.scratch / job.name
        if any(j.remote is not None for j in self.jobs):
            self._thread = threading.Thread(target=self._run, name="qopt-download", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(_JOIN_SECONDS)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __iter__(self) -> Iterator[Path]:
        for index, job in enumerate(self.jobs):
            path = self._wait(index) if job.remote is not None else job.path
            _event("consume_start", index, job.name)
            yield path
            _event("consume_end", index, job.name)
            if job.delete_after:
                path.unlink(missing_ok=True)
                _event("deleted", index, job.name)
            with self._cond:
                self._consuming = index + 1
                self._cond.notify_all()

    def _wait(self, index: int) -> Path:
        with self._cond:
            while index not in self._ready:
                if self._error is not None and self._error[0] <= index:
                    raise self._error[1]
                if self._thread is None or not self._thread.is_alive():
                    raise HubError(f"{self.source.label}: the download thread stopped before {self.jobs[index].name}")
                self._cond.wait(1.0)  # a timeout keeps Ctrl-C responsive
            return self._ready[index]

    def _run(self) -> None:
        index = 0
        try:
            for index, job in enumerate(self.jobs):
                with self._cond:  # at most one shard ahead of the consumer: two on disk at a time
                    while index > self._consuming + 1 and not self._cancel.is_set():
                        self._cond.wait(1.0)
                if self._cancel.is_set():
                    return
                if job.remote is not None:
                    _event("download_start", index, job.name)
                    fetch_shard(self.source, job.remote, job.path, into_cache=not job.delete_after,
                                cancel=self._cancel)
                    _event("download_end", index, job.name)
                with self._cond:
                    self._ready[index] = job.path
                    self._cond.notify_all()
        except Cancelled:
            return
        except BaseException as err:  # handed to the consumer, which raises it in the loader's thread
            with self._cond:
                self._error = (index, err)
                self._cond.notify_all()


# -- one shard ------------------------------------------------------------------------------------------------
def fetch_shard(source: ModelSource, remote: RemoteFile, path: Path, *, into_cache: bool,
                cancel: threading.Event | None = None) -> Path:
    """Download one shard to `path`: into the HF cache (a blob plus the snapshot's link) or a plain file."""
    from huggingface_hub.utils import WeakFileLock

    cancel = cancel or threading.Event()
    if not into_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(source, remote, path.with_name(path.name + ".incomplete"), cancel)
        os.replace(path.with_name(path.name + ".incomplete"), path)
        return path
    if remote.etag is None:
        raise HubError(f"{source.label}: the Hub lists no checksum for {remote.name}; cannot verify it")
    storage = repo_folder(source.settings, source.repo_id)
    blob = storage / "blobs" / remote.etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = source.settings.cache_dir / ".locks" / storage.name / f"{remote.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock) if not blob.is_file() else nullcontext():  # the lock huggingface_hub takes too
        if not blob.is_file():
            partial = blob.with_name(blob.name + ".incomplete")
            _download(source, remote, partial, cancel)
            os.replace(partial, blob)
    _link(blob, path)
    return path


def _link(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, relative, as huggingface_hub makes it."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(pointer):
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:  # a file system without symlinks: a copy, as huggingface_hub falls back to
        shutil.copyfile(blob, pointer)


class _Digest:
    """The checksum the Hub publishes for a file: LFS sha256, else the git object id (sha1 of a blob header
    and the content)."""

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.kind = "sha256" if remote.sha256 else "git sha1" if remote.blob_id and remote.size is not None else None
        self.expected = remote.sha256 or remote.blob_id
        self.reset()

    def reset(self) -> None:
        if self.kind == "sha256":
            self.hash: Any = hashlib.sha256()
        elif self.kind == "git sha1":
            self.hash = hashlib.sha1(b"blob %d\0" % self.remote.size)
        else:
            self.hash = None

    def update(self, data: bytes) -> None:
        if self.hash is not None:
            self.hash.update(data)

    def update_from(self, file: Path, nbytes: int) -> None:
        with open(file, "rb") as fh:
            while nbytes > 0:
                chunk = fh.read(min(nbytes, 1 << 24))
                if not chunk:
                    break
                self.update(chunk)
                nbytes -= len(chunk)

    def matches(self) -> bool:
        return self.hash is None or self.hash.hexdigest() == self.expected


class _Writer:
    """The file object huggingface_hub's `http_get` writes to: hashes each chunk and stops on cancel."""

    def __init__(self, fh: BinaryIO, path: Path, digest: _Digest, cancel: threading.Event) -> None:
        self.fh, self.path, self.digest, self.cancel = fh, path, digest, cancel

    def write(self, chunk: bytes) -> int:
        if self.cancel.is_set():
            raise Cancelled()
        written = self.fh.write(chunk)
        self.digest.update(chunk)
        return written

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        """The server ignored the range and restarts from byte 0: the checksum restarts too."""
        self.fh.flush()
        kept = self.fh.truncate(size)
        self.digest.reset()
        self.digest.update_from(self.path, kept)
        return kept


def _download(source: ModelSource, remote: RemoteFile, partial: Path, cancel: threading.Event) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    settings, label, size = source.settings, f"{source.label}: {remote.name}", remote.size
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()
        have = 0
    _check_space(partial.parent, (size or 0) - have, label)
    digest = _Digest(remote)
    if have:
        digest.update_from(partial, have)
        logger.info("%s: resuming at %s of %s", label, format_bytes(have), format_bytes(size or 0))
    url = hf_hub_url(source.repo_id, remote.name, revision=source.commit, endpoint=settings.endpoint)
    try:
        with open(partial, "ab") as fh:
            http_get(url, _Writer(fh, partial, digest, cancel), resume_size=have,
                     headers=build_hf_headers(token=settings.token, library_name="qopt"), expected_size=size,
                     displayed_filename=remote.name, tqdm_class=silent_tqdm(source.progress))
    except Cancelled:
        raise
    except OSError as err:
        got = partial.stat().st_size if partial.exists() else 0
        if err.errno in _DISK_FULL:
            partial.unlink(missing_ok=True)
            raise DownloadError(f"{label}: the disk filled up at {partial.parent} after {format_bytes(got)} of "
                                f"{format_bytes(size or 0)}; the partial file was removed and nothing was "
                                f"published; free space there (or set HF_HUB_CACHE / cache_dir=) and run "
                                f"again") from None
        if size is not None and got != size:
            partial.unlink(missing_ok=True)
            raise DownloadError(f"{label}: truncated download ({got} of {size} bytes arrived); the partial file "
                                f"was removed; run again, or report a broken file if it repeats") from None
        raise DownloadError(f"{label}: cannot write {partial} ({err.strerror or err})") from None
    except Exception as err:
        if is_connection_error(err):
            got = partial.stat().st_size if partial.exists() else 0
            raise DownloadError(f"{label}: the connection to {settings.endpoint} failed after retries "
                                f"({type(err).__name__}); {format_bytes(got)} are kept, run again to resume") from None
        raise hub_error(err, source.repo_id, source.commit, settings, remote.name) from None
    got = partial.stat().st_size
    if size is not None and got != size:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{label}: truncated download ({got} of {size} bytes arrived); the partial file was "
                            f"removed; run again")
    if not digest.matches():
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{label}: checksum mismatch ({digest.kind} {digest.hash.hexdigest()[:16]}..., the Hub "
                            f"lists {digest.expected[:16]}...); the file was removed and nothing was published; "
                            f"run again, or report a corrupt file on the Hub if it repeats")


def _check_space(folder: Path, need: int, label: str) -> None:
    """Refuse a download that cannot fit before writing a byte of it."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(f"{label}: needs {format_bytes(need)} at {folder}, which has {format_bytes(free)} free; "
                            f"free space there, set HF_HUB_CACHE / cache_dir= to a larger disk, or pass "
                            f"keep_download=False (--no-keep-download) to keep at most two shards at a time")
