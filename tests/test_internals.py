"""The private bitsandbytes / torch internals behind their version check, the public fallback, the CPU layout
built by qopt's packer at the first eval forward (and undone by train() and device moves), and the output head's
packed copy kept between calls."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState, has_avx512bf16

import qopt
from qopt.bundled import bundled_model_dir
from qopt.evaluation.footprint import weight_footprint
from qopt.generation import lean_forwards
from qopt.quant import internals
from qopt.quant.modules import Linear4bit, quantized_state

AVX512BF16 = pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks for its CPU kernel only on "
                                                              "AVX512-BF16 CPUs")
PROMPT = torch.tensor([[2, 100, 200, 300, 400]])


def load(precision: str = "nf4") -> torch.nn.Module:
    return qopt.load(bundled_model_dir(), quantization=precision, progress=False)


def linears4(model: torch.nn.Module) -> list[Linear4bit]:
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def packed(model: torch.nn.Module) -> list[bool]:
    return [internals.is_cpu_packed(m.weight.quant_state) for m in linears4(model)]


def saved(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- the version check ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bnb, torch_version", [("0.48.0", "2.11.0+cu130"), ("0.50.2", "2.13.0+cpu"),
                                                ("0.49.1", "2.12.1")])
def test_tested_versions_are_supported(bnb, torch_version):
    assert internals.untested(bnb, torch_version) is None


@pytest.mark.parametrize("bnb, torch_version, named", [("0.51.0", "2.13.0", "bitsandbytes 0.51.0"),
                                                       ("0.47.2", "2.12.0", "bitsandbytes 0.47.2"),
                                                       ("0.50.2", "2.14.0", "torch 2.14.0"),
                                                       ("0.50.2", "2.10.1+cu128", "torch 2.10.1+cu128"),
                                                       ("1.0.0", "2.13.0", "bitsandbytes 1.0.0"),
                                                       ("0.50.2", "nightly", "torch nightly")])
def test_untested_versions_are_named(bnb, torch_version, named):
    reason = internals.untested(bnb, torch_version)
    assert reason is not None and reason.startswith(named) and "tested on" in reason


def test_an_untested_version_logs_one_line_at_import_and_takes_the_public_path():
    code = ("import logging, bitsandbytes; logging.basicConfig(format='LOG %(message)s'); "
            "bitsandbytes.__version__ = '0.51.0'; from qopt.quant import internals; "
            "print('SUPPORTED', internals.SUPPORTED, internals.gemv_4bit_kernels(), "
            "internals.onednn_pack(__import__('torch').ones(32, 32)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "SUPPORTED False None None" in done.stdout
    logged = [line for line in done.stderr.splitlines() if line.startswith("LOG ")]
    assert len(logged) == 1 and "bitsandbytes 0.51.0" in logged[0] and "public" in logged[0], done.stderr


# -- the public fallback -------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["nf4", "nf4-dq", "int8"])
def test_fallback_uses_the_public_path_and_saves_the_same_bytes(precision, monkeypatch, tmp_path):
    model = load(precision)
    model.generate(PROMPT, max_new_tokens=lean_forwards.PACK_HEAD_MIN_TOKENS)
    model.save_pretrained(tmp_path / "tested")
    monkeypatch.setattr(internals, "SUPPORTED", False)
    fallback = load(precision)
    assert not any(packed(fallback))
    assert all(not m.support_avx512bf16_for_cpu for m in linears4(fallback))
    for module in fallback.modules():
        assert lean_forwards.lean_4bit_forward(module) is None if isinstance(module, Linear4bit) else True
        if type(module).__name__ == "Linear8bitLt":
            assert lean_forwards.lean_int8_forward(module) is None
    assert lean_forwards.packed_head_forward(fallback.lm_head, 64) is None
    out = fallback.generate(PROMPT, max_new_tokens=lean_forwards.PACK_HEAD_MIN_TOKENS)
    assert out.shape == (1, PROMPT.shape[1] + lean_forwards.PACK_HEAD_MIN_TOKENS)
    assert not any(packed(fallback))  # bitsandbytes' own forward did not repack either
    fallback.save_pretrained(tmp_path / "fallback")
    for file in sorted((tmp_path / "tested").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "fallback" / file.name).read_bytes(), file.name


def test_fallback_rounding_bounds_equal_bitsandbytes(monkeypatch):
    tested = {t: internals.quantize_bounds(t) for t in ("nf4", "fp4")}
    monkeypatch.setattr(internals, "SUPPORTED", False)
    for quant_type, (bounds, order) in tested.items():
        public_bounds, public_order = internals.quantize_bounds(quant_type)
        assert torch.equal(bounds, public_bounds) and torch.equal(order, public_order)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_the_cpu_layout_builder_equals_bitsandbytes_repack(quant_type, nested, storage):
    weight = torch.randn(96, 192, generator=torch.Generator().manual_seed(0))
    built = {}
    for name, pack in (("qopt", internals.pack_for_cpu), ("bitsandbytes", internals.pack_for_cpu_by_bitsandbytes)):
        codes, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested,
                                          quant_storage=storage)
        built[name] = (pack(codes, state), state)
    (ours, ours_state), (theirs, their_state) = built["qopt"], built["bitsandbytes"]
    assert ours.dtype == theirs.dtype == torch.uint8 and torch.equal(ours, theirs)
    assert torch.equal(ours_state.absmax, their_state.absmax) and ours_state.absmax.dtype == torch.bfloat16
    fields = ("dtype", "nested", "original_dtype", "original_nested", "original_qshape", "packing_format_for_cpu",
              "blocksize", "shape", "quant_type")
    assert {f: getattr(ours_state, f) for f in fields} == {f: getattr(their_state, f) for f in fields}
    assert getattr(ours_state, "original_storage_type", None) == getattr(their_state, "original_storage_type", None)
    assert hasattr(ours_state, "state2") == hasattr(their_state, "state2")
    restored = internals.unpack_weight(ours, ours_state)
    assert restored.dtype == storage and torch.equal(restored.view(torch.uint8), codes.view(torch.uint8))


# -- no round trips; the CPU layout built by qopt ------------------------------------------------------------
def test_loading_hands_the_quant_state_over_without_packing_it(monkeypatch):
    calls = {"as_dict": 0, "from_dict": 0}
    as_dict, from_dict = QuantState.as_dict, QuantState.from_dict.__func__

    def counted_as_dict(self, *args, **kwargs):
        calls["as_dict"] += 1
        return as_dict(self, *args, **kwargs)

    def counted_from_dict(cls, *args, **kwargs):
        calls["from_dict"] += 1
        return from_dict(cls, *args, **kwargs)

    monkeypatch.setattr(QuantState, "as_dict", counted_as_dict)
    monkeypatch.setattr(QuantState, "from_dict", classmethod(counted_from_dict))
    model = load("nf4-dq")
    assert calls == {"as_dict": 0, "from_dict": 0}
    quantized_state(linears4(model)[0])  # the disk boundary: statistics spelled out once, for the file
    assert calls["as_dict"] == 1


@AVX512BF16
@pytest.mark.parametrize("precision", ["nf4", "nf4-dq", "fp4"])
def test_qopts_packer_at_the_first_forward_computes_as_bitsandbytes_repack(precision, monkeypatch, tmp_path):
    model = load(precision)
    assert not any(packed(model))  # a load holds the standard layout: packing there raised the load's peak
    eager = model.generate(PROMPT, max_new_tokens=8)
    assert all(packed(model))  # qopt's uint8 packer, at the first eval forward without grad
    with torch.no_grad():
        eager_logits = model(PROMPT).logits
    model.save_pretrained(tmp_path / "eager")
    monkeypatch.setattr(Linear4bit, "pack_for_cpu", lambda self: False)
    lazy = load(precision)
    assert not any(packed(lazy))
    lazy_saved_before = saved(lazy)
    assert torch.equal(lazy.generate(PROMPT, max_new_tokens=8), eager)
    assert all(packed(lazy))  # bitsandbytes repacked at the first forward
    with torch.no_grad():
        assert torch.equal(lazy(PROMPT).logits, eager_logits)
    assert_same_tensors(saved(model), lazy_saved_before)


@AVX512BF16
def test_the_packers_temporaries_go_back_to_the_os_every_trim_threshold(monkeypatch):
    """glibc keeps freed heap resident; the first forward's repack trims it each TRIM_EVERY_BYTES of temporaries
    (counted per weight), so a CPU model holds its layout, not the packer's leftovers."""
    from qopt import utils

    trims = []
    monkeypatch.setattr(utils, "_TRIM", trims.append)
    monkeypatch.setattr(utils, "_FREED", [0])
    monkeypatch.setattr(utils, "TRIM_EVERY_BYTES", 1 << 20)
    model = load("nf4")
    with torch.no_grad():
        model(PROMPT)
    freed = sum(internals.packing_temporary_bytes(m.weight.quant_state) for m in linears4(model))
    assert all(packed(model))
    assert 1 <= len(trims) <= freed // (1 << 20) and all(arg == 0 for arg in trims)
    assert utils._FREED[0] < 1 << 20  # what was counted since the last trim stays below the threshold


