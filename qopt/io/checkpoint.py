"""Reading and writing HF checkpoints: index, shards, headers (validated before any long work), atomic saves."""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..utils import format_bytes, parse_size
from .atomic import atomic_write_text, give_default_mode

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# PEFT adapter folders (peft's own file names; qopt reads and writes the same)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
# Files beside the weights that belong to the checkpoint: copied into quantized copies, fetched with a Hub model.
AUXILIARY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
_ST_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
              "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
              "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
              "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1)}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_MAX_COUNT = 2**63 - 1  # dims and offsets torch can index


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


@dataclass
class CheckpointFiles:
    """What a checkpoint folder holds, known from headers alone: no tensor data has been read."""

    folder: Path
    format: str  # "safetensors" or "bin"
    shards: list[Path]
    tensors: dict[str, TensorInfo]  # empty for .bin (its shapes are only known after unpickling)
    metadata: dict[str, str]


def _load_json(text: str) -> Any:
    """json.loads that reports pathological nesting as the ValueError callers already handle."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\\ud800" escape: the safetensors library refuses it
        return False
    return True


def _header_entry(file: Path, name: str, entry: Any) -> tuple[TensorInfo, int, int]:
    """One tensor's header entry, checked as strictly as the safetensors library checks it."""
    if not _is_utf8(name):
        raise CheckpointError(f"{file}: tensor name {name!r:.80} is not valid UTF-8 text")
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{file}: tensor '{name}' has a malformed header entry {entry!r:.200} "
                              f"(expected dtype, shape and data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {dtype!r:.50} "
                              f"(expected one of {', '.join(_ST_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{file}: tensor '{name}' has shape {shape!r:.100}, expected a list of "
                              f"non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise CheckpointError(f"{file}: tensor '{name}' has data_offsets {offsets!r:.100}, expected two "
                              f"non-negative integers")
    torch_dtype, itemsize = _ST_DTYPES[dtype]
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(f"{file}: tensor '{name}' header is inconsistent: shape {shape} of {dtype} needs "
                              f"{math.prod(shape) * itemsize} bytes, data_offsets {begin}..{end} hold {end - begin}")
    return TensorInfo(file, torch_dtype, tuple(shape)), begin, end


def _check_coverage(file: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors must tile the data area exactly (no gap, no overlap, nothing after), as safetensors requires."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{file}: tensor '{name}' starts at data byte {begin}, expected {position} "
                                  f"(tensors overlap or leave a gap: corrupt header)")
        position = end
    if position != data_size:
        raise CheckpointError(f"{file}: {data_size - position} data bytes after the last tensor are not described "
                              f"by the header (corrupt file or appended data)")


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one shard's header against the file's size, so truncation is caught before loading."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > _MAX_HEADER:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file (its header declares {n} "
                                      f"bytes, the file has {size})")
            raw = fh.read(n)
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read ({err.strerror or err})") from None
    return parse_safetensors_header(file, raw, size)


