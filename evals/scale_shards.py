"""OPT-shaped `.bin` checkpoints that exist only as a recipe: every byte of every shard can be regenerated on demand,
so the Hub stand-in can serve a 60 GB model without a shard file on disk.

Weights follow OPT's init (normal, std 0.02; LayerNorm weights 1, biases 0) in float16, under the key names
transformers' OPTForCausalLM saves ("model.decoder.layers.N.self_attn.q_proj.weight", ...; the tied `lm_head.weight`
is not saved, as save_pretrained drops it). Each tensor's bytes come from chunks of 4 Mi values, each drawn from a
torch generator seeded by (seed, shard, tensor, chunk), so any byte range is regenerated without the bytes before it.

A shard is laid out as torch.save writes a zip archive: the pickle from torch's own `_save` (run under
`torch.serialization.skip_data()` against a recording writer, so no tensor byte is touched), stored records aligned
to 64 bytes with torch's "FB" padding field, data descriptors after each record (flag 0x08, as torch writes them),
and a zip64 central directory. The sizes, sha256 and per-record CRC32s are computed once by streaming and cached
(`manifest`), keyed by shape, seed and torch version.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

CHUNK = 1 << 22  # values per generated chunk (8 MiB of float16)
ALIGN = 64  # torch's storage alignment inside the archive
CACHE = Path(os.environ.get("QOPT_BENCH_CACHE", Path.home() / ".cache" / "qopt-bench"))
_STD = 0.02


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    fill: str  # "normal", "ones" or "zeros"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return 2 * self.numel


def hf_tensors(config: dict) -> list[TensorSpec]:
    """The state dict transformers' OPTForCausalLM saves for `config`, in its order (tied lm_head left out)."""
    h, f, v, p = config["hidden_size"], config["ffn_dim"], config["vocab_size"], config["max_position_embeddings"]
    e = config.get("word_embed_proj_dim") or h
    d = "model.decoder."
    specs = [TensorSpec(d + "embed_tokens.weight", (v, e), "normal"),
             TensorSpec(d + "embed_positions.weight", (p + 2, h), "normal")]
    if e != h:
        specs += [TensorSpec(d + "project_out.weight", (e, h), "normal"),
                  TensorSpec(d + "project_in.weight", (h, e), "normal")]
    specs += [TensorSpec(d + "final_layer_norm.weight", (h,), "ones"),
              TensorSpec(d + "final_layer_norm.bias", (h,), "zeros")]
    for i in range(config["num_hidden_layers"]):
        layer = f"{d}layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            specs += [TensorSpec(f"{layer}self_attn.{proj}.weight", (h, h), "normal"),
                      TensorSpec(f"{layer}self_attn.{proj}.bias", (h,), "zeros")]
        specs += [TensorSpec(f"{layer}self_attn_layer_norm.weight", (h,), "ones"),
                  TensorSpec(f"{layer}self_attn_layer_norm.bias", (h,), "zeros"),
                  TensorSpec(f"{layer}fc1.weight", (f, h), "normal"), TensorSpec(f"{layer}fc1.bias", (f,), "zeros"),
                  TensorSpec(f"{layer}fc2.weight", (h, f), "normal"), TensorSpec(f"{layer}fc2.bias", (h,), "zeros"),
                  TensorSpec(f"{layer}final_layer_norm.weight", (h,), "ones"),
                  TensorSpec(f"{layer}final_layer_norm.bias", (h,), "zeros")]
    return specs


