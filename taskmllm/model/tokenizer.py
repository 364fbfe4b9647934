"""Tokenizers: train a byte-level BPE offline with ``tokenizers``, and add the protocol tokens to any tokenizer.

Every protocol token (``model/tokens.py``) is an added special token, so it is always exactly one id and is
never split or merged with the text around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from taskmllm.model.tokens import PROTOCOL_TOKENS

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers ``PreTrainedTokenizerFast``.

    Digits are split one by one (box coordinates tokenize regularly); any byte sequence is encodable.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` and all protocol tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [BOS, EOS, PAD, UNK, *PROTOCOL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)
    add_protocol_tokens(fast)
    return fast


def add_protocol_tokens(tokenizer) -> int:
    """Register every protocol token as a special token of ``tokenizer``; returns how many were new."""
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(PROTOCOL_TOKENS)},
                                 replace_extra_special_tokens=False)
    return len(tokenizer) - before


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved by ``save_pretrained`` from a local directory (never from a hub)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_protocol_tokens(tok)
    return tok