def parse_safetensors_header(file: Path, raw: bytes, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Check a header's JSON (`raw`, without its 8-byte length) against a file of `size` bytes; a header read
    by HTTP range is checked exactly like one read from disk."""
    n = len(raw)
    try:
        header = _load_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, "
                              f"expected an object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) and _is_utf8(k + v) for k, v in metadata.items()):
        raise CheckpointError(f"{file}: corrupt safetensors header ('__metadata__' must map names to strings)")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        info, begin, end = _header_entry(file, name, entry)
        if end > data_size:
            raise CheckpointError(f"{file}: truncated: tensor '{name}' ends at byte {end} but the file holds "
                                  f"{data_size} data bytes")
        tensors[name] = info
        spans.append((begin, end, name))
    _check_coverage(file, spans, data_size)
    return tensors, metadata


def _is_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name and _is_utf8(name) \
        and Path(name).name == name


def read_index(index_file: Path) -> dict[str, str]:
    """The index's weight_map: each tensor name mapped to the name of a shard file inside the folder."""
    expected = "expected JSON with a 'weight_map' object of tensor name -> shard file name"
    try:
        index = _load_json(index_file.read_bytes().decode("utf-8"))
    except OSError as err:
        raise CheckpointError(f"{index_file}: cannot read ({err.strerror or err})") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{index_file}: not valid JSON ({err}); {expected}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: no 'weight_map' or an empty one; {expected}")
    for name, shard in weight_map.items():
        if not _is_file_name(shard):
            raise CheckpointError(f"{index_file}: tensor '{name}' is mapped to {shard!r:.100}, expected the name "
                                  f"of a shard file inside the folder")
    return weight_map


def weights_layout(has: Callable[[str], bool], where: str) -> tuple[str, str, str]:
    """(format, index name, single-file name) of a checkpoint whose files `has` knows: a folder, or a Hub repo's
    file list before anything is downloaded. safetensors win over .bin, as in transformers."""
    if has(SAFE_INDEX) and has(SAFE_WEIGHTS):
        # transformers reads the single file, an index-first reader the shards: one of them is stale
        raise CheckpointError(f"{where}: holds both {SAFE_WEIGHTS} and {SAFE_INDEX}, so it is unclear which "
                              f"weights are current; remove the stale one")
    if has(SAFE_INDEX) or has(SAFE_WEIGHTS):
        return "safetensors", SAFE_INDEX, SAFE_WEIGHTS
    if has(BIN_INDEX) or has(BIN_WEIGHTS):
        return "bin", BIN_INDEX, BIN_WEIGHTS
    raise CheckpointError(f"{where}: no weights found (expected {SAFE_WEIGHTS}, {SAFE_INDEX}, "
                          f"{BIN_WEIGHTS} or {BIN_INDEX})")


def inspect_checkpoint(folder: str | os.PathLike, shard_path: Callable[[str], Path] | None = None,
                       read_header: Callable[[Path], tuple[dict[str, TensorInfo], dict[str, str]]] | None = None,
                       elsewhere: Collection[str] = ()) -> CheckpointFiles:
    """Find the weight files of a folder and validate index and every header before any tensor is read.

    For a streamed download, `elsewhere` names weight files not in the folder yet, `shard_path` maps a shard's
    file name to where it will be once fetched and `read_header` reads its header from where it is now.
    """
    folder = Path(folder)
    read_header = read_header or read_safetensors_header
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    fmt, index_name, single_name = weights_layout(lambda name: (folder / name).exists() or name in elsewhere,
                                                  str(folder))
    index_file, single = folder / index_name, folder / single_name
    weight_map = read_index(index_file) if index_file.exists() else None
    locate = shard_path or (lambda name: folder / name)
    shards = sorted({locate(f) for f in weight_map.values()}) if weight_map else [locate(single.name)]
    for shard in shards:
        if shard_path is None and not shard.is_file():
            named_by = index_file.name if weight_map else "the folder's layout"
            raise CheckpointError(f"{shard}: shard named by {named_by} is missing")
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    if fmt == "safetensors":
        for shard in shards:
            found, meta = read_header(shard)
            twice = next(iter(found.keys() & tensors.keys()), None)
            if twice is not None:
                raise CheckpointError(f"{shard}: tensor '{twice}' is also in {tensors[twice].file.name}")
            tensors.update(found)
            metadata.update(meta)
        for name, file in (weight_map or {}).items():
            if name not in tensors or tensors[name].file.name != file:
                raise CheckpointError(f"{index_file}: tensor '{name}' is mapped to {file}, "
                                      f"but that shard does not contain it")
    return CheckpointFiles(folder, fmt, shards, tensors, metadata)


def check_tensor_shapes(files: CheckpointFiles, expected: Mapping[str, Sequence[int]],
                        rename: Callable[[str], str] = str) -> None:
    """Compare header shapes and dtypes with the model's before any tensor data is read.

    `expected` maps the model's names of floating-point tensors to their shapes; `rename` maps a checkpoint
    key onto those names (e.g. `normalize_key`). Keys the model does not expect are left to the loader.
    """
    for raw_name, info in files.tensors.items():
        shape = expected.get(rename(raw_name))
        if shape is None:
            continue
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor '{raw_name}' has shape {list(info.shape)}, "
                                  f"config.json implies {list(shape)}")
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor '{raw_name}' has dtype {info.dtype}, expected a float")


