"""Named model recipes: ``tiny`` (the embedded default, trained from scratch) and its tokenizer.

``tiny``: open_clip ViT (width 192, 4 layers) at 96 px / patch 16 (36 visual tokens per frame) + a Llama
256 x 4 trained from scratch + a byte-level BPE trained offline on the ShapesWorld corpus.
"""

from __future__ import annotations

from pathlib import Path

from taskmllm.model.config import MLLMConfig, ProjectorConfig, TokenConfig, VisionConfig

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny" / "tokenizer"
# Checkpoints shipped as package data, loadable by name: ``Pipeline.from_pretrained("tiny")``.
SHIPPED = {"tiny": ASSETS / "tiny" / "model"}


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A shipped model's name (``"tiny"``) -> its package-data directory; any other value is a path.

    Raises :class:`~taskmllm.errors.CheckpointError` when a shipped name has no weights in this install.
    """
    key = str(name_or_path)
    if key not in SHIPPED:
        return Path(name_or_path)
    path = SHIPPED[key]
    if not (path / "config.json").is_file():
        from taskmllm.errors import CheckpointError

        raise CheckpointError(path / "config.json", f"the shipped model {key!r} is not in this install; "
                              "train it with `make train-default`")
    return path


def tiny_config(tokenizer, max_frames: int = 8) -> MLLMConfig:
    """The ``tiny`` recipe's :class:`MLLMConfig` for ``tokenizer``."""
    llm = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, rope_theta=10000.0)
    vision = VisionConfig(kind="open_clip", image_size=96, patch_size=16, width=192, layers=4, heads=4)
    return MLLMConfig(vision=vision, projector=ProjectorConfig(), llm=llm,
                      tokens=TokenConfig(tasks={"seg": 1, "det": 8, "track": 1}), max_frames=max_frames)


def tiny_corpus(n: int = 20000, seed: int = 0):
    """Texts the tiny tokenizer is trained on: ShapesWorld questions and answers in the token protocol."""
    from taskmllm.data.conversations import corpus

    return corpus(n, seed)


def build_tiny_tokenizer(out: str | Path = TINY_TOKENIZER, vocab_size: int = 1024):
    """Train the tiny recipe's BPE on the ShapesWorld corpus and save it to ``out``."""
    from taskmllm.model.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(tiny_corpus(), vocab_size=vocab_size)
    tok.save_pretrained(str(out))
    return tok


def load_tiny_tokenizer():
    """The shipped tiny tokenizer (package data)."""
    from taskmllm.model.tokenizer import load_tokenizer

    return load_tokenizer(TINY_TOKENIZER)
