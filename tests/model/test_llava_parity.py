"""Parity with a real oracle: transformers' LlavaForConditionalGeneration on the same weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("llava-hf")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _inputs(model, tokenizer, prompt: str):
    """The same ids for both models: our processor expands <image> exactly as llava-hf's does."""
    torch.manual_seed(1)
    pixel_values = torch.randn(1, 3, 32, 32)
    ids = [tokenizer.bos_token_id] + tokenizer.encode(model.processor.format_prompt(prompt, 1, False),
                                                      add_special_tokens=False)
    ids = model.processor._expand_visual(ids, 1)
    return torch.tensor([ids]), pixel_values


def test_convert_cli_then_logits_and_greedy_tokens_match(llava_dir, tokenizer, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.model.processor import Batch

    dst = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "taskmllm.cli", "convert", "llava-hf", str(llava_dir), str(dst)], check=True)
    ours = TaskMLLM.from_pretrained(dst)
    ref = LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True).eval()

    input_ids, pixel_values = _inputs(ours, tokenizer, "What color is the square?")
    with torch.no_grad():
        want = ref(input_ids=input_ids, pixel_values=pixel_values).logits
        batch = Batch(input_ids, torch.ones_like(input_ids), None, pixel_values, [1], [(32, 32)])
        got = ours(batch).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()

    with torch.no_grad():
        ref_tokens = ref.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=20, min_new_tokens=20,
                                  do_sample=False)[0, input_ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    ours_tokens = ours.generate(batch, max_new_tokens=20).sequences[0]
    n = ref_tokens.index(eos) + 1 if eos in ref_tokens else 20
    assert ours_tokens[:n] == ref_tokens[:n]
    assert len(set(ref_tokens)) > 1, "the random oracle should not repeat one token (the test would be weak)"


def test_import_adopts_llavas_language_model_without_a_copy(llava_dir):
    """The imported LLM holds llava's own tensors (the same storage): at no point are there two LLMs."""
    from transformers import LlavaForConditionalGeneration

    from taskmllm.model.llava import adopt_language_model

    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True)
    llm = adopt_language_model(llava)
    theirs = {**{f"decoder.{k}": v for k, v in llava.model.language_model.named_parameters()},
              "lm_head.weight": llava.lm_head.weight}
    ours = {**{f"decoder.{k}": v for k, v in llm.get_decoder().named_parameters()},
            "lm_head.weight": llm.get_output_embeddings().weight}
    assert ours.keys() == theirs.keys()
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)
    assert not any(p.is_meta for p in llm.parameters())


@pytest.mark.parametrize("options", [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2},
                                     {"repetition_penalty": 0.7, "no_repeat_ngram_size": 3}])
def test_repetition_options_match_transformers_generate(llava_dir, options):
    """``repetition_penalty`` / ``no_repeat_ngram_size`` on a left-padded batch: the ids transformers' own
    ``LlavaForConditionalGeneration.generate`` picks with the same options (and they change the answer)."""
    import numpy as np
    from transformers import LlavaForConditionalGeneration

    from taskmllm.model.llava import import_llava_hf

    ours = import_llava_hf(llava_dir)
    ref = LlavaForConditionalGeneration.from_pretrained(llava_dir, local_files_only=True).eval()
    rng = np.random.default_rng(0)
    prompts = ["What color is the square?", "Describe the image in detail, please."]
    batch = ours.processor(prompts, [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in prompts])
    n = 16

    def theirs(**extra):
        with torch.no_grad():
            out = ref.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               pixel_values=batch.pixel_values, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=ours.processor.pad_id, eos_token_id=None, **extra)
        return out[:, batch.input_ids.shape[1]:].tolist()

    ours.tokenizer.eos_token = None  # both produce exactly n ids
    assert ours.generate(batch, max_new_tokens=n, **options).sequences == theirs(**options)
    assert theirs(**options) != theirs(), "the option should change the oracle's answer (else a weak test)"
