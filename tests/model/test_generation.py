"""Generation: KV cache == recomputation; batched (left padded) == one by one; queries after task tokens."""

from __future__ import annotations

import pytest
import torch

from tests.model.intervention_models import PROMPTS, varied_model


@pytest.fixture(scope="module", name="varied_model")
def varied_model_fixture(tokenizer):
    """A random 2-layer model with large weights, so greedy decoding does not collapse to one repeated token."""
    return varied_model(tokenizer, layers=2)


def _images(rgb_image):
    return [rgb_image, None, [rgb_image, rgb_image[::-1].copy()]]


def test_cache_equals_recompute_greedy_and_sampled(varied_model, rgb_image):
    batch = varied_model.processor(PROMPTS, _images(rgb_image))
    cached = varied_model.generate(batch, max_new_tokens=12)
    full = varied_model.generate(batch, max_new_tokens=12, use_cache=False)
    assert cached.sequences == full.sequences
    assert any(len(set(s)) > 2 for s in cached.sequences)
    sampled = [varied_model.generate(batch, max_new_tokens=12, do_sample=True, top_p=0.9, temperature=1.5,
                                     generator=torch.Generator().manual_seed(7), use_cache=c).sequences
               for c in (True, False)]
    assert sampled[0] == sampled[1]


def test_batched_equals_one_by_one(varied_model, rgb_image):
    images = _images(rgb_image)
    batch = varied_model.processor(PROMPTS, images)
    together = varied_model.generate(batch, max_new_tokens=12).sequences
    for i, prompt in enumerate(PROMPTS):
        alone = varied_model.generate(varied_model.processor(prompt, images[i]), max_new_tokens=12).sequences[0]
        assert alone == together[i]


def test_top_p_restricts_to_nucleus():
    from taskmllm.model.generation import pick_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {pick_tokens(logits, True, 1.0, 0.7, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_picks_of_half_precision_logits_are_their_own_argmax(dtype):
    """Greedy decoding takes the argmax on a float32 copy of half-precision logits: the ids of the half-precision
    argmax itself, a tie resolved to the first index as PyTorch documents it."""
    from taskmllm.model.generation import pick_tokens

    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[1, 100] = logits[1, 4000] = 30.0
    got = pick_tokens(logits, False, 1.0, 1.0, None)
    assert torch.equal(got, logits.argmax(-1)) and got[1].item() == 100


def test_task_token_in_generation_inserts_queries_and_routes_same_states(overfit, rgb_image):
    """The generated <seg>/<det> get K query ids; their hidden states equal the teacher-forced ones."""
    model, prompts, images, answers = overfit
    batch = model.processor(prompts, images)
    out = model.generate(batch, max_new_tokens=24)
    assert [t.strip() for t in out.text] == answers
    for b, seq in enumerate(out.sequences):
        task_pos = [i for i, t in enumerate(seq) if t in model.task_ids]
        assert task_pos, "the overfit model should emit its task token"
        k = model.queries[model.task_ids[seq[task_pos[0]]]].shape[0]
        assert seq[task_pos[0] + 1: task_pos[0] + 1 + k] == [model.query_id] * k
        # teacher-forced: prompt + generated ids, same positions
        single = model.processor(prompts[b], images[b])
        ids = torch.cat([single.input_ids, torch.tensor([seq])], 1)
        single.input_ids, single.attention_mask = ids, torch.ones_like(ids)
        with torch.no_grad():
            hidden = model(single).hidden_states[0, single.input_ids.shape[1] - len(seq):]
        qpos = [i for i, t in enumerate(seq) if t == model.query_id]
        assert torch.allclose(out.hidden_states[b][qpos], hidden[qpos], atol=1e-4)
