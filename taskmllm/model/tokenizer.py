"""Tokenizers: train a byte-level BPE offline with ``tokenizers``, and add the protocol tokens to any tokenizer.

Every protocol token (``model/tokens.py``) is an added special token, so it is always exactly one id and is
never split or merged with the text around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.model.tokens import PROTOCOL_TOKENS, task_token

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, tasks: Iterable[str] = ()):
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers ``PreTrainedTokenizerFast``.

    Digits are split one by one (box coordinates tokenize regularly); any byte sequence is encodable.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<s>``, ``</s>``, ``<pad>``, ``<unk>``, the protocol tokens and the
        task tokens of ``tasks`` (task names), in that order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tasks = list(tasks)
    special = [BOS, EOS, PAD, UNK, *PROTOCOL_TOKENS, *(task_token(t) for t in tasks)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)
    add_protocol_tokens(fast, tasks)
    return fast


def add_protocol_tokens(tokenizer, tasks: Iterable[str] = ()) -> int:
    """Register every protocol token and the task token of each of ``tasks`` (task names) as special tokens of
    ``tokenizer``; returns how many were new.

    Raises:
        ConfigError: a token does not end up as exactly one id (a tokenizer that splits or merges it).
    """
    before = len(tokenizer)
    tokens = [*PROTOCOL_TOKENS, *(task_token(t) for t in tasks)]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    for tok in tokens:
        ids = tokenizer.encode(tok, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ConfigError(f"the tokenizer encodes {tok!r} as {ids}, not as one token id of its own")
    return len(tokenizer) - before


def load_tokenizer(path: str | Path, tasks: Iterable[str] = ()):
    """Load a tokenizer saved by ``save_pretrained`` from a local directory (never from a hub), with the
    protocol tokens and the task tokens of ``tasks``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_protocol_tokens(tok, tasks)
    return tok


def checkpoint_tokenizer(path: str | Path, tasks: Iterable[str] = ()):
    """:func:`load_tokenizer` of a checkpoint's ``tokenizer/`` directory.

    Raises:
        CheckpointError: the directory's files are not a tokenizer transformers reads (a garbage
            ``tokenizer.json``, a binary ``tokenizer_config.json``), naming the directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "missing: not a tokenizer directory")
    try:
        return load_tokenizer(path, tasks)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a plain Exception for a malformed tokenizer.json
        raise CheckpointError(path, f"cannot read the tokenizer: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
