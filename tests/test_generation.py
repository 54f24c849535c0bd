"""generate() against transformers' on the same random checkpoints, and by definition where there is no peer.

Test models have a peaky head (the output embedding scaled up) so greedy and beam choices never hinge on
near-ties. End tokens
are picked from the model's own greedy output, so beams and rows really do finish early.
"""
import threading

import pytest
import torch
import torch.nn.functional as F

import qopt
from qopt.errors import GenerationError
from qopt.generation.decoding import generate_text
from qopt.generation.lean_forwards import decode_fast_paths, lean_4bit_forward, lean_int8_forward
from qopt.generation.streamers import TextIteratorStreamer, TextStreamer, stream_generate
from qopt.quant.config import QuantizationConfig
from qopt.quant.modules import quantize_linear, quantize_model

PEAKY = 8.0


@pytest.fixture
def pair(hf_checkpoint):
    folder, hf = hf_checkpoint(peaky=PEAKY)
    return qopt.OPTForCausalLM.from_pretrained(folder, progress=False), hf


@pytest.fixture
def tokenizer():
    return qopt.OPTTokenizer.from_pretrained()


def prompts(batch=3, width=6, seed=0, padded=True):
    """Random prompts starting with </s>; row 0 left-padded by 3 when `padded`."""
    ids = torch.randint(3, 1000, (batch, width), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :3], ids[0, 3], mask[0, :3] = 1, 2, 0
    return ids, mask


def end_tokens(model, ids, mask):
    """Two tokens greedy decoding emits a few steps in, used as end tokens."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    return [int(out[0, -3]), int(out[1, -2])]


def test_greedy_matches_transformers_with_padding_and_end_tokens(pair):
    ours, hf = pair
    ids, mask = prompts()
    eos = end_tokens(ours, ids, mask)
    for kwargs in (dict(eos_token_id=[]), dict(eos_token_id=eos), dict(eos_token_id=eos, repetition_penalty=1.3)):
        a = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kwargs)
        b = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kwargs)
        assert torch.equal(a, b), kwargs
    assert (a[:, ids.shape[1]:] == 1).any(), "no row finished early: the end tokens were not exercised"


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.5, True), (2.0, "never"), (-1.0, False),
                                                           (1.0, True)])
def test_beam_search_matches_transformers(pair, length_penalty, early_stopping):
    ours, hf = pair
    ids, mask = prompts()
    eos = end_tokens(ours, ids, mask)
    for end in (eos, eos[0]):
        kwargs = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping, do_sample=False,
                      eos_token_id=end, num_return_sequences=2, max_new_tokens=10)
        a = ours.generate(ids, attention_mask=mask, **kwargs)
        b = hf.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(a, b), kwargs
        assert a.shape[0] == 6
    assert torch.isin(a[:, ids.shape[1]:], torch.tensor(eos)).any(), "no beam ended with an end token"


@pytest.mark.parametrize("kwargs", [dict(top_k=20, top_p=0.9, temperature=0.8), dict(num_return_sequences=3),
                                    dict(top_k=0, top_p=0.6, repetition_penalty=1.2),
                                    dict(num_beams=2, temperature=1.5)])
def test_seeded_sampling_matches_transformers(pair, kwargs):
    """transformers samples with torch's global generator; `seed` starts ours from the same state."""
    ours, hf = pair
    ids, mask = prompts()
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, seed=7, **kwargs)
    torch.manual_seed(7)
    b = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, **kwargs)
    assert torch.equal(a, b)


def step_distributions(model, out, width, temperature=1.0):
    """The model's next-token probabilities at each generated position of `out` (batch 1, no padding)."""
    with torch.no_grad():
        logits = model(out).logits[0, width - 1:-1].float()
    return (logits / temperature).softmax(-1), out[0, width:]


