"""A tiny random transformers LLaVA on disk (what a user's `llava-1.5-7b-hf` folder looks like, at toy size),
with a plain tokenizer: its own specials and ``<image>`` only, no taskmllm token."""

from __future__ import annotations

from pathlib import Path

import torch


def plain_tokenizer(vocab_size: int = 500):
    """A byte-level BPE trained on ShapesWorld texts with ``<s> </s> <pad> <unk> <image>`` as its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from taskmllm.data.shapesworld.conversations import corpus

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>", "<unk>", "<image>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus(3000, seed=0)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def save_tiny_llava(path: Path, tokenizer=None) -> Path:
    """A random ``LlavaForConditionalGeneration`` (CLIP 32 px / patch 8, Llama 64 x 2) saved with its tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = tokenizer or plain_tokenizer()
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       initializer_range=0.2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
