"""The fine-tune memory plan (`qopt.plan_finetune`, `qopt plan --finetune`) against independent counts."""
import weakref

import bitsandbytes as bnb
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import qopt
from qopt.cli.main import main
from qopt.evaluation.footprint import weight_footprint
from qopt.finetuning.lora import LoraConfig, add_lora
from qopt.finetuning.plan import largest_fitting, optimizer_bytes, plan_finetune
from qopt.finetuning.recipe import prepare_for_kbit_training
from qopt.finetuning.step_speedups import auto_checkpointing, fast_path, half_precision_head

TINY = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, ffn_dim=512, num_attention_heads=4,
            max_position_embeddings=64, dropout=0.1)
TARGETS = ["q_proj", "v_proj", "fc1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = qopt.OPTForCausalLM(qopt.OPTConfig(**TINY))
    model.init_weights()
    folder = tmp_path_factory.mktemp("plan") / "tiny"
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def trained_model(folder, r=16, gradient_checkpointing=True, fused=True):
    """The qopt.finetune path: NF4 base, float32 elsewhere, prepared, adapter added, tied head back in bf16 and
    (`fused`) the loss through it a chunk at a time."""
    model = qopt.load(folder, quantization="nf4", torch_dtype=None, progress=False)
    prepare_for_kbit_training(model, bool(gradient_checkpointing))
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    add_lora(model, lora)
    if fused:
        assert fast_path(model) == ("half_head", "fused_loss")
    else:
        assert half_precision_head(model)
    return model, lora


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still alive (what the plan's activations,
    gradients and optimizer state count), independent of the plan's formula."""

    def __init__(self, known):
        super().__init__()
        self.known, self.live, self.now, self.peak = known, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or key in self.known or not storage.nbytes():
                    continue
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key, 0)


def test_adapter_gradient_and_optimizer_bytes_match_the_layers_add_lora_adds(tiny):
    plan = plan_finetune(tiny, r=16, target_modules=TARGETS, optimizer="adamw8bit", batch=2, seq=32)
    model = trained_model(tiny, r=16)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    assert plan.trainable == sum(p.numel() for p in params) == 2 * 16 * (128 + 128 + 128 + 128 + 128 + 512)
    assert plan.lora_layers == 6 and plan.targets == sorted(TARGETS)
    assert plan.sizes.lora == plan.sizes.grads == 4 * plan.trainable
    # bitsandbytes' 8-bit AdamW after one step: its state tensors, counted (the shared code books left out)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = bnb.optim.AdamW8bit(params)
    optimizer.step()
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
                if isinstance(v, torch.Tensor) and not k.startswith("qmap") and v.dim())
    assert plan.sizes.optimizer == state
    assert optimizer_bytes([p.numel() for p in params], "adamw") == 8 * plan.trainable


def test_base_weights_match_the_loaded_model(tiny):
    plan = plan_finetune(tiny, r=16, target_modules=TARGETS, batch=2, seq=32)
    model = qopt.load(tiny, quantization="nf4", torch_dtype=None, progress=False)
    prepare_for_kbit_training(model)
    half_precision_head(model)
    model.train()  # training holds the standard 4-bit layout (the CPU kernel's, built at load, is undone)
    measured = weight_footprint(model).bytes
    assert plan_finetune(tiny, seq=32, half_head=False).sizes.weights - plan.sizes.weights == 1000 * 128 * 2
    assert abs(plan.sizes.weights - measured) <= 0.01 * measured, (plan.sizes.weights, measured)


