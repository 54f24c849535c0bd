"""Crash-safe publishing: a file or a whole folder appears complete or not at all, whatever kills the writer.

A set of shards cannot be renamed into place one by one without a moment where old and new shards mix, so a
folder is written as a hidden sibling and swapped in with one rename (Linux `renameat2(RENAME_EXCHANGE)`), or a
rename pair where the exchange is unavailable. Staging left by a killed writer is recognised by its pid suffix.
"""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) == 0


def _is_weights_file(name: str) -> bool:
    """Files a save owns: carrying them over from an older copy would mix two checkpoints."""
    return name.endswith((".safetensors", ".bin", ".index.json")) or name == "config.json"


def holds_model(folder: Path) -> str | None:
    """The name of a file that a save into `folder` would replace (a model's or an adapter's), or None."""
    if not folder.is_dir():
        return None
    return next((item.name for item in sorted(folder.iterdir()) if _is_weights_file(item.name)), None)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set and return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: Path) -> None:
    """Files that a library writes through a private temp file (safetensors does) come out 0600; give them the
    mode a plain open() would (0644 under the usual umask), so a shared model folder is readable by others."""
    os.chmod(path, 0o666 & ~_umask())


def _fsync_tree(folder: Path) -> None:
    """Flush the staged files so a power loss after the swap cannot leave empty files behind."""
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_folder(tmp: Path, folder: Path) -> None:
    """Put a fully written folder in place of `folder` so a kill at any moment leaves one complete copy.

    Other files of the old folder (tokenizer files, a README) are carried over; its weight files are not.
    """
    if folder.exists():
        for item in folder.iterdir():
            if not (tmp / item.name).exists() and not item.name.startswith(".") \
                    and not _is_weights_file(item.name):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        _fsync_tree(tmp)
        if _exchange(tmp, folder):
            shutil.rmtree(tmp)
            return
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old)
    else:
        _fsync_tree(tmp)
        os.rename(tmp, folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_folder(folder: Path) -> Path:
    """A fresh sibling folder to write into; staging left by killed saves of this folder is removed."""
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    return tmp