def test_sampling_is_reproducible_and_respects_top_k_and_top_p(pair):
    ours, _ = pair
    ids, _ = prompts(batch=1, padded=False)
    sample = dict(max_new_tokens=15, do_sample=True, eos_token_id=[], temperature=3.0)
    first = ours.generate(ids, seed=1, top_k=0, **sample)
    assert torch.equal(first, ours.generate(ids, seed=1, top_k=0, **sample))
    assert not torch.equal(first, ours.generate(ids, seed=2, top_k=0, **sample))
    greedy = ours.generate(ids, max_new_tokens=15, eos_token_id=[])
    assert torch.equal(ours.generate(ids, seed=3, **{**sample, "top_k": 1}), greedy)
    out = ours.generate(ids, seed=4, **{**sample, "top_k": 5})
    probs, tokens = step_distributions(ours, out, ids.shape[1], 3.0)
    assert all(int(t) in p.topk(5).indices.tolist() for p, t in zip(probs, tokens, strict=True))
    out = ours.generate(ids, seed=5, **{**sample, "top_k": 0, "top_p": 0.5})
    probs, tokens = step_distributions(ours, out, ids.shape[1], 3.0)
    for p, t in zip(probs, tokens, strict=True):  # the nucleus: tokens whose more likely rivals hold less than top_p
        assert p[p > p[t]].sum() < 0.5 + 1e-5
    assert len(set(tokens.tolist())) > 1


