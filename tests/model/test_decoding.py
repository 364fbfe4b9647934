"""The static-cache / compiled decode step gives today's tokens; repetition options; their validation."""

from __future__ import annotations

import pytest
import torch

from taskmllm.errors import ConfigError
from taskmllm.model.decoding import StaticDecoder, static_length
from tests.model.intervention_models import PROMPTS, varied_model


@pytest.fixture(scope="module", name="varied_model")
def varied_model_fixture(tokenizer):
    """A random 2-layer model with large weights, so greedy decoding does not collapse to one repeated token."""
    return varied_model(tokenizer, layers=2)


def test_static_cache_feeds_like_the_dynamic_cache(varied_model, rgb_image):
    """A left-padded prefill, a chunk of a task token + 4 queries in one row (2 and 0 positions in the others) and a
    one-token step with a finished row, through the static cache (eager steps): the logits and hidden states of
    every real position equal those of transformers' DynamicCache path."""
    from taskmllm.model.decoding import DynamicDecoder
    from taskmllm.model.processor import positions

    model = varied_model
    batch = model.processor(PROMPTS, [rgb_image, None, None])
    emb = model.embed(batch.input_ids, model.encode_images(batch.pixel_values)[1])
    mask = batch.attention_mask
    chunk_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    step_mask = torch.tensor([[1], [1], [0]])
    torch.manual_seed(0)
    chunk, step = torch.randn(3, 5, emb.shape[-1]), torch.randn(3, 1, emb.shape[-1])
    start = mask.sum(-1, keepdim=True)
    chunk_pos = start + torch.minimum(torch.arange(5)[None], (chunk_mask.sum(-1, keepdim=True) - 1).clamp(min=0))
    step_pos = start + chunk_mask.sum(-1, keepdim=True)
    outs = []
    with torch.no_grad():
        for decoder in (DynamicDecoder(model, True, 3, 64), StaticDecoder(model, 3, 64, compiled=False)):
            outs.append([decoder.feed(emb, mask, positions(mask), last_only=True),
                         decoder.feed(chunk, chunk_mask, chunk_pos), decoder.feed(step, step_mask, step_pos)])
        assert isinstance(decoder.cache, __import__("transformers").StaticCache) and decoder.length == 64
    for (dyn_logits, dyn_hidden), (st_logits, st_hidden), real in zip(*outs, (mask, chunk_mask, step_mask)):
        keep = real.bool() if dyn_logits.shape[1] == real.shape[1] else real.bool()[:, -1:]
        assert torch.allclose(st_logits[keep], dyn_logits[keep], atol=1e-4, rtol=1e-5)
        assert torch.allclose(st_hidden[real.bool()], dyn_hidden[real.bool()], atol=1e-4, rtol=1e-5)
        assert torch.isfinite(st_hidden).all()  # padding rows attend to themselves: finite, read by nobody


def test_compiled_decode_gives_the_same_tokens(varied_model, rgb_image):
    """``compile=True`` (StaticCache + torch.compile'd one-token step): greedy tokens equal to the default decoder's
    on a left-padded batch with an image, a text-only and a video sample; a second call reuses the compiled step."""
    batch = varied_model.processor(PROMPTS, [rgb_image, None, [rgb_image, rgb_image[::-1].copy()]])
    want = varied_model.generate(batch, max_new_tokens=16).sequences
    assert any(len(set(s)) > 2 for s in want)
    assert varied_model.generate(batch, max_new_tokens=16, compile=True).sequences == want
    steps = dict(varied_model.decode_steps._steps)
    assert varied_model.generate(batch, max_new_tokens=16, compile=True).sequences == want
    assert varied_model.decode_steps._steps == steps and len(steps) == 1


def test_compiled_decode_keeps_task_queries_and_their_states(overfit):
    """Generated task tokens, their K queries fed in one chunk: ``compile=True`` gives the default decoder's ids and
    query hidden states (what the experts read)."""
    model, prompts, images, _ = overfit
    batch = model.processor(prompts, images)
    want = model.generate(batch, max_new_tokens=24)
    got = model.generate(batch, max_new_tokens=24, compile=True)
    assert any(t in model.task_ids for s in want.sequences for t in s), "the overfit model should emit a task"
    assert got.sequences == want.sequences
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert torch.allclose(a, b, atol=1e-4)


