"""Output folders checked before any work starts: never the input, never an existing model unless asked, writable.

Every command that writes a folder (quantize, calibrate, fine-tune) calls `check_output_folder` first, so a
mistyped path fails in a second with one line, not after an hour of work or, worse, after the input has been
swapped out: a save publishes the new folder in place of the old one (`qopt.io.atomic.publish_folder`), so an
output that is the source, contains it or sits inside it would replace or pollute the very files being read.
Paths are compared after resolving symlinks and `..`, so no spelling of the source slips through.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..bundled import data_dir
from ..errors import OutputError
from .atomic import holds_model

_STAGING_EXTRA = len("..tmp-") + 10  # what staging_folder adds to a name: dots, ".tmp-" and a pid


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _relation(out: Path, source: Path) -> str | None:
    """How `out` overlaps `source` (both resolved): the same folder, inside it, or containing it."""
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "contains"
    return None


def _probe(folder: Path, what: str, shown: Path) -> None:
    """Create and remove a hidden folder in `folder`: the one test that permissions, ACLs, read-only mounts and
    root all answer truthfully."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qopt-probe-", dir=folder))
    except OSError as err:
        raise OutputError(f"{what} {shown}: cannot write in {folder} ({err.strerror or err})") from None


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Raise a one-line OutputError unless `folder` can be created (or, if it exists, written and replaced)."""
    shown = Path(folder)
    try:
        real = _real(folder)
        if real.exists() and not real.is_dir():
            raise OutputError(f"{what} {shown}: {real} is a file, expected a folder")
        ancestor = real.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"{what} {shown}: {ancestor} is a file, so no folder can be made under it")
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
        for part in real.relative_to(ancestor).parts:  # the staging sibling adds ".", ".tmp-" and a pid
            if len(os.fsencode(part)) + _STAGING_EXTRA > name_max:
                raise OutputError(f"{what} {shown}: the name {part[:40]!r}... is too long for {ancestor} "
                                  f"(at most {name_max - _STAGING_EXTRA} bytes here)")
    except OSError as err:
        raise OutputError(f"{what} {shown}: {err.strerror or err}") from None
    _probe(ancestor, what, shown)  # where the staging sibling goes
    if real.is_dir():
        _probe(real, what, shown)  # fine-tuning writes its checkpoint inside
    return real


def check_output_folder(out: str | os.PathLike, sources: Sequence[str | os.PathLike] = (), *,
                        overwrite: bool = False, adapter: bool = False, what: str = "output folder") -> Path:
    """Refuse, before any work, an output that overlaps an input or qopt's shipped data, an existing model
    without `overwrite` (the message names "{option}", which the CLI spells `--force`), or a path that cannot be
    written. `adapter=True` (fine-tuning): an earlier adapter there is expected (it is resumed or replaced), but
    a full model (config.json) is refused whatever `overwrite` says, as the adapter save would drop its weights."""
    shown = Path(out)
    real = _real(out)
    for source in sources:
        relation = _relation(real, _real(source))
        if relation:
            raise OutputError(f"{what} {shown} {relation} the input {source}: writing there would replace or "
                              f"mix with the files being read; choose another folder")
    if _relation(real, _real(data_dir())):
        raise OutputError(f"{what} {shown} overlaps qopt's shipped data ({data_dir()}): the bundled model and "
                          f"tokenizer are never written; choose another folder")
    check_writable(out, what)
    if adapter:
        if (real / "config.json").is_file():
            raise OutputError(f"{what} {shown} holds a model (config.json), which an adapter saved there "
                              f"would replace; choose another folder")
        return real
    try:
        existing = holds_model(real)
    except OSError as err:
        raise OutputError(f"{what} {shown}: cannot list it ({err.strerror or err})") from None
    if existing and not overwrite:
        raise OutputError(f"{what} {shown} already holds a model ({existing}); pass {OutputError.PLACEHOLDER} "
                          f"to replace it", "overwrite=True")
    return real