def contrastive_reference(model, ids, k, alpha, steps):
    """Su et al. (2022) straight from the definition: full forwards, no cache, one candidate at a time."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            out = model(seq, output_hidden_states=True)
            context = out.hidden_states[-1][0].float()
            top_probs, top_ids = out.logits[0, -1].float().softmax(-1).topk(k)
            scores = []
            for prob, token in zip(top_probs, top_ids, strict=True):
                hidden = model(torch.cat([seq, token.view(1, 1)], 1), output_hidden_states=True).hidden_states[-1]
                similarity = F.cosine_similarity(context, hidden[0, -1:].float(), dim=-1).max()
                scores.append((1 - alpha) * prob - alpha * similarity)
            seq = torch.cat([seq, top_ids[int(torch.stack(scores).argmax())].view(1, 1)], 1)
    return seq


@pytest.mark.parametrize("alpha", [0.6, 0.9])
def test_contrastive_search_follows_its_definition(pair, alpha):
    ours, _ = pair
    ids, _ = prompts(batch=1, padded=False)
    expected = contrastive_reference(ours, ids, k=4, alpha=alpha, steps=8)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, penalty_alpha=alpha, top_k=4, eos_token_id=[]), expected)
    assert not torch.equal(expected, ours.generate(ids, max_new_tokens=8, eos_token_id=[]))  # not plain greedy


def test_contrastive_batch_with_padding_equals_one_by_one(pair):
    ours, _ = pair
    ids, mask = prompts()
    kwargs = dict(max_new_tokens=6, penalty_alpha=0.6, top_k=4, eos_token_id=[])
    batch = ours.generate(ids, attention_mask=mask, **kwargs)
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        alone = ours.generate(ids[row:row + 1, start:], **kwargs)
        assert torch.equal(batch[row:row + 1, start:], alone)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3, num_return_sequences=2), dict(penalty_alpha=0.5, top_k=3),
                                    dict(do_sample=True, seed=3, top_k=10)])
def test_cached_and_uncached_decoding_agree(pair, kwargs):
    ours, _ = pair
    ids, mask = prompts()
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=True, **kwargs)
    b = ours.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=False, **kwargs)
    assert torch.equal(a, b)


def test_left_padded_batch_equals_one_by_one(pair):
    ours, _ = pair
    ids, mask = prompts(batch=3, width=7)
    ids[1, :2], mask[1, :2], ids[1, 2] = 1, 0, 2
    eos = end_tokens(ours, ids, mask)
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    for row in range(3):
        start = int((mask[row] == 0).sum())
        alone = ours.generate(ids[row:row + 1, start:], max_new_tokens=10, eos_token_id=eos)[0, ids.shape[1] - start:]
        new = batch[row, ids.shape[1]:]
        assert torch.equal(new[:len(alone)], alone)
        assert (new[len(alone):] == 1).all()  # finished rows are padded
    # without a mask, padding tokens in the prompt are found the way transformers does
    assert torch.equal(ours.generate(ids, max_new_tokens=10, eos_token_id=eos), batch)


def test_streamers_yield_the_generated_text(pair, tokenizer):
    ours, _ = pair
    ids, _ = prompts(batch=1, padded=False)
    out = ours.generate(ids, max_new_tokens=12, eos_token_id=[])
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    pieces = []
    ours.generate(ids, max_new_tokens=12, eos_token_id=[],
                  streamer=TextStreamer(tokenizer, skip_prompt=True, on_text=pieces.append, skip_special_tokens=True))
    assert "".join(pieces) == expected and len(pieces) > 1
    assert "".join(stream_generate(ours, ids, tokenizer, max_new_tokens=12, eos_token_id=[])) == expected
    steps = []
    ours.generate(ids, max_new_tokens=12, eos_token_id=[], streamer=steps.append)
    assert torch.equal(torch.cat(steps), out[0, ids.shape[1]:])
    streamer = TextIteratorStreamer(tokenizer)
    thread = threading.Thread(target=ours.generate, args=(ids,), daemon=True,
                              kwargs=dict(max_new_tokens=12, eos_token_id=[], streamer=streamer))
    thread.start()
    assert "".join(streamer) == tokenizer.decode(out[0])
    thread.join()


def test_streamer_releases_whole_characters_and_words(tokenizer):
    text = "naïve café 😀 日本語 done"
    pieces = []
    streamer = TextStreamer(tokenizer, on_text=pieces.append, skip_special_tokens=True)
    for token in tokenizer.encode(text):
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "naïve " in pieces and "😀 " in pieces


def test_stream_generate_reraises_errors(pair, tokenizer):
    ours, _ = pair
    with pytest.raises(GenerationError, match="top_p"):
        list(stream_generate(ours, prompts(1, padded=False)[0], tokenizer, top_p=2.0))


def test_stop_strings_match_transformers(pair, tokenizer, tokenizer_dir):
    from transformers import GPT2Tokenizer

    ours, hf = pair
    ids, mask = prompts()
    full = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    stop = tokenizer.decode(full[1, ids.shape[1] + 4:ids.shape[1] + 6])[1:]  # spans two tokens, drops a char
    kwargs = dict(max_new_tokens=12, eos_token_id=[], stop_strings=stop, do_sample=False)
    a = ours.generate(ids, attention_mask=mask, tokenizer=tokenizer, **kwargs)
    b = hf.generate(ids, attention_mask=mask, tokenizer=GPT2Tokenizer.from_pretrained(tokenizer_dir), **kwargs)
    assert torch.equal(a, b)
    assert stop in tokenizer.decode(a[1]) and (a[1, ids.shape[1]:] == 1).any()  # row 1 stopped, then padded


@pytest.mark.parametrize("kwargs,name", [
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(num_beams=0), "num_beams"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(early_stopping="soon"), "early_stopping"),
    (dict(stop_strings="x"), "tokenizer"), (dict(num_beams=2, streamer=print), "num_beams"),
    (dict(bogus=1), "bogus"), (dict(penalty_alpha=2.0), "penalty_alpha")])
def test_bad_arguments_are_clear_errors(pair, kwargs, name):
    ours, _ = pair
    with pytest.raises(GenerationError, match=name):
        ours.generate(prompts(1, padded=False)[0], **kwargs)


def test_lengths_and_prompt_edge_cases(pair):
    ours, _ = pair
    ids, mask = prompts()
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=0), ids)
    assert ours.generate(ids, attention_mask=mask, eos_token_id=[]).shape[1] == ids.shape[1] + 20  # HF's default
    assert ours.generate(ids, attention_mask=mask, max_length=9, eos_token_id=[]).shape[1] == 9
    with pytest.raises(GenerationError, match="</s>"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(GenerationError, match="all zeros"):
        ours.generate(ids, attention_mask=mask * 0)
    with pytest.raises(GenerationError, match=r"6 tokens \+ 59 new tokens = 65 .*max_position_embeddings=64"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=59)
    assert ours.generate(ids, attention_mask=mask, max_new_tokens=58, eos_token_id=[]).shape[1] == 64


@pytest.mark.parametrize("name", ["int8", "nf4", "fp4"])
def test_lean_quantized_forwards_are_bit_identical(name):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        module = quantize_linear(torch.nn.Linear(128, 192).to(dtype), QuantizationConfig.from_name(name)).eval()
        with torch.no_grad():
            module(torch.randn(1, 128, dtype=dtype))  # the first call packs (4-bit) or moves (int8) the weight
            lean = (lean_int8_forward if name == "int8" else lean_4bit_forward)(module)
            for shape, scale in (((1, 1, 128), 1.0), ((2, 5, 128), 1.0), ((1, 1, 128), 5.0), ((2, 7, 128), 5.0)):
                x = torch.randn(shape, dtype=dtype) * scale  # scale 5: LLM.int8 outlier columns (|x| >= 6)
                assert torch.equal(lean(x), module(x)), (dtype, shape, scale)


@pytest.mark.parametrize("name", ["int8", "nf4"])
def test_lean_forwards_leave_training_and_gradients_to_the_module(name):
    module = quantize_linear(torch.nn.Linear(64, 64), QuantizationConfig.from_name(name))
    lean = (lean_int8_forward if name == "int8" else lean_4bit_forward)(module)
    x = torch.randn(2, 64, requires_grad=True)
    lean(x).sum().backward()  # goes through bitsandbytes' autograd function
    assert x.grad is not None and x.grad.abs().sum() > 0
    module.train()
    with torch.no_grad():
        assert torch.equal(lean(x), module(x))


@pytest.mark.parametrize("name", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_quantized_models_equals_manual_stepping(hf_checkpoint, name, dtype):
    """Our decode path (packed head, lean quantized forwards) gives the tokens the model's own forward gives."""
    folder, _ = hf_checkpoint(peaky=PEAKY)
    model = quantize_model(qopt.OPTForCausalLM.from_pretrained(folder, torch_dtype=dtype, progress=False), name)
    ids, _ = prompts(batch=2, padded=False)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        seq = ids
        for _ in range(40):
            token = out.logits[:, -1].float().argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
        with decode_fast_paths(model, 40):
            patched = [m for m in model.modules() if "forward" in vars(m)]
    assert len(patched) == 2 * 6 + 1  # every quantized Linear and the head
    assert not any("forward" in vars(m) for m in model.modules())  # restored
    assert torch.equal(model.generate(ids, max_new_tokens=40, eos_token_id=[]), seq)