@AVX512BF16
def test_train_restores_the_standard_layout(tmp_path):
    model = load("nf4-dq")
    reference = saved(model)
    standard = {id(m): (quantized_state(m)["weight"]) for m in linears4(model)}
    model.train()
    assert not any(packed(model))
    for module in linears4(model):
        assert torch.equal(module.weight.data, standard[id(module)])
        assert module.weight.quant_state is module.quant_state and module.weight.quant_state.nested
    assert_same_tensors(saved(model), reference)
    model(PROMPT).logits.sum()  # trains on the standard layout: bitsandbytes does not repack in train mode
    assert not any(packed(model))
    model.eval()
    with torch.no_grad():
        model(PROMPT)
    assert all(packed(model))  # eval mode again: bitsandbytes repacks at the next forward, as before
    assert_same_tensors(saved(model), reference)


@AVX512BF16
def test_a_device_move_restores_the_standard_layout_first(monkeypatch):
    model = load("nf4")
    reference = saved(model)
    with torch.no_grad():
        logits = model(PROMPT).logits
    seen = []  # the layout each weight has when Params4bit.to moves it (it would carry the CPU layout along)
    to = bnb.nn.Params4bit.to

    def recording_to(self, *args, **kwargs):
        seen.append(internals.is_cpu_packed(self.quant_state))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(bnb.nn.Params4bit, "to", recording_to)
    model.to("cpu")
    assert seen and not any(seen) and not any(packed(model))
    assert_same_tensors(saved(model), reference)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, logits)
    assert all(packed(model))  # the eval forward packed them again (bitsandbytes' lazy repack)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_loaded_on_cpu_computes_on_the_gpu_after_to_cuda():
    model = load("nf4")
    with torch.no_grad():
        cpu = model(PROMPT).logits.float()
    model.to("cuda")
    assert not any(packed(model))
    with torch.no_grad():
        gpu = model(PROMPT.cuda()).logits.float().cpu()
    assert (gpu - cpu).abs().max() < 0.1 * cpu.abs().max()


