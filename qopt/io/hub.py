"""Models by their Hub name: a local folder stays a folder; any other id (`facebook/opt-125m`) resolves through
huggingface_hub, from its cache when the cache holds it and from the Hub when downloads are allowed.

Files only, no model knowledge. Resolving fetches metadata and the small files (config.json, the index, the
tokenizer files) into the HF cache; the shards are fetched later, one after another, by `ShardDownloader`
(`qopt/io/download.py`) while the loader consumes them.

huggingface_hub reads HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT once, when it is imported.
`HubSettings.from_env` reads them at every call and qopt passes endpoint, token and cache folder to
huggingface_hub explicitly, so a variable set after the first import still applies.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, HubAccessError, HubError, HubOfflineError
from .atomic import atomic_write_text
from .checkpoint import (
    AUXILIARY_FILES,
    CheckpointFiles,
    TensorInfo,
    inspect_checkpoint,
    parse_safetensors_header,
    read_index,
    read_safetensors_header,
    weights_layout,
)

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}
_HEADER_PROBE = 100_000  # first range request: the 8-byte length and, for nearly every shard, the whole header
_TIMEOUT = 10.0


@dataclass(frozen=True)
class HubSettings:
    """Where and how to reach the Hub, read from the environment when a model is resolved."""

    endpoint: str
    cache_dir: Path
    token: str | bool  # False: anonymous
    offline: bool
    offline_reason: str = ""

    @classmethod
    def from_env(cls, token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                 local_files_only: bool = False) -> HubSettings:
        env = os.environ
        home = Path(os.path.expandvars(env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache",
                                                                           "huggingface"))).expanduser()
        cache = cache_dir or env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or home / "hub"
        if token is None or token is True:
            found = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or \
                _read_token(Path(os.path.expandvars(env.get("HF_TOKEN_PATH") or str(home / "token"))).expanduser())
            if token is True and not found:
                raise HubAccessError("token=True, but no token is set: set HF_TOKEN, log in with `hf auth login`, "
                                     "or pass the token itself")
            token = found or False
        env_offline = next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                            if env.get(name, "").upper() in _TRUE), None)
        reason = "local_files_only=True" if local_files_only else f"{env_offline}=1" if env_offline else ""
        return cls((env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
                   Path(os.path.expandvars(str(cache))).expanduser(), token, bool(reason), reason)


def _read_token(file: Path) -> str | None:
    try:
        return file.read_text().strip() or None
    except OSError:
        return None


def is_hub_id(name: str | os.PathLike) -> bool:
    """True for a name that is not an existing path and that the Hub accepts as a model id (`org/name`)."""
    text = os.fspath(name)
    if not text or Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def repo_folder(settings: HubSettings, repo_id: str) -> Path:
    """The repo's folder in the HF cache (models--org--name), the layout huggingface_hub and transformers share."""
    from huggingface_hub.file_download import repo_folder_name

    return settings.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub repo at a commit, as the Hub's file listing describes it."""

    name: str
    size: int | None
    sha256: str | None = None  # LFS files: the checksum the Hub publishes
    blob_id: str | None = None  # the git object id (sha1 of "blob <size>\\0" + content)

    @property
    def etag(self) -> str | None:
        """The blob's name in the HF cache: the LFS sha256, else the git object id."""
        return self.sha256 or self.blob_id


