"""`load()`: a checkpoint folder streamed into a model built on the meta device, one shard at a time.

The stages, each a plain function: read config.json and the shard headers -> build the model on the meta
device with its quantized Linears swapped in as empty bitsandbytes modules -> place it
(`place.device_map.infer_device_map`, quantized sizes) -> stream the shards, quantizing each Linear weight as it
arrives and putting every tensor where the map says (CPU, GPU or the offload folder) -> attach the hooks that
run layers on other devices or from disk. The full-precision model never exists in memory: peak host memory
is about the quantized model plus the shard being read (its memory map is closed once it is consumed).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, PlanError
from ..io.checkpoint import AUXILIARY_FILES, CheckpointFiles, check_tensor_shapes, iter_shard_tensors, normalize_key
from ..io.hub import cached_folder, resolve_model
from ..io.outputs import check_output_folder
from ..model.config import OPTConfig
from ..model.network import LAYER_PREFIX, OPTForCausalLM, OPTModel, OPTPreTrainedModel, decoder_layer_index
from ..place.device_map import device_of, summarize
from ..place.offload import (
    OFFLOAD_KINDS,
    HostStore,
    OffloadFolder,
    attach_disk_hooks,
    attach_host_hooks,
    check_offloadable,
)
from ..place.placement import GenerationBudget, computes_on_cpu, place, resolve_dtype
from ..place.plan import DeviceMap, MemoryPlan
from ..place.ranks import check_one_device_per_rank
from ..place.sizes import meta_model, placed_bytes
from ..quant.config import QuantizationConfig
from ..quant.modules import (
    bits_of,
    is_quantized,
    owning_module,
    quantize_weight,
    saved_keys,
    saved_layout,
    set_quantized_state,
)
from ..utils import format_bytes
from .saving import save_model

logger = logging.getLogger(__name__)
_HEAD_PREFIXES = ("score.", "qa_outputs.")  # task heads a causal-LM checkpoint does not have


def check_devices_exist(placement: DeviceMap, source: str) -> None:
    """A map that names a GPU this machine lacks fails here, in one line, not deep inside torch."""
    wanted = sorted({d for d in placement.values() if isinstance(d, int)} |
                    ({0} if any(d == "cuda" for d in placement.values()) else set()))
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [d for d in wanted if d >= have]
    if missing:
        raise PlanError(f"{source}: the device map places weights on cuda:{missing[0]}, but this machine has "
                        f"{have} CUDA device{'s' if have != 1 else ''} (use device_map='cpu' / --device-map cpu, "
                        "or 'auto' to plan over the devices present)")


def resolve_quantization(requested: Any, config: OPTConfig, source: str) -> tuple[QuantizationConfig | None, bool]:
    """(quantization, pre_quantized): the checkpoint's own `quantization_config` wins; a request may only
    restate its format (then the request's runtime settings, compute dtype and int8 threshold, apply)."""
    wanted = None if requested is None else QuantizationConfig.coerce(requested)
    if config.quantization_config is None:
        return wanted, False
    stored = QuantizationConfig.from_dict(config.quantization_config, source=f"{source}: quantization_config")
    if wanted is None:
        return stored, True
    if wanted.name != stored.name:
        raise ConfigError(f"{source}: the checkpoint is already quantized ({stored.name}); it cannot be loaded as "
                          f"{wanted.name} (load it without a quantization argument)")
    stored.bnb_4bit_compute_dtype = wanted.bnb_4bit_compute_dtype
    stored.llm_int8_threshold = wanted.llm_int8_threshold
    return stored, True


def load(path: str | os.PathLike, *, quantization: Any = None, quantization_config: Any = None,
         torch_dtype: str | torch.dtype | None = "auto", dtype: str | torch.dtype | None = None,
         device_map: Any = None, max_memory: dict[Any, Any] | None = None,
         offload_folder: str | os.PathLike | None = None, stream_from_host: bool = False,
         context: int | None = None, batch: int | None = None, all_logits: bool = False,
         model_class: type[OPTPreTrainedModel] = OPTForCausalLM, progress: bool = True, revision: str | None = None,
         token: str | bool | None = None, cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
         keep_download: bool = True,
         **config_overrides: Any) -> OPTPreTrainedModel:
    """Load a local HF OPT checkpoint folder, optionally quantizing it on the fly; returns the model in eval mode.

    `quantization` (alias `quantization_config`): "int8" | "nf4" | "fp4" | "nf4-dq" | "fp4-dq", a
    `QuantizationConfig` or transformers' `BitsAndBytesConfig`; a pre-quantized checkpoint loads as saved.
    `torch_dtype` (alias `dtype`) is the dtype of what stays unquantized: "auto" (default) follows the checkpoint
    (see `resolve_dtype`), or a dtype / its name.
    `device_map`: None (all on CPU), a device, a dict, or "auto" | "balanced" | "balanced_low_0" | "sequential"
    (planned with `max_memory`, e.g. {0: "20GiB", "cpu": "30GiB"}); layers that fit nowhere go to
    `offload_folder` and are read back at each forward. `model.hf_device_map` says where everything went.
    `stream_from_host`: decoder layers the map puts on the CPU stay there, quantized, but run on the GPU (copied
    over for each forward, once per pass layer-major; map value "host"), instead of being computed by the CPU.
    `context` / `batch`: the generation budget a planned map keeps free beside the weights (each layer's KV cache
    for `batch` sequences of `context` tokens, activations, the caches of offloaded layers on the main device),
    as `qopt.plan` counts it; without them nothing is reserved (as in transformers); `all_logits`: the budget
    scores every position of a window (perplexity) instead of generating. A `MemoryPlan` as
    `device_map` loads the plan's map (its limits, strategy and budget).

    `path` is a checkpoint folder or a Hub id (`facebook/opt-125m`; `revision`, `token`, `cache_dir`,
    `local_files_only` as in transformers): shards download one after another while the previous one is
    quantized, into the HF cache, or with `keep_download=False` into a scratch folder that keeps at most two.
    Other keyword arguments override config.json fields (e.g. `num_labels=3`); an unknown name is an error.
    """
    source = resolve_model(path, revision=revision, token=token, cache_dir=cache_dir,
                           local_files_only=local_files_only, keep_download=keep_download, progress=progress)
    path = source.folder
    config = OPTConfig.from_pretrained(path)
    for key, value in config_overrides.items():
        setattr(config, _config_field(key), value)
    config.validate(str(path / "config.json"))
    files = source.checkpoint()
    quant, pre_quantized = resolve_quantization(quantization if quantization is not None else quantization_config,
                                                config, str(path))
    check_one_device_per_rank(device_map)
    model, dtype, placement = placed_model(config, quant, dtype if dtype is not None else torch_dtype, device_map,
                                           max_memory, context, batch, stream_from_host, model_class, str(path),
                                           all_logits)
    check_devices_exist(placement, str(path))
    check_offloadable(placement)
    offload = _offload_target(model, dtype, placement, offload_folder, path)
    host = HostStore() if "host" in placement.values() else None
    shard_loader = ShardLoader(model, files, quant, pre_quantized, dtype, placement, offload, path, host)
    try:
        with source.fetch_shards(files) as shards, \
                tqdm(total=shards.total_bytes, unit="B", unit_scale=True, desc="Loading", disable=not progress) as bar:
            shard_loader.read(shards, bar)
        shard_loader.finish()
    except BaseException:
        if offload is not None:
            offload.remove()
        raise
    dispatch(model, placement, offload, host)
    model.hf_device_map = placement
    model.name_or_path = source.name  # lets adapters check which base they were trained on (a Hub id stays one)
    if quant is not None:
        model.config.quantization_config = quant.to_dict()
    logger.info("%s: %s, %d layers quantized; placement: %s", path, quant.name if quant else str(dtype),
                len(shard_loader.quantized), "; ".join(summarize(placement)))
    return model.eval()


def quantize_checkpoint(path: str | os.PathLike, out: str | os.PathLike, quantization: Any, *,
                        torch_dtype: str | torch.dtype = "bfloat16", max_shard_size: str | int = "2GB",
                        overwrite: bool = False, **hub: Any) -> tuple[int, int]:
    """Stream a float checkpoint (a folder or a Hub id; `hub`: revision, keep_download, ... as in `load`) into a
    quantized model and write it pre-quantized (atomically), with the source's tokenizer files; returns
    (quantized layers, bytes of weights written). `out` may not overlap the source, and replaces an existing
    model only with `overwrite=True` (checked before any work)."""
    check_output_folder(out, [cached_folder(path, hub.get("revision"), hub.get("cache_dir")) or path],
                        overwrite=overwrite)
    model = load(path, quantization=quantization, torch_dtype=torch_dtype, **hub)
    folder = cached_folder(path, hub.get("revision"), hub.get("cache_dir")) or Path(path)
    extras = [folder / name for name in AUXILIARY_FILES if (folder / name).is_file()]
    save_model(model, out, max_shard_size, extra_files=extras)
    layers = sum(1 for m in model.modules() if is_quantized(m))
    return layers, sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))