@pytest.mark.parametrize("checkpointing,fused", [(True, True), (False, True), (True, False), (False, False)])
def test_activation_peak_matches_the_live_tensors_of_a_training_step(tiny, checkpointing, fused):
    batch, seq = 4, 64
    plan = plan_finetune(tiny, r=16, target_modules=TARGETS, batch=batch, seq=seq,
                         gradient_checkpointing=checkpointing, fused_loss=fused)
    model = trained_model(tiny, r=16, gradient_checkpointing=checkpointing, fused=fused)[0].train()
    known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            known |= {state.absmax.untyped_storage().data_ptr(), state.code.untyped_storage().data_ptr()}
    ids = torch.randint(3, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    with LiveBytes(known) as tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    predicted = plan.sizes.peak_activations + plan.sizes.grads
    assert abs(predicted - tracker.peak) <= 0.15 * tracker.peak, (predicted, tracker.peak)


def test_opt_30b_does_not_fit_a_colab_t4(capsys):
    plan = plan_finetune("opt-30b", machine="colab-t4")
    assert not plan.fits and plan.compute_dtype == torch.float16
    assert plan.sizes.weights > plan.machine.gpu_bytes  # the 4-bit weights alone exceed 15 GiB
    assert plan.largest_batch == 0 and plan.verdict.startswith("does not fit: training needs")
    assert main(["plan", "opt-30b", "--finetune", "--machine", "colab-t4"]) == 1
    out = capsys.readouterr().out
    assert "verdict: does not fit" in out and "optimizer state" in out and "host RAM during the load" in out
    assert main(["plan", "opt-125m", "--finetune", "--machine", "colab-t4", "--batch", "8"]) == 0
    assert "verdict: fits on the GPU" in capsys.readouterr().out


def test_the_largest_batch_is_the_edge_of_a_monotonic_search():
    totals = [plan_finetune("opt-1.3b", machine="colab-t4", batch=b, seq=512).sizes.total for b in (1, 2, 4, 8, 16)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    seqs = [plan_finetune("opt-1.3b", machine="colab-t4", batch=4, seq=s).sizes.total for s in (64, 256, 1024)]
    assert seqs == sorted(seqs)
    plan = plan_finetune("opt-1.3b", machine="colab-t4", batch=4, seq=512)
    edge = plan.largest_batch
    assert edge > 4
    assert plan_finetune("opt-1.3b", machine="colab-t4", batch=edge, seq=512).fits
    assert not plan_finetune("opt-1.3b", machine="colab-t4", batch=edge + 1, seq=512).fits
    assert plan_finetune("opt-1.3b", machine="rtx-24gb", batch=4, seq=512).largest_batch > edge
    assert plan_finetune("opt-1.3b", machine="colab-t4", batch=4, seq=512,
                         gradient_checkpointing=False).largest_batch < edge
    assert largest_fitting(lambda n: n <= 37, 1000) == 37 and largest_fitting(lambda n: False, 10) == 0


def test_bad_settings_are_one_line_errors(capsys):
    with pytest.raises(ValueError, match="no bfloat16"):
        plan_finetune("opt-125m", machine="colab-t4", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="machine 'tpu'"):
        plan_finetune("opt-125m", machine="tpu")
    assert main(["plan", "opt-125m", "--finetune", "--seq", "4096"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_auto_checkpointing_recomputes_the_fewest_layers_within_the_standard_recipes_tensors():
    config = qopt.OPTConfig(vocab_size=16384, hidden_size=512, num_hidden_layers=8, ffn_dim=2048,
                            num_attention_heads=4, max_position_embeddings=512)
    settings = dict(machine="cpu", batch=4, seq=256)
    live = lambda plan: plan.sizes.total - plan.sizes.runtime  # noqa: E731  (what the tensors hold)
    standard = plan_finetune(config, gradient_checkpointing=True, half_head=False, fused_loss=False, **settings)
    auto = plan_finetune(config, gradient_checkpointing="auto", **settings)
    everything = plan_finetune(config, gradient_checkpointing=True, **settings)
    assert everything.checkpointed_layers == 8 and live(everything) < live(standard)  # the fast path saves ...
    assert 0 < auto.checkpointed_layers < 8  # ... memory, which buys back some recomputation, not all of it here
    assert live(auto) <= live(standard)
    one_fewer = plan_finetune(config, gradient_checkpointing=auto.checkpointed_layers - 1, **settings)
    assert live(one_fewer) > live(standard)  # the fewest: one layer less would not stay within
    assert f"on for {auto.checkpointed_layers} of 8 layers" in auto.format()


def test_a_partly_checkpointed_step_has_the_planned_peak_and_the_same_gradients(tiny):
    batch, seq = 4, 64
    ids = torch.randint(3, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    grads, peaks = [], []
    for layers in (2, 1):  # all layers recomputed, then only the first
        torch.manual_seed(0)
        model, lora = trained_model(tiny, r=16)
        model.gradient_checkpointing_enable(layers=layers)
        model.train()
        known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        for module in model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None:
                known |= {state.absmax.untyped_storage().data_ptr(), state.code.untyped_storage().data_ptr()}
        torch.manual_seed(1)  # the same dropout masks in both runs
        with LiveBytes(known) as tracker:
            model(input_ids=ids, labels=ids).loss.backward()
        peaks.append(tracker.peak)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    assert peaks[1] > peaks[0]  # the layer kept costs memory: what "auto" trades
    for layers, peak in zip((2, 1), peaks, strict=True):
        planned = plan_finetune(tiny, r=16, target_modules=TARGETS, batch=batch, seq=seq,
                                gradient_checkpointing=layers)
        predicted = planned.sizes.peak_activations + planned.sizes.grads
        assert abs(predicted - peak) <= 0.15 * peak, (layers, predicted, peak)
    assert auto_checkpointing(model, lora, batch, seq) in (0, 1, 2)