@dataclass
class ModelSource:
    """A model to load: a local folder, or a Hub repo pinned to one commit whose small files are in the cache."""

    name: str  # what the caller passed; becomes the model's `name_or_path`
    folder: Path  # holds config.json (for a Hub model: the snapshot folder in the HF cache)
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    files: dict[str, RemoteFile] = field(default_factory=dict)  # empty when resolved from the cache alone
    settings: HubSettings | None = None
    keep_download: bool = True
    progress: bool = True

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.commit[:8]}" if self.is_hub and self.commit else str(self.folder)

    def shard_names(self) -> tuple[str, list[str]]:
        """(format, shard file names) from the index or the single weights file, without reading any shard."""
        fmt, index_name, single = weights_layout(lambda n: (self.folder / n).exists() or n in self.files,
                                                 self.label)
        index = self.folder / index_name
        if index.exists():
            return fmt, sorted(set(read_index(index).values()))
        return fmt, [single]

    def missing_shards(self) -> list[str]:
        """Shards not yet in the folder (always empty for a local folder)."""
        return [n for n in self.shard_names()[1] if not (self.folder / n).is_file()] if self.is_hub else []

    def checkpoint(self) -> CheckpointFiles:
        """Index and every shard header, validated before any weight is read or downloaded: headers of shards
        still on the Hub are read by HTTP range."""
        if not self.missing_shards():
            return inspect_checkpoint(self.folder)
        unknown = [n for n in self.missing_shards() if n not in self.files]
        if unknown:
            raise HubError(f"{self.label}: the index names {unknown[0]}, which the repo does not have "
                           f"(a broken upload); try another revision")
        return inspect_checkpoint(self.folder, shard_path=lambda name: self.folder / name,
                                  read_header=self._header, elsewhere=self.files.keys())

    def _header(self, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        if path.is_file():
            return read_safetensors_header(path)
        remote = self.files[path.name]
        return parse_safetensors_header(path, remote_header(self, remote), remote.size or 0)

    def fetch_shards(self, files: CheckpointFiles) -> Any:
        """The shards of `files` in order, each one downloaded while the previous one is consumed."""
        from .download import ShardDownloader

        return ShardDownloader(self, files.shards)

    def download(self) -> Path:
        """Every shard into the HF cache (nothing to do when all are there); returns the complete folder."""
        if self.is_hub and self.missing_shards():
            from .download import ShardDownloader

            with ShardDownloader(self, self.checkpoint().shards, keep_download=True) as shards:
                for _ in shards:
                    pass
        return self.folder


# -- resolving ------------------------------------------------------------------------------------------------
def resolve_model(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                  cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                  keep_download: bool = True, progress: bool = True) -> ModelSource:
    """A local folder as it is; a Hub id pinned to a commit, its config and index in the HF cache.

    Online, one API call names the commit and its files (a model already in the cache then needs nothing
    else). Offline (HF_HUB_OFFLINE, `local_files_only`, or the Hub unreachable) the cache alone answers.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r}: {text} is a local folder; a revision applies to Hub ids only")
        return ModelSource(text, path, progress=progress)
    if not is_hub_id(text):  # a ConfigError, as for a folder without config.json
        raise ConfigError(f"{text}: no such checkpoint folder (no config.json found), and not a Hub model id such "
                          f"as facebook/opt-125m")
    settings = HubSettings.from_env(token, cache_dir, local_files_only)
    revision = revision or "main"
    if settings.offline:
        return _from_cache(text, revision, settings, f"downloads are off ({settings.offline_reason})",
                           keep_download, progress)
    return _from_hub(text, revision, settings, keep_download, progress)


def cached_folder(name_or_path: str | os.PathLike, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder a local path or a cached Hub model is in, without any network call; None if neither."""
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.exists():
        return path
    if not is_hub_id(path):
        return None
    settings = HubSettings.from_env(False, cache_dir)
    storage = repo_folder(settings, os.fspath(name_or_path))
    commit = _cached_commit(storage, revision or "main")
    folder = storage / "snapshots" / commit if commit else None
    return folder if folder is not None and folder.is_dir() else None


def model_name(name_or_path: str | os.PathLike) -> str:
    """The repo id a snapshot folder of the HF cache belongs to (…/models--org--name/snapshots/<commit>), so a
    model loaded from its cached folder and one loaded by its id have the same name; other names unchanged."""
    parts = Path(os.fspath(name_or_path)).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return os.fspath(name_or_path)


def _from_hub(repo: str, revision: str, settings: HubSettings, keep: bool, progress: bool) -> ModelSource:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        info = HfApi(endpoint=settings.endpoint, token=settings.token, library_name="qopt").model_info(
            repo, revision=revision, files_metadata=True, timeout=_TIMEOUT)
    except OfflineModeIsEnabled:
        return _from_cache(repo, revision, settings, "huggingface_hub was imported with HF_HUB_OFFLINE set", keep,
                           progress)
    except Exception as err:
        if is_connection_error(err):
            return _from_cache(repo, revision, settings, f"{settings.endpoint} cannot be reached "
                               f"({type(err).__name__})", keep, progress)
        raise hub_error(err, repo, revision, settings) from None
    commit = info.sha
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise HubError(f"{repo}: {settings.endpoint} named no commit for revision {revision!r}; is HF_ENDPOINT a "
                       f"Hugging Face Hub?")
    files = {s.rfilename: RemoteFile(s.rfilename, s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None,
                                     s.blob_id) for s in info.siblings or []}
    label = f"{repo}@{commit[:8]}"
    if CONFIG_FILE not in files:
        raise HubError(f"{label}: not an OPT checkpoint (the repo has no config.json); qopt loads OPT models "
                       f"(facebook/opt-125m ... facebook/opt-66b) or a local checkpoint folder")
    try:
        fmt, index_name, single = weights_layout(files.__contains__, label)
    except CheckpointError as err:
        raise HubError(f"{err}; not a loadable OPT checkpoint") from None
    storage = repo_folder(settings, repo)
    for name in (CONFIG_FILE, index_name, *AUXILIARY_FILES):
        if name in files:
            fetch_small_file(repo, name, commit, settings)
    if revision != commit:
        _write_ref(storage, revision, commit)
    folder = storage / "snapshots" / commit
    check_opt_config(folder / CONFIG_FILE, label)
    logger.info("%s: commit %s, %s weights", repo, commit, fmt)
    return ModelSource(repo, folder, repo, revision, commit, files, settings, keep, progress)


def _from_cache(repo: str, revision: str, settings: HubSettings, reason: str, keep: bool,
                progress: bool) -> ModelSource:
    storage = repo_folder(settings, repo)
    commit = _cached_commit(storage, revision)
    folder = storage / "snapshots" / commit if commit else None
    if folder is None or not (folder / CONFIG_FILE).is_file():
        where = f"{storage}/refs/{revision}" if not _COMMIT.fullmatch(revision) else f"{storage}/snapshots/{revision}"
        raise HubOfflineError(f"{repo}: {reason}, and the Hugging Face cache holds no copy of revision {revision!r} "
                              f"(looked for {where}); run once with network access, point HF_HUB_CACHE / "
                              f"cache_dir= at the cache that holds it, or pass the path of a local checkpoint "
                              f"folder instead of the id")
    source = ModelSource(repo, folder, repo, revision, commit, {}, settings, keep, progress)
    try:
        missing = source.missing_shards()
    except CheckpointError:
        missing = ["the weights"]
    if missing:
        raise HubOfflineError(f"{source.label}: {reason}, and the cached copy in {folder} is incomplete (missing "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); run once with "
                              f"network access to finish the download")
    check_opt_config(folder / CONFIG_FILE, source.label)
    return source