def _offload_target(model: OPTPreTrainedModel, dtype: torch.dtype, placement: DeviceMap,
                    folder: str | os.PathLike | None, path: Path) -> OffloadFolder | None:
    """A fresh folder for the layers placed on disk, once it is known that they fit there."""
    if "disk" not in placement.values():
        return None
    if folder is None:
        raise CheckpointError(f"{path}: the model does not fit in max_memory, so some layers go to disk; pass "
                              f"offload_folder= (placement: {'; '.join(summarize(placement))})")
    Path(folder).mkdir(parents=True, exist_ok=True)
    need, free = placed_bytes(model, dtype, placement, "disk"), shutil.disk_usage(folder).free
    if need > free:
        on_disk = [s for s in summarize(placement) if s.startswith("disk")]
        raise PlanError(f"offload folder {folder}: {format_bytes(free)} free, but the layers placed on disk "
                        f"({'; '.join(on_disk)}) need {format_bytes(need)}; free space there, pass another "
                        f"offload_folder= or raise max_memory")
    return OffloadFolder(tempfile.mkdtemp(prefix="qopt-offload-", dir=folder))


class ShardLoader:
    """Receives checkpoint tensors in any order and puts each one where it belongs, quantizing on arrival.

    The one place where a checkpoint's tensors enter a meta model, with one set of rules: key names
    (`normalize_key`), shapes and float dtypes (checked in the headers first, then per tensor), the dtype of what
    stays unquantized, decoder layers the config lacks, and which missing tensors are allowed (`finish`: the tied
    lm_head, new task heads). `select` (a predicate on the model's tensor names) limits all of it to a subset,
    e.g. one decoder layer: only those tensors are read and only those must be there. A quantized module belongs
    to the subset when its weight does.
    """

    def __init__(self, model: OPTPreTrainedModel, files: CheckpointFiles, quant: QuantizationConfig | None,
                 pre_quantized: bool, dtype: torch.dtype, placement: DeviceMap, offload: OffloadFolder | None,
                 path: Path, host: HostStore | None = None, select: Callable[[str], bool] | None = None) -> None:
        self.model, self.files, self.quant, self.pre_quantized = model, files, quant, pre_quantized
        self.dtype, self.placement, self.offload, self.path = dtype, placement, offload, path
        self.stores: dict[str, Any] = {"disk": offload, "host": host}  # where offloaded tensors are put
        self.has_prefix = not isinstance(model, OPTModel)
        self.select = select
        quantized = {name: m for name, m in model.named_modules() if is_quantized(m)}
        self.quantized = {name: m for name, m in quantized.items() if select is None or select(f"{name}.weight")}
        self.plain = {name: p for name, p in model.named_parameters()
                      if owning_module(name, quantized) is None and (select is None or select(name))}
        self.required = {name: self._required_keys(name, m) for name, m in self.quantized.items()}
        self.pending: dict[str, dict[str, Any]] = {}  # quantized layer -> tensors (and quant state) ready so far
        self.arrived: dict[str, set[str]] = {}  # quantized layer -> checkpoint keys seen so far
        self.loaded: set[str] = set()
        # weights this load keeps in host RAM (CPU and host-streamed layers), and how many are there so far
        self.host_planned = sum(placed_bytes(model, dtype, placement, d) for d in ("cpu", "host")) \
            if select is None else self._subset_host_bytes()
        self.host_placed = 0
        expected = {n: p.shape for n, p in self.plain.items()}
        if not pre_quantized:
            expected.update({f"{n}.{k}": getattr(m, k).shape for n, m in self.quantized.items() for k in
                             self.required[n]})
        check_tensor_shapes(files, expected, lambda raw: normalize_key(raw, self.has_prefix))
        for raw, info in files.tensors.items():  # headers: refuse extra layers before any data is read
            self._check_layer(raw, info.file)

    def wanted(self, raw_name: str) -> bool:
        """Whether a checkpoint key (the file's name) is one of the tensors this loader reads."""
        return self.select is None or self.select(normalize_key(raw_name, self.has_prefix))

    def shards(self) -> list[Path]:
        """The shards holding the selected tensors: safetensors headers say which; .bin shards are all scanned."""
        if self.select is None or self.files.format == "bin":
            return list(self.files.shards)
        return sorted({info.file for raw, info in self.files.tensors.items() if self.wanted(raw)})

    def read(self, shards: Iterable[Path], bar: tqdm | None = None) -> None:
        """Stream the selected tensors of `shards` (in the order given, each read once) into the model; `bar`
        counts their bytes. `finish` then checks that nothing selected is missing."""
        select = None if self.select is None else self.wanted
        for shard in shards:
            if bar is not None:
                bar.set_description(f"Loading {shard.name}")
            for raw_name, tensor in iter_shard_tensors(self.files, shard, select, host_bytes=self.host_bytes_left):
                self.put(raw_name, tensor, shard)
                if bar is not None:
                    bar.update(tensor.numel() * tensor.element_size())

    def _subset_host_bytes(self) -> int:
        """What a subset keeps in host RAM: its float tensors in `dtype`, its quantized modules' tensors (no
        sizing view: that would copy a model whose other weights are already real)."""
        def on_host(name: str) -> bool:
            return device_of(name, self.placement) in ("cpu", "host")

        size = torch.empty(0, dtype=self.dtype).element_size()
        return sum(p.numel() * size for n, p in self.plain.items() if on_host(n)) + \
            sum(t.numel() * t.element_size() for n, m in self.quantized.items() if on_host(n) for t in m.parameters())

    @property
    def host_bytes_left(self) -> int:
        """Planned host-RAM weights not placed yet: what a shard read whole into RAM must leave room for."""
        return max(0, self.host_planned - self.host_placed)

    def _count_host(self, device: int | str, values: Any) -> None:
        if device in ("cpu", "host"):
            self.host_placed += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))

    def _required_keys(self, name: str, module: torch.nn.Module) -> set[str]:
        if not self.pre_quantized:
            return {"weight"} | ({"bias"} if module.bias is not None else set())
        if self.files.format != "safetensors":
            raise CheckpointError(f"{self.path}: pre-quantized checkpoints must be safetensors")
        keys = {normalize_key(raw, self.has_prefix) for raw in self.files.tensors}
        found = {k[len(name) + 1:] for k in keys if k.startswith(name + ".")}
        return saved_keys(module) - ({"weight_format"} - found)

    def put(self, raw_name: str, tensor: torch.Tensor, shard: Path) -> None:
        name = normalize_key(raw_name, self.has_prefix)
        owner = owning_module(name, self.quantized)
        if owner is not None:
            self._put_quantized(owner, name[len(owner) + 1:], tensor, f"{shard}: tensor '{raw_name}'")
            return
        param = self.plain.get(name)
        if param is None:
            self._check_layer(raw_name, shard)
            return  # e.g. lm_head.weight when loading a task head, or HF bookkeeping buffers
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{shard}: tensor '{raw_name}' has shape {list(tensor.shape)}, "
                                  f"config.json implies {list(param.shape)}")
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{shard}: tensor '{raw_name}' has dtype {tensor.dtype}, expected a float")
        self._place(name, tensor.to(self.dtype, copy=True))
        self.loaded.add(name)

    def _check_layer(self, raw_name: str, file: Path) -> None:
        """A tensor of a decoder layer the config does not declare means config and weights disagree."""
        index = decoder_layer_index(raw_name)
        layers = self.model.config.num_hidden_layers
        if index is not None and index >= layers:
            raise CheckpointError(f"{file}: tensor '{raw_name}' belongs to decoder layer {index}, but "
                                  f"config.json declares {layers} layers ({LAYER_PREFIX}{index} does not exist)")

    def _place(self, name: str, value: torch.Tensor) -> None:
        device = device_of(name, self.placement)
        self._count_host(device, [value])
        if device in OFFLOAD_KINDS:
            self.stores[device].put(name, value)
        else:
            set_module_tensor_to_device(self.model, name, device, value=value, dtype=value.dtype)

    def _put_quantized(self, owner: str, key: str, tensor: torch.Tensor, where: str) -> None:
        module = self.quantized[owner]
        if key not in self.required[owner]:
            hint = "" if self.pre_quantized else " (a quantized tensor, but config.json has no quantization_config)"
            raise CheckpointError(f"{where} is not expected for quantized layer '{owner}'{hint}")
        device = device_of(owner, self.placement)
        target = "cpu" if device in OFFLOAD_KINDS else device
        if self.pre_quantized:
            values = {key: tensor.to(target, copy=True)}
        elif key == "weight":
            if tuple(tensor.shape) != (module.out_features, module.in_features) or not tensor.dtype.is_floating_point:
                raise CheckpointError(f"{where} is {tensor.dtype} {list(tensor.shape)}, expected a float weight of "
                                      f"shape {[module.out_features, module.in_features]}")
            values = quantize_weight(tensor.to(target), self.quant, bits_of(module), self.dtype)
        else:
            values = {key: tensor.to(target, self.dtype, copy=True)}
        self.pending.setdefault(owner, {}).update(values)
        arrived = self.arrived.setdefault(owner, set())
        arrived.add(key)
        if arrived == self.required[owner]:
            self._finish_module(owner, self.pending.pop(owner), device)

    def _finish_module(self, owner: str, state: dict[str, Any], device: int | str) -> None:
        self._count_host(device, state.values())
        if device in OFFLOAD_KINDS:
            for key, value in saved_layout(state).items():
                self.stores[device].put(f"{owner}.{key}", value)
            return
        set_quantized_state(self.quantized[owner], state, _torch_device(device), source=f"{self.path}: {owner}")

    def finish(self) -> None:
        incomplete = [n for n in self.quantized if self.arrived.get(n) != self.required[n]]
        if incomplete:
            owner = incomplete[0]
            missing = sorted(self.required[owner] - self.arrived.get(owner, set()))
            more = f" (and {len(incomplete) - 1} more quantized layers)" if len(incomplete) > 1 else ""
            raise CheckpointError(f"{self.path}: tensors missing from the checkpoint: "
                                  f"{', '.join(f'{owner}.{k}' for k in missing)}{more}")
        _finish_missing(self.model, self.plain, self.loaded, self.path, self.dtype, self._place)
        self.model.tie_weights()