def _detail(err: BaseException) -> str:
    """The line of a torch.load error that says what went wrong, without torch's advice to load unsafely."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in str(err).replace("WeightsUnpickler error:", "\n").splitlines()]
    lines = [line for line in lines if line and not line.startswith(boilerplate)]
    line = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)
    return line.split(". ")[0].rstrip(".")


def mem_available() -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable, bytes); None off Linux."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_legacy_bin(shard: Path, host_bytes: int = 0) -> bool:
    """Whether `shard` is a zip archive torch.load can memory-map. A legacy (pre-torch-1.6, non-zip) `.bin` cannot
    be mapped: torch.load reads it whole into anonymous memory beside the `host_bytes` the load still has to keep
    in host RAM. Over MemAvailable that is an out-of-memory kill halfway through a long load, so it fails here in
    one line; under it, one warning says what it costs."""
    if zipfile.is_zipfile(shard):
        return True
    size = shard.stat().st_size
    available = mem_available()
    fix = "convert it to safetensors, or to a zip .bin (torch.load it and torch.save it again with torch>=1.6)"
    if available is not None and size + host_bytes > available:
        raise CheckpointError(f"{shard}: a legacy (non-zip) .bin is read whole into RAM: {format_bytes(size)} + "
                              f"{format_bytes(host_bytes)} of weights still to load into host RAM exceeds the "
                              f"{format_bytes(available)} available; {fix}")
    logger.warning("%s: a legacy (non-zip) .bin cannot be memory-mapped: reading it whole costs %s of RAM "
                   "(beside %s of weights still to load; %s available); %s", shard, format_bytes(size),
                   format_bytes(host_bytes), "unknown" if available is None else format_bytes(available), fix)
    return False


def _load_bin(shard: Path, host_bytes: int = 0) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that would run code is refused, never executed. A zip `.bin`
    is memory-mapped; a legacy one is checked against MemAvailable first (`check_legacy_bin`)."""
    mappable = check_legacy_bin(shard, host_bytes)
    try:
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=mappable)
    except Exception as err:  # refused globals, zip or pickle corruption
        detail = _detail(err)
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in detail:
            raise CheckpointError(f"{shard}: refused: its pickle would run code or build objects other than "
                                  f"tensors ({detail}); qopt reads .bin files only with torch.load(weights_only="
                                  f"True), convert a trusted copy to safetensors") from None
        raise CheckpointError(f"{shard}: unreadable .bin file ({detail})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{shard}: expected a dict of tensor name -> tensor, got {type(state).__name__}")
    return state


def iter_shard_tensors(files: CheckpointFiles, shard: Path, select: Callable[[str], bool] | None = None,
                       host_bytes: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield one shard's tensors (those whose file names `select` accepts); safetensors are memory-mapped and
    each tensor read only when yielded, so unselected ones are never read. `host_bytes`: what the caller still
    has to keep in host RAM, weighed with a legacy `.bin` that must be read whole."""
    if files.format == "bin":
        state = _load_bin(shard, host_bytes)
        for name in list(state):
            tensor = state.pop(name)
            if select is None or select(name):
                yield name, tensor
        return
    try:
        with safe_open(shard, framework="pt", device="cpu") as fh:
            for name in fh.keys():
                if select is None or select(name):
                    yield name, fh.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{shard}: cannot read ({_detail(err)})") from None


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (small models and tests; `qopt.load` streams instead)."""
    files = inspect_checkpoint(folder)
    return {name: t for shard in files.shards for name, t in iter_shard_tensors(files, shard)}


def normalize_key(name: str, has_prefix: bool) -> str:
    """Map a checkpoint key onto this model's names: fairseq-era files lack `model.`, OPTModel lacks it."""
    if has_prefix and name.startswith("decoder."):
        return "model." + name
    if not has_prefix and name.startswith("model.decoder."):
        return name[len("model."):]
    return name


# -- writing ------------------------------------------------------------------------------------------------
def write_safetensors_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int = "2GB",
                             prefix: str = "model", metadata: dict[str, str] | None = None) -> None:
    """Write `state` as one file or as numbered shards plus an index, the way transformers names them."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.detach().contiguous().cpu()
        sizes[-1] += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{prefix}.safetensors"), metadata=meta)
        give_default_mode(folder / f"{prefix}.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        give_default_mode(folder / name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    atomic_write_text(folder / f"{prefix}.safetensors.index.json", json.dumps(index, indent=2) + "\n")
