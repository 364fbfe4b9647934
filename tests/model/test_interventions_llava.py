"""VHR and VAR on a model imported from a (tiny random) transformers LLaVA checkpoint: batch > 1 with left padding,
a task token (with its queries) in the generation, KV cache == recomputation, batched == one by one, and the
routed query hidden states equal the teacher-forced ones under the same intervention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmllm.model.interventions import VAR, VHR
from tests.model.intervention_models import plant_sink

pytest.importorskip("transformers")

PROMPTS = ["Segment the green star.", "What color is the square in the image?", "Find all hexagons."]
ANSWER = "<seg> red."


@pytest.fixture(scope="module")
def llava_model(tmp_path_factory, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from taskmllm.model.llava import import_llava_hf

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    path = tmp_path_factory.mktemp("llava-hf-interventions")
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = import_llava_hf(path, {"seg": 1, "det": 4, "track": 1})
    plant_sink(model, tokenizer.bos_token_id, 5)
    # teach only the LM head to answer with a task token (cheap: no backward through the transformer)
    batch = model.processor(PROMPTS, _images(), answers=[ANSWER] * len(PROMPTS))
    with torch.no_grad():
        out = model(batch)
    head = model.llm.get_output_embeddings()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    labels = batch.labels[:, 1:].reshape(-1)
    for _ in range(40):
        logits = head(out.hidden_states[:, :-1]).reshape(-1, head.weight.shape[0])
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _images():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), None, rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]


@pytest.mark.parametrize("make", [lambda: VHR(alpha=2.0), lambda: VAR(p=0.6, rho=0.3, tau=5.0, mode="paper")],
                         ids=["VHR", "VAR"])
def test_intervention_on_imported_llava(llava_model, make):
    model = llava_model
    ims = _images()
    batch = model.processor(PROMPTS, ims)
    assert (batch.attention_mask == 0).any(), "the batch must be left padded"
    intervention = make()
    out = model.generate(batch, max_new_tokens=6, intervention=intervention)
    if isinstance(intervention, VHR):
        assert intervention.selected_heads[1][[0, 2]].any() and not intervention.selected_heads[1][1].any()
    else:
        assert intervention.sink_dims is None and intervention.dims_for(model) == [5], "calibrated automatically"
        assert intervention.selected_counts[0][[0, 2]].sum() > 0
    full = model.generate(batch, max_new_tokens=6, intervention=intervention, use_cache=False)
    assert out.sequences == full.sequences
    seg = model.tokenizer.convert_tokens_to_ids("<seg>")
    for b, seq in enumerate(out.sequences):
        assert seg in seq, f"sample {b} should emit its task token: {out.text[b]!r}"
        i = seq.index(seg)
        assert seq[i + 1] == model.query_id
        alone = model.generate(model.processor(PROMPTS[b], ims[b]), max_new_tokens=6, intervention=intervention)
        assert alone.sequences[0] == seq
        # teacher-forced under the same intervention (attached for the prompt): same query hidden state
        single = model.processor(PROMPTS[b], ims[b])
        with intervention.attach(model, single), torch.no_grad():
            ids = torch.cat([single.input_ids, torch.tensor([seq])], 1)
            single.input_ids, single.attention_mask = ids, torch.ones_like(ids)
            hidden = model(single).hidden_states[0, ids.shape[1] - len(seq):]
        torch.testing.assert_close(out.hidden_states[b][i + 1], hidden[i + 1], atol=1e-4, rtol=1e-4)