def read_tensors(model: OPTPreTrainedModel, files: CheckpointFiles, select: Callable[[str], bool],
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    """Read the float tensors `select` names (the model's names) into `model`, on `device` in `dtype`, by
    `load`'s rules (`ShardLoader`): only the shards that hold them are opened, and a selected tensor missing
    from the checkpoint is an error. What calibration reads a decoder layer at a time with."""
    loader = ShardLoader(model, files, None, False, dtype, {"": str(torch.device(device))}, None, files.folder,
                         select=select)
    loader.read(loader.shards())
    loader.finish()


def _torch_device(device: int | str) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _finish_missing(model: OPTPreTrainedModel, expected: dict[str, torch.nn.Parameter], loaded: set[str],
                    path: Path, dtype: torch.dtype, place: Any) -> None:
    """Initialise new task heads like HF does; any other missing tensor is an error."""
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - loaded - tied)
    fatal = [n for n in missing if not n.startswith(_HEAD_PREFIXES)]
    if fatal:
        more = f" and {len(fatal) - 5} more" if len(fatal) > 5 else ""
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {', '.join(fatal[:5])}{more}")
    if missing:
        logger.warning("%s: newly initialised (not in the checkpoint): %s", path, ", ".join(missing))
    generator = torch.Generator().manual_seed(0)
    for name in missing:
        shape = expected[name].shape
        value = torch.zeros(shape) if name.endswith("bias") else \
            torch.randn(shape, generator=generator) * model.config.init_std
        place(name, value.to(dtype))