def test_compile_refuses_what_it_cannot_run(varied_model):
    from taskmllm.model.interventions import VHR

    batch = varied_model.processor("Describe it.")
    with pytest.raises(ConfigError, match="cannot be combined with an intervention"):
        varied_model.generate(batch, compile=True, intervention=VHR())
    with pytest.raises(ConfigError, match="cannot be combined with use_cache=False"):
        varied_model.generate(batch, compile=True, use_cache=False)
    with pytest.raises(ConfigError, match="compile must be True or False, got 'yes'"):
        varied_model.generate(batch, compile="yes")


@pytest.mark.parametrize("options, message", [
    ({"repetition_penalty": 0}, r"repetition_penalty must be a finite number > 0, got 0"),
    ({"repetition_penalty": float("nan")}, r"repetition_penalty must be a finite number > 0, got nan"),
    ({"repetition_penalty": "2"}, r"repetition_penalty must be a finite number > 0, got '2' \(str\)"),
    ({"no_repeat_ngram_size": -1}, r"no_repeat_ngram_size must be an integer >= 0, got -1"),
    ({"no_repeat_ngram_size": 2.5}, r"no_repeat_ngram_size must be an integer >= 0, got 2.5 \(float\)"),
    ({"no_repeat_ngram_size": True}, r"no_repeat_ngram_size must be an integer >= 0, got True \(bool\)"),
])
def test_repetition_options_are_checked(varied_model, options, message):
    with pytest.raises(ConfigError, match=message):
        varied_model.generate(varied_model.processor("Describe it."), **options)


def test_no_repeat_ngram_forbids_a_repeated_id_and_penalty_one_is_the_identity(varied_model, rgb_image):
    batch = varied_model.processor(PROMPTS, [rgb_image, None, None])
    plain = varied_model.generate(batch, max_new_tokens=16).sequences
    assert varied_model.generate(batch, max_new_tokens=16, repetition_penalty=1.0,
                                 no_repeat_ngram_size=0).sequences == plain
    assert any(len(set(s)) < len(s) for s in plain), "the plain answers should repeat an id (else a weak test)"
    out = varied_model.generate(batch, max_new_tokens=16, no_repeat_ngram_size=1)
    prompt_ids = [set(row[m.bool()].tolist()) for row, m in zip(batch.input_ids, batch.attention_mask)]
    for seen, seq in zip(prompt_ids, out.sequences):
        body = [t for t in seq if t != varied_model.tokenizer.eos_token_id]
        assert len(set(body)) == len(body) and not seen & set(body)  # 1-grams: nothing of prompt + answer twice