def _cached_commit(storage: Path, revision: str) -> str | None:
    if _COMMIT.fullmatch(revision):
        return revision
    try:
        commit = (storage / "refs" / revision).read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """refs/<revision> -> commit, so the next offline run finds this snapshot (as huggingface_hub records it)."""
    ref = storage / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ref, commit)
    except OSError as err:  # a read-only cache still loads; only the offline shortcut is lost
        logger.warning("%s: cannot record revision %s (%s)", storage, revision, err)


def check_opt_config(file: Path, label: str) -> None:
    """Refuse a repo that is not OPT before any weight is fetched."""
    try:
        data = json.loads(file.read_bytes())
    except (OSError, ValueError) as err:
        raise HubError(f"{label}: config.json is unreadable ({err})") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type != "opt":
        raise HubError(f"{label}: not an OPT checkpoint (config.json has model_type {model_type!r}); qopt loads "
                       f"OPT models only")


# -- talking to the Hub through huggingface_hub ---------------------------------------------------------------
def fetch_small_file(repo: str, name: str, commit: str, settings: HubSettings) -> Path:
    """A small file into the HF cache with huggingface_hub itself (no request when it is already there)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name, revision=commit, cache_dir=str(settings.cache_dir),
                                    token=settings.token, endpoint=settings.endpoint, library_name="qopt",
                                    tqdm_class=silent_tqdm()))
    except Exception as err:
        raise hub_error(err, repo, commit, settings, name) from None


def remote_header(source: ModelSource, remote: RemoteFile) -> bytes:
    """A safetensors shard's header bytes (without the 8-byte length) by HTTP range: one request for nearly
    every shard, two when the header is larger than the first probe."""
    import struct

    assert source.repo_id and source.commit and source.settings
    first = _range(source, remote, 0, min(_HEADER_PROBE, remote.size or _HEADER_PROBE) - 1)
    if len(first) < 8:
        raise HubError(f"{source.label}: {remote.name} is truncated on the Hub ({len(first)} bytes, no header)")
    (n,) = struct.unpack("<Q", first[:8])
    if n > (remote.size or 0) - 8:
        raise HubError(f"{source.label}: {remote.name} is truncated or corrupt on the Hub (its header declares {n} "
                       f"bytes, the file has {remote.size})")
    return first[8:8 + n] if 8 + n <= len(first) else _range(source, remote, 8, 8 + n - 1)


def _range(source: ModelSource, remote: RemoteFile, start: int, end: int) -> bytes:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    settings = source.settings
    url = hf_hub_url(source.repo_id, remote.name, revision=source.commit, endpoint=settings.endpoint)
    headers = build_hf_headers(token=settings.token, library_name="qopt")
    headers["Range"] = f"bytes={start}-{end}"
    try:
        response = http_backoff("GET", url, headers=headers, timeout=_TIMEOUT, max_retries=3)  # retries a cut
        hf_raise_for_status(response)
    except Exception as err:
        if is_connection_error(err):
            raise HubError(f"{source.label}: {settings.endpoint} cannot be reached while reading the header of "
                           f"{remote.name} ({type(err).__name__}); check the network and run again") from None
        raise hub_error(err, source.repo_id, source.commit, settings, remote.name) from None
    return response.content


def is_connection_error(err: BaseException) -> bool:
    """No HTTP answer came (refused, cut or timed out): an error of huggingface_hub's HTTP library that is not
    an HTTP status, told apart through `huggingface_hub.errors.HTTPError` (that library's base class), so
    qopt depends on no HTTP library by name."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    return isinstance(err, HTTPError) and not isinstance(err, HfHubHTTPError) \
        and getattr(err, "response", None) is None


def hub_error(err: BaseException, repo: str, revision: str | None, settings: HubSettings,
              file: str | None = None) -> Exception:
    """huggingface_hub's exception as one qopt line that names the repo and says what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(err, "response", None), "status_code", None)
    auth = "pass token= or set HF_TOKEN" if not settings.token else "the token given has no access"
    if isinstance(err, LocalEntryNotFoundError):
        return HubOfflineError(f"{repo}: {file} could not be fetched from {settings.endpoint} (unreachable) and is "
                               f"not in the cache at {settings.cache_dir}; check the network and run again")
    if isinstance(err, GatedRepoError):
        return HubAccessError(f"{repo}: gated repo; accept its conditions at {settings.endpoint}/{repo} and use a "
                              f"token of that account ({auth})")
    if isinstance(err, RepositoryNotFoundError):
        return HubAccessError(f"{repo}: no such model repo on {settings.endpoint}, or a private one ({auth}); check "
                              f"the id, or pass the path of a local checkpoint folder")
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"{repo}: revision {revision!r} does not exist; give a branch, tag or commit hash of the "
                        f"repo (default: main)")
    if isinstance(err, EntryNotFoundError):
        return HubError(f"{repo}@{(revision or '')[:8]}: file {file} is not in the repo at this revision")
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        return HubAccessError(f"{repo}: unauthorized (HTTP {status}) at {settings.endpoint}; {auth}")
    if isinstance(err, HfHubHTTPError):
        return HubError(f"{repo}: {settings.endpoint} answered HTTP {status} for {file or 'the model info'}; try "
                        f"again later")
    if isinstance(err, (HubError, ValueError)):
        return err
    return HubError(f"{repo}: {file or 'model info'} could not be fetched from {settings.endpoint} "
                    f"({type(err).__name__}: {err})")


def silent_tqdm(enabled: bool = False) -> Any:
    """A tqdm class for huggingface_hub's progress bars: disabled unless `enabled` (None: its default)."""
    if enabled:
        return None
    from tqdm.auto import tqdm

    class _Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent



def checkpoint_folder(name_or_path: str | os.PathLike, *, revision: str | None = None,
                      token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                      local_files_only: bool = False, progress: bool = True) -> Path:
    """A complete checkpoint folder: a local one as it is, a Hub model downloaded (verified) into the HF cache.
    For the stages that read a checkpoint more than once (calibration, precision comparisons)."""
    return resolve_model(name_or_path, revision=revision, token=token, cache_dir=cache_dir,
                         local_files_only=local_files_only, progress=progress).download()
