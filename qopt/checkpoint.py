"""Reading and writing HF checkpoints: index, shards, headers (validated before any long work), atomic saves."""
from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_ST_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
              "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
              "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
              "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1)}


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

    @property
    def largest_shard_bytes(self) -> int:
        return max(f.stat().st_size for f in self.shards)


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one shard's header against the file's size, so truncation is caught before loading."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{file}: corrupt safetensors header (declares {n} header bytes, "
                                      f"file has {size})")
            raw = fh.read(n)
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: corrupt safetensors header ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, itemsize = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor '{name}' has a malformed header entry {entry!r}") from None
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * itemsize or begin < 0:
            raise CheckpointError(f"{file}: tensor '{name}' header is inconsistent (shape {list(shape)}, "
                                  f"{entry['dtype']}, bytes {begin}..{end})")
        if end > data_size:
            raise CheckpointError(f"{file}: truncated: tensor '{name}' ends at byte {end} but the file holds "
                                  f"{data_size} data bytes")
        tensors[name] = TensorInfo(file, dtype, shape)
    return tensors, metadata


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index_file}: not a valid index (expected JSON with a 'weight_map' object)") from None
    return weight_map


def inspect_checkpoint(folder: str | os.PathLike) -> CheckpointFiles:
    """Find the weight files of a folder and validate index and headers."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if (folder / SAFE_INDEX).exists() or (folder / SAFE_WEIGHTS).exists():
        fmt = "safetensors"
        index_file, single = folder / SAFE_INDEX, folder / SAFE_WEIGHTS
    elif (folder / BIN_INDEX).exists() or (folder / BIN_WEIGHTS).exists():
        fmt = "bin"
        index_file, single = folder / BIN_INDEX, folder / BIN_WEIGHTS
    else:
        raise CheckpointError(f"{folder}: no weights found (expected {SAFE_WEIGHTS}, {SAFE_INDEX}, "
                              f"{BIN_WEIGHTS} or {BIN_INDEX})")
    weight_map = _read_index(index_file) if index_file.exists() else None
    shards = sorted({folder / f for f in weight_map.values()}) if weight_map else [single]
    for shard in shards:
        if not shard.exists():
            raise CheckpointError(f"{shard}: shard named in {index_file.name} is missing")
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    if fmt == "safetensors":
        for shard in shards:
            found, meta = read_safetensors_header(shard)
            tensors.update(found)
            metadata.update(meta)
        if weight_map:
            for name, file in weight_map.items():
                if name not in tensors or tensors[name].file.name != Path(file).name:
                    raise CheckpointError(f"{index_file}: tensor '{name}' is mapped to {file}, "
                                          f"but that shard does not contain it")
    return CheckpointFiles(folder, fmt, shards, tensors, metadata)


def iter_shard_tensors(files: CheckpointFiles, shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield one shard's tensors; safetensors are memory-mapped and each tensor read only when yielded."""
    if files.format == "bin":
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # pickle refusing code, zip corruption: the message names the file
            raise CheckpointError(f"{shard}: refused or unreadable with weights_only=True ({err})") from None
        for name in list(state):
            yield name, state.pop(name)
        return
    try:
        with safe_open(shard, framework="pt", device="cpu") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{shard}: cannot read ({err})") from None


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (small models and tests; `qopt.load` streams instead)."""
    files = inspect_checkpoint(folder)
    return {name: t for shard in files.shards for name, t in iter_shard_tensors(files, shard)}


# -- writing ------------------------------------------------------------------------------------------------
def parse_size(size: str | int) -> int:
    """'2GB', '500MiB', 1e9 -> bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise ValueError(f"size {size!r}: expected a number with a unit such as 500MB or 24GiB")


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


def publish_folder(tmp: Path, folder: Path) -> None:
    """Put a fully written folder in place of `folder` so a kill at any moment leaves one complete copy.

    Files of the old folder that the new one does not have (tokenizer files, a README) are carried over.
    """
    if folder.exists():
        for item in folder.iterdir():
            if not (tmp / item.name).exists() and not item.name.startswith("."):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        if _exchange(tmp, folder):
            shutil.rmtree(tmp)
            return
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old)
    else:
        os.rename(tmp, folder)


def staging_folder(folder: Path) -> Path:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


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
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    atomic_write_text(folder / f"{prefix}.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as HF writes it: tied lm_head left out, quantized modules in bitsandbytes' key layout."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        del state["lm_head.weight"]
    return state


def save_model(model: Any, folder: str | os.PathLike, max_shard_size: str | int = "2GB") -> None:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(folder)
    state = model_state_for_saving(model)
    config = model.config
    config.torch_dtype = str(model.dtype).removeprefix("torch.") if model.dtype.is_floating_point else None
    config.extra["architectures"] = [type(model).__name__]
    config.save_pretrained(tmp)
    write_safetensors_shards(state, tmp, max_shard_size)
    publish_folder(tmp, folder)


def normalize_key(name: str, has_prefix: bool) -> str:
    """Map a checkpoint key onto this model's names: fairseq-era files lack `model.`, OPTModel lacks it."""
    if has_prefix and name.startswith("decoder."):
        return "model." + name
    if not has_prefix and name.startswith("model.decoder."):
        return name[len("model."):]
    return name