def test_an_unpadded_sdpa_decode_step_needs_no_mask(varied_model, rgb_image):
    """A one-token step of a batch that was never padded goes to the LM without a mask; its logits equal those of
    the same step given the 2D mask of everything fed (transformers' own path)."""
    from taskmllm.model.decoding import DynamicDecoder
    from taskmllm.model.processor import positions

    model = varied_model
    batch = model.processor(PROMPTS[:1], [rgb_image])
    step = torch.randn(1, 1, model.llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad():
        emb = model.embed(batch.input_ids, model.encode_images(batch.pixel_values)[1])
        for keep_2d in (False, True):
            decoder = DynamicDecoder(model, True, 1, 64)
            decoder.feed(emb, batch.attention_mask, positions(batch.attention_mask), last_only=True)
            assert decoder.sdpa and not decoder.padded and decoder._attention_mask(1) is None
            decoder.sdpa = not keep_2d  # False: the 2D mask, as for any other attention
            next_pos = batch.attention_mask.sum(-1, keepdim=True)  # (1, 1)
            outs.append(decoder.feed(step, torch.ones(1, 1, dtype=torch.long), next_pos))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


def test_static_length_buckets():
    assert static_length(1, 2048) == 32 and static_length(33, 2048) == 64 and static_length(64, 2048) == 64
    assert static_length(300, 200) == 300  # never below what is needed
    assert static_length(100, 110) == 110  # rounded up to 128, capped at the context


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_decoders_grow_past_their_first_capacity(varied_model, kind):
    """A call that feeds more than its decoder's first capacity (many task queries): the caches grow, keeping what
    was fed — the hidden states equal those of a decoder that was large enough from the start."""
    from taskmllm.model.decoding import DynamicDecoder
    from taskmllm.model.processor import positions

    model = varied_model
    batch = model.processor(["Describe it.", "Is there a star?"])
    emb = model.embed(batch.input_ids, None)
    mask = batch.attention_mask
    torch.manual_seed(1)
    chunks = [torch.randn(2, 40, emb.shape[-1]) for _ in range(4)]
    outs, sizes = [], []
    with torch.no_grad():
        for capacity in (mask.shape[1] + 1, 512):
            decoder = (DynamicDecoder(model, True, 2, capacity) if kind == "dynamic"
                       else StaticDecoder(model, 2, capacity, compiled=False))
            start = mask.sum(-1, keepdim=True)
            hidden = [decoder.feed(emb, mask, positions(mask), last_only=True)[1]]
            for i, chunk in enumerate(chunks):
                pos = start + 40 * i + torch.arange(40)[None]
                hidden.append(decoder.feed(chunk, torch.ones(2, 40, dtype=torch.long), pos)[1])
            outs.append(torch.cat(hidden, 1))
            sizes.append(decoder.buffer.shape[1] if kind == "dynamic" else decoder.length)
    assert sizes[0] >= mask.shape[1] + 160 and sizes[0] < 512  # the first decoder grew
    real = torch.cat([mask, torch.ones(2, 160, dtype=torch.long)], 1).bool()
    assert torch.allclose(outs[0][real], outs[1][real], atol=1e-4, rtol=1e-5)


def test_the_cache_reaches_the_decoder_under_the_installed_name(varied_model, rgb_image):
    """run_llm passes the cache as the installed transformers names it (``cache`` from 5.24, which warns on
    ``past_key_values``): the prefill fills it, with no deprecation warning, and generate's tokens are unchanged."""
    import warnings

    from taskmllm.model.decoding import DynamicDecoder, cache_keyword
    from taskmllm.model.processor import positions

    model = varied_model
    name = cache_keyword(type(model.llm.get_decoder()))
    assert name in __import__("inspect").signature(type(model.llm.get_decoder()).forward).parameters
    batch = model.processor(PROMPTS[:1], [rgb_image])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        emb = model.embed(batch.input_ids, model.encode_images(batch.pixel_values)[1])
        decoder = DynamicDecoder(model, True, 1, 64)
        decoder.feed(emb, batch.attention_mask, positions(batch.attention_mask), last_only=True)
        assert decoder.cache.get_seq_length() == emb.shape[1]
        cached = model.generate(batch, max_new_tokens=6)
    assert cached.sequences == model.generate(batch, max_new_tokens=6, use_cache=False).sequences


def test_a_second_cache_length_compiles_once_for_every_later_length(tokenizer):
    """Three prompts whose caches round to three lengths: the first length and one dynamic-length step are
    compiled, the third length reuses the second's graph; every call gives the default decoder's tokens."""
    from torch._dynamo.utils import counters

    model = varied_model(tokenizer, layers=2)
    lengths, graphs = [], []
    for words in (0, 20, 38):
        batch = model.processor(["Describe it." + " Again." * words])
        want = model.generate(batch, max_new_tokens=6).sequences
        before = counters["stats"]["unique_graphs"]
        assert model.generate(batch, max_new_tokens=6, compile=True).sequences == want
        graphs.append(counters["stats"]["unique_graphs"] - before)
        lengths.append(static_length(batch.input_ids.shape[1] + 6, model.processor.max_length))
    assert len(set(lengths)) == 3, lengths
    assert graphs[0] >= 1 and graphs[1] >= 1 and graphs[2] == 0, graphs


def test_each_call_checks_its_first_compiled_step_in_full(tokenizer, monkeypatch):
    """A call's first compiled step runs Dynamo's guards; its later steps skip all but the differentiating ones.
    So a model changed between calls (its parameters cast in place to float64) gets a step compiled for it, and
    the tokens of the eager float64 model (a float32 graph run on it unchecked would not give them)."""
    from taskmllm.model.decoding import CompiledSteps

    model = varied_model(tokenizer, layers=2)
    batch = model.processor(["Describe it. Again."])
    guarded = []
    run = CompiledSteps.run

    def spy(step, checked, *args):
        guarded.append(checked)
        return run(step, checked, *args)

    monkeypatch.setattr(CompiledSteps, "run", staticmethod(spy))
    want = model.generate(batch, max_new_tokens=6).sequences
    assert model.generate(batch, max_new_tokens=6, compile=True).sequences == want
    assert guarded == [True, False, False, False, False], guarded  # 5 one-token steps after the prefill
    model.to(torch.float64)
    want = model.generate(batch, max_new_tokens=6).sequences
    guarded.clear()
    assert model.generate(batch, max_new_tokens=6, compile=True).sequences == want
    assert guarded[0] and not any(guarded[1:])