# -- the output head's packed copy --------------------------------------------------------------------------
def test_the_packed_head_is_kept_between_calls_and_counted(monkeypatch):
    model = load("nf4")
    head = model.lm_head
    with torch.no_grad():
        model(PROMPT)  # the 4-bit layers take the CPU kernel's layout at the first forward: counted apart
    before = weight_footprint(model).bytes
    first = model.generate(PROMPT, max_new_tokens=lean_forwards.PACK_HEAD_MIN_TOKENS)
    key, copy = getattr(head, lean_forwards.PACKED_HEAD_ATTRIBUTE)
    assert weight_footprint(model).bytes == before + internals.onednn_nbytes(copy)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=lean_forwards.PACK_HEAD_MIN_TOKENS), first)
    assert getattr(head, lean_forwards.PACKED_HEAD_ATTRIBUTE)[1] is copy  # not packed again
    with torch.no_grad():  # an in-place change (version counter) invalidates it
        head.weight.mul_(2.0)
    changed = model.generate(PROMPT, max_new_tokens=lean_forwards.PACK_HEAD_MIN_TOKENS)
    assert getattr(head, lean_forwards.PACKED_HEAD_ATTRIBUTE)[1] is not copy
    lean_forwards.drop_packed_head(head)
    monkeypatch.setattr(lean_forwards, "PACK_HEAD_MIN_TOKENS", 10**6)  # the plain matmul: the reference
    assert torch.equal(model.generate(PROMPT, max_new_tokens=32), changed)


def test_a_head_above_the_threshold_is_packed_per_call(monkeypatch):
    model = load("nf4")
    monkeypatch.setattr(lean_forwards, "PACKED_HEAD_CACHE_MAX_BYTES", model.lm_head.weight.nbytes - 1)
    with torch.no_grad():
        model(PROMPT)  # the 4-bit layers take the CPU kernel's layout at the first forward: counted apart
    before = weight_footprint(model).bytes
    model.generate(PROMPT, max_new_tokens=lean_forwards.PACK_HEAD_MIN_TOKENS)
    assert not hasattr(model.lm_head, lean_forwards.PACKED_HEAD_ATTRIBUTE)
    assert weight_footprint(model).bytes == before