def dispatch(model: OPTPreTrainedModel, placement: DeviceMap, offload: OffloadFolder | None,
             host: HostStore | None = None) -> None:
    """Hooks for a model spread over devices: inputs follow each module's device; disk and host layers are
    rebuilt on the main device (the first GPU, else the CPU) for each forward."""
    devices = {d for d in placement.values() if d not in OFFLOAD_KINDS}
    main = min((d for d in devices if isinstance(d, int)), default="cpu")
    if offload is not None:
        attach_disk_hooks(model, placement, offload.loader(), _torch_device(main))
    if host is not None:
        attach_host_hooks(model, placement, host, _torch_device(main))
    if len(devices | ({main} if offload or host else set())) > 1:
        for name, device in placement.items():
            if device not in OFFLOAD_KINDS:
                add_hook_to_module(model.get_submodule(name), AlignDevicesHook(_torch_device(device)))


def placed_model(config: OPTConfig, quant: QuantizationConfig | None, torch_dtype: str | torch.dtype | None,
                 device_map: Any, max_memory: dict[Any, Any] | None, context: int | None, batch: int | None,
                 stream_from_host: bool = False, model_class: type[OPTPreTrainedModel] = OPTForCausalLM,
                 source: str = "model", all_logits: bool = False
                 ) -> tuple[OPTPreTrainedModel, torch.dtype, DeviceMap]:
    """The meta model, its unquantized dtype and its device map, exactly as `load` computes them (and as
    `qopt.plan` does with the same limits and budget), before any weight is read."""
    if isinstance(device_map, MemoryPlan):
        device_map, max_memory, budget = _from_plan(device_map, config, source)
    else:
        budget = _budget(context, batch, config, source, all_logits)
    dtype = resolve_dtype(torch_dtype, config, computes_on_cpu(device_map, max_memory))
    model = meta_model(config, quant, model_class)
    return model, dtype, place(model, dtype, device_map, max_memory, budget, stream_from_host, source).device_map