def split_shards(specs: list[TensorSpec], count: int) -> list[list[TensorSpec]]:
    """`count` shards of about equal bytes, tensors in order (as transformers' max_shard_size split does)."""
    total = sum(s.nbytes for s in specs)
    shards: list[list[TensorSpec]] = [[] for _ in range(count)]
    done = 0
    for spec in specs:
        shards[min(count - 1, done * count // total)].append(spec)
        done += spec.nbytes
    if any(not s for s in shards):
        raise ValueError(f"{count} shards for {len(specs)} tensors leaves one empty")
    return shards


def chunk_bytes(seed: int, shard: int, tensor: int, spec: TensorSpec, chunk: int) -> bytes:
    """Bytes of values [chunk * CHUNK, ...) of one tensor: the same whenever asked."""
    n = min(CHUNK, spec.numel - chunk * CHUNK)
    if spec.fill != "normal":
        return (torch.ones if spec.fill == "ones" else torch.zeros)(n, dtype=torch.float16).numpy().tobytes()
    mixed = int.from_bytes(hashlib.sha256(f"{seed}/{shard}/{tensor}/{chunk}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(mixed)
    return torch.empty(n, dtype=torch.float16).normal_(0.0, _STD, generator=generator).numpy().tobytes()


def tensor_value(seed: int, shard: int, tensor: int, spec: TensorSpec) -> torch.Tensor:
    """The whole tensor (tests: compare with what torch.load reads from a served shard)."""
    data = b"".join(chunk_bytes(seed, shard, tensor, spec, c) for c in range(math.ceil(spec.numel / CHUNK)))
    return torch.frombuffer(bytearray(data), dtype=torch.float16).reshape(spec.shape)


class _RecordingWriter:
    """What torch.serialization._save writes, minus the storage bytes (skip_data): records in order."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | int]] = []

    def write_record(self, name: str, data: bytes | str, nbytes: int) -> None:
        self.records.append((name, data.encode() if isinstance(data, str) else bytes(data)))

    def write_record_metadata(self, name: str, nbytes: int) -> None:
        self.records.append((name, nbytes))


def torch_records(specs: list[TensorSpec], seed: int) -> list[tuple[str, bytes | int]]:
    """torch.save's records for a dict of float16 tensors of these shapes: small ones as bytes, storages as sizes.
    torch.empty reserves address space only; skip_data keeps torch from reading it."""
    state = {s.key: torch.empty(s.shape, dtype=torch.float16) for s in specs}
    writer = _RecordingWriter()
    with torch.serialization.skip_data():
        torch.serialization._save(state, writer, pickle, 2, False)
    probe = io.BytesIO()
    torch.save({}, probe)
    probe.seek(0)
    import zipfile

    with zipfile.ZipFile(probe) as archive:
        version = next(archive.read(n) for n in archive.namelist() if n.endswith("/version"))
    serial = hashlib.sha256(f"qopt-bench/{seed}/{specs[0].key}".encode()).hexdigest()[:40].encode()
    return writer.records + [("version", version), (".data/serialization_id", serial)]


@dataclass
class _Segment:
    start: int
    length: int
    data: bytes | None = None  # static bytes
    tensor: int = -1  # index into the shard's tensors (data records)
    descriptor: int = -1  # record index whose data descriptor this is (needs its CRC)
    central: bool = False  # the central directory and end records (need every CRC)


class ShardLayout:
    """Byte layout of one archive: which segment every offset belongs to, and how to produce it."""

    def __init__(self, name: str, index: int, specs: list[TensorSpec], records: list[tuple[str, bytes | int]],
                 seed: int) -> None:
        self.name, self.index, self.specs, self.seed = name, index, specs, seed
        prefix = name.rsplit(".", 1)[0] + "/"
        self.entries: list[tuple[bytes, int, int, bytes | None]] = []  # (name, header offset, size, bytes)
        self.segments: list[_Segment] = []
        self.record_tensor: dict[int, int] = {}
        position, tensor = 0, 0
        for i, (record, payload) in enumerate(records):
            encoded = (prefix + record).encode()
            pad = (-(position + 30 + len(encoded) + 4)) % ALIGN
            header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x0808, 0, 0, 0x21, 0, 0, 0, len(encoded),
                                 4 + pad) + encoded + b"FB" + struct.pack("<H", pad) + b"Z" * pad
            size = payload if isinstance(payload, int) else len(payload)
            if size >= 0xFFFFFFFF:  # records this large would need zip64 sizes; no OPT tensor comes near
                raise ValueError(f"{record}: {size} bytes, records must stay under 4 GiB")
            self.entries.append((encoded, position, size, None if isinstance(payload, int) else payload))
            self._add(_Segment(position, len(header), header))
            position += len(header)
            if isinstance(payload, int):
                if payload != specs[tensor].nbytes:
                    raise ValueError(f"{record}: {payload} bytes, expected {specs[tensor].nbytes}")
                self.record_tensor[i] = tensor
                self._add(_Segment(position, payload, tensor=tensor))
                tensor += 1
            else:
                self._add(_Segment(position, size, payload))
            position += size
            self._add(_Segment(position, 16, descriptor=i))
            position += 16
        self.central_start = position
        self._add(_Segment(position, len(self.central([0] * len(records))), central=True))
        self.size = self.central_start + self.segments[-1].length
        self.starts = [s.start for s in self.segments]

    def _add(self, segment: _Segment) -> None:
        if segment.length:
            self.segments.append(segment)

    def central(self, crcs: list[int]) -> bytes:
        """Central directory, zip64 end record and locator, end record (as torch writes them)."""
        out = bytearray()
        for (name, offset, size, _), crc in zip(self.entries, crcs, strict=True):
            extra = b"" if offset < 0xFFFFFFFF else struct.pack("<HHQ", 1, 8, offset)
            out += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if extra else 20, 0x0808, 0, 0, 0x21, crc,
                               size, size, len(name), len(extra), 0, 0, 0, 0, min(offset, 0xFFFFFFFF)) + name + extra
        count, cd_size, cd_offset = len(self.entries), len(out), self.central_start
        zip64_at = cd_offset + cd_size
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, zip64_at, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                           min(cd_size, 0xFFFFFFFF), min(cd_offset, 0xFFFFFFFF), 0)
        return bytes(out)

    def tensor_bytes(self, tensor: int, begin: int, end: int, cache: dict) -> bytes:
        """Bytes [begin, end) of one tensor's data, one generated chunk kept in `cache` for sequential reads."""
        spec, out = self.specs[tensor], bytearray()
        step = 2 * CHUNK
        while begin < end:
            chunk = begin // step
            if cache.get("key") != (tensor, chunk):
                cache["key"], cache["data"] = (tensor, chunk), chunk_bytes(self.seed, self.index, tensor, spec, chunk)
            piece = cache["data"][begin - chunk * step:end - chunk * step]
            out += piece
            begin += len(piece)
        return bytes(out)

    def descriptor(self, record: int, crc: int) -> bytes:
        return struct.pack("<IIII", 0x08074B50, crc, self.entries[record][2], self.entries[record][2])

    def stream(self) -> Iterator[tuple[bytes, int, int]]:
        """Every byte in order, computing the CRCs as it goes: (piece, record index or -1, crc so far)."""
        crcs = [zlib.crc32(e[3]) if e[3] is not None else 0 for e in self.entries]
        tensor_record = {t: r for r, t in self.record_tensor.items()}
        cache: dict = {}
        for segment in self.segments:
            if segment.central:
                yield self.central(crcs), -1, 0
            elif segment.descriptor >= 0:
                yield self.descriptor(segment.descriptor, crcs[segment.descriptor]), -1, 0
            elif segment.tensor >= 0:
                record = tensor_record[segment.tensor]
                for at in range(0, segment.length, 2 * CHUNK):
                    piece = self.tensor_bytes(segment.tensor, at, min(at + 2 * CHUNK, segment.length), cache)
                    crcs[record] = zlib.crc32(piece, crcs[record])
                    yield piece, record, crcs[record]
            else:
                yield segment.data, -1, 0
        self.crcs = crcs


class GeneratedFile(io.RawIOBase):
    """A read-only, seekable file whose bytes are produced on demand from a layout and its CRCs."""

    def __init__(self, layout: ShardLayout, crcs: list[int]) -> None:
        self.layout, self.crcs, self.position, self.cache = layout, crcs, 0, {}
        self.central = layout.central(crcs)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset if whence == 0 else self.position + offset if whence == 1 else self.layout.size + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.layout.size if size < 0 else min(self.layout.size, self.position + size)
        out = bytearray()
        while self.position < end:
            seg = self.layout.segments[bisect.bisect_right(self.layout.starts, self.position) - 1]
            begin, stop = self.position - seg.start, min(seg.length, end - seg.start)
            if seg.tensor >= 0:
                out += self.layout.tensor_bytes(seg.tensor, begin, stop, self.cache)
            else:
                data = self.central if seg.central else self.layout.descriptor(seg.descriptor, self.crcs[
                    seg.descriptor]) if seg.descriptor >= 0 else seg.data
                out += data[begin:stop]
            self.position = seg.start + stop
        return bytes(out)

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


@dataclass
class GeneratedSource:
    """A Hub file served from a generator (tests/hub_server.py `HubFile` source): size and sha256 precomputed."""

    layout: ShardLayout
    crcs: list[int]
    size: int
    sha256: str

    def open(self) -> BinaryIO:
        return GeneratedFile(self.layout, self.crcs)  # type: ignore[return-value]


@dataclass
class SyntheticRepo:
    """A shape's whole Hub repo: small files as bytes, shards as generated sources."""

    config: dict
    shards: list[ShardLayout]
    manifest: dict

    def files(self) -> dict[str, object]:
        out: dict[str, object] = {"config.json": json.dumps(self.config, indent=2).encode(),
                                  "pytorch_model.bin.index.json": json.dumps(self.manifest["index"], indent=2).encode()}
        for layout, entry in zip(self.shards, self.manifest["shards"], strict=True):
            out[layout.name] = GeneratedSource(layout, entry["crcs"], entry["size"], entry["sha256"])
        return out


def hub_config(shape: str) -> dict:
    """The released config of `shape` (e.g. "opt-30b") as qopt knows it, with the Hub's dtype and name."""
    from qopt.place.plan import config_for

    config, _ = config_for(shape)
    data = config.to_dict()
    data.update(torch_dtype="float16", _name_or_path=f"facebook/{shape}", architectures=["OPTForCausalLM"])
    return data


def _layouts(shape: str, shard_count: int, seed: int) -> tuple[dict, list[list[TensorSpec]], list[ShardLayout]]:
    config = hub_config(shape)
    specs = split_shards(hf_tensors(config), shard_count)
    names = [f"pytorch_model-{i + 1:05d}-of-{shard_count:05d}.bin" for i in range(shard_count)]
    layouts = [ShardLayout(name, i, s, torch_records(s, seed), seed)
               for i, (name, s) in enumerate(zip(names, specs, strict=True))]
    return config, specs, layouts


def _manifest_entry(shape: str, shard_count: int, seed: int, index: int, progress: bool) -> dict:
    """One shard's size, sha256 and CRCs, by generating every byte once (a worker process per shard)."""
    torch.set_num_threads(1)
    layout = _layouts(shape, shard_count, seed)[2][index]
    sha, done = hashlib.sha256(), 0
    for piece, _, _ in layout.stream():
        sha.update(piece)
        done += len(piece)
        if progress and done % (1 << 30) < len(piece):
            print(f"manifest {layout.name}: {done / 1e9:.1f} / {layout.size / 1e9:.1f} GB", flush=True)
    return {"name": layout.name, "size": layout.size, "sha256": sha.hexdigest(), "crcs": layout.crcs}


def build(shape: str, shard_count: int, seed: int = 0, progress: bool = True) -> SyntheticRepo:
    """The repo for `shape` in `shard_count` `.bin` shards; the manifest is computed once (one worker process
    per core; minutes at 30B) and cached per shape, shard count, seed and torch version."""
    config, specs, layouts = _layouts(shape, shard_count, seed)
    key = f"{shape}-{shard_count}-seed{seed}-torch{torch.__version__}"
    cached = CACHE / f"{key}.json"
    if cached.exists():
        manifest = json.loads(cached.read_text())
        if [e["size"] for e in manifest["shards"]] == [s.size for s in layouts]:
            return SyntheticRepo(config, layouts, manifest)
    weight_map = {spec.key: layout.name for layout, shard in zip(layouts, specs, strict=True) for spec in shard}
    index = {"metadata": {"total_size": sum(s.nbytes for shard in specs for s in shard)}, "weight_map": weight_map}
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(len(layouts), os.cpu_count() or 1)) as pool:
        entries = list(pool.map(_manifest_entry, *zip(*[(shape, shard_count, seed, i, progress)
                                                         for i in range(len(layouts))], strict=True)))
    manifest = {"shape": shape, "seed": seed, "torch": torch.__version__, "index": index, "shards": entries}
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(manifest))
    return SyntheticRepo(config, layouts, manifest)


def write_shard(repo: SyntheticRepo, index: int, path: Path) -> None:
    """A shard on disk (tests only: what a download of it would write)."""
    layout, entry = repo.shards[index], repo.manifest["shards"][index]
    with GeneratedFile(layout, entry["crcs"]) as source, open(path, "wb") as out:
        while piece := source.read(1 << 24):
            out.write(piece)


__all__ = ["SyntheticRepo", "build", "hf_tensors", "tensor_value", "write_shard"]