def test_generate_with_a_layer_offloaded_to_disk_equals_in_memory(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint(peaky=PEAKY)
    ids, mask = prompts()
    expected = qopt.load(folder, quantization="nf4", progress=False)
    placement = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                 "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu", "model.decoder.layers.0": "cpu",
                 "model.decoder.layers.1": "disk"}
    offloaded = qopt.load(folder, quantization="nf4", device_map=placement, offload_folder=tmp_path,
                          progress=False)
    for kwargs in (dict(), dict(num_beams=2)):
        assert torch.equal(offloaded.generate(ids, attention_mask=mask, max_new_tokens=20, **kwargs),
                           expected.generate(ids, attention_mask=mask, max_new_tokens=20, **kwargs))


def test_generate_text_and_cli(hf_checkpoint, capsys):
    from qopt.cli import main

    folder, _ = hf_checkpoint(peaky=PEAKY, vocab_size=50272)
    model = qopt.OPTForCausalLM.from_pretrained(folder, progress=False)
    tok = qopt.OPTTokenizer.from_pretrained()
    pieces = []
    [text] = generate_text(model, tok, "Hello world", on_text=pieces.append, max_new_tokens=8, eos_token_id=[])
    assert "".join(pieces) == text and text
    assert main(["generate", str(folder), "Hello world", "--bits", "16", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Hello world") and len(printed.strip()) > len("Hello world")
    assert main(["generate", str(folder), "Hello world", "--bits", "4", "--max-new-tokens", "3", "--stream",
                 "--do-sample", "--seed", "1"]) == 0
    assert main(["generate", str(folder), "Hello", "--top-p", "3"]) == 2
    assert "--top-p 3.0: expected a number in (0, 1]" in capsys.readouterr().err  # the flag, before the load