def _budget(context: int | None, batch: int | None, config: OPTConfig, source: str, all_logits: bool = False
            ) -> GenerationBudget | None:
    if context is None and batch is None:
        return None
    budget = GenerationBudget(config.max_position_embeddings if context is None else context, batch or 1,
                              all_logits)
    budget.check(config, source)
    return budget


def _from_plan(memory_plan: MemoryPlan, config: OPTConfig, source: str
               ) -> tuple[DeviceMap, dict[str, int], GenerationBudget]:
    """A plan's map, checked against the model it is loaded for (a plan of another shape would misplace it)."""
    layers = sum(1 for name in memory_plan.device_map if decoder_layer_index(name) is not None)
    whole = "" in memory_plan.device_map
    if not whole and layers != config.num_hidden_layers:
        raise PlanError(f"{source}: the plan ({memory_plan.label}) places {layers} decoder layers, config.json "
                        f"declares {config.num_hidden_layers}; plan this model")
    limits = {int(k) if k.isdigit() else k: v for k, v in memory_plan.limits.items()}
    return dict(memory_plan.device_map), limits, GenerationBudget(memory_plan.context, memory_plan.batch,
                                                                  memory_plan.all_logits)


def _config_field(key: str) -> str:
    """A keyword argument of `load` that is not one of its options must name a config.json field."""
    from dataclasses import fields

    known = {f.name for f in fields(OPTConfig)} - {"extra", "quantization_config"}
    if key not in known:
        raise ValueError(f"load(): unknown keyword argument {key!r}; expected a load option or a config.json field "
                         f"to override ({', '.join(sorted(k for k in known if not k.startswith('_')))})")
    return key
