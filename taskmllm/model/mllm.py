"""TaskMLLM: vision tower -> projector -> any transformers causal LM, composed (not forked).

The model owns the learnable task queries: after each task token, K query embeddings replace the
``<query>`` placeholders' input embeddings (TPO's task embedding, VisionLLM v2's 4 queries). The hidden state
routed to an expert is the **last-layer hidden state at the query's own position** (the position whose input
is the query embedding) — in teacher forcing and in generation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.config import MLLMConfig
from taskmllm.model.processor import IGNORE, Batch, Processor
from taskmllm.model.projector import Projector
from taskmllm.model.tokens import IMAGE, QUERY, task_token
from taskmllm.model.vision import build_vision_tower


@dataclass
class MLLMOutput:
    """Result of a teacher-forced forward.

    Attributes:
        logits: ``(B, L, V)``; ``(B, K, V)`` at the K positions ``forward(..., logits="supervised")`` kept
            (``(B, 0, V)`` for ``logits="none"``).
        loss: mean next-token cross-entropy over supervised labels (None without labels).
        hidden_states: ``(B, L, H)`` last-layer hidden states (after the LM's final norm).
        vision_features: ``(F, N, C)`` vision tower patch features of every frame (None for text-only).
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    hidden_states: torch.Tensor
    vision_features: Optional[torch.Tensor]


def build_llm(llm_config: dict):
    """A randomly initialised transformers causal LM from a config dict with ``model_type``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(llm_config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ConfigError("llm config needs a 'model_type' (e.g. 'llama')")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


class TaskMLLM(nn.Module):
    """LLaVA-style MLLM with task tokens and learnable task queries.

    Args:
        config: the model's :class:`MLLMConfig`.
        tokenizer: a transformers tokenizer holding every protocol token as one id.
        llm: an existing causal LM (e.g. imported weights); built from ``config.llm`` when None.
    """

    def __init__(self, config: MLLMConfig, tokenizer, llm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision = build_vision_tower(config.vision)
        self.llm = llm if llm is not None else build_llm(config.llm)
        if len(tokenizer) > self.llm.get_input_embeddings().num_embeddings:
            raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the LLM's embedding has "
                              f"{self.llm.get_input_embeddings().num_embeddings} rows")
        hidden = self.llm.get_input_embeddings().embedding_dim
        self.projector = Projector(config.projector, self.vision.width, hidden)
        self.queries = nn.ParameterDict({
            name: nn.Parameter(self._init_queries(k)) for name, k in config.tokens.tasks.items()})
        grid = self.vision.grid
        k = config.projector.pool
        self.grid = (-(-grid[0] // k), -(-grid[1] // k))
        max_len = getattr(self.llm.config, "max_position_embeddings", 2048)
        self.processor = Processor(tokenizer, config, self.grid[0] * self.grid[1], max_len)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.query_id = tokenizer.convert_tokens_to_ids(QUERY)
        self.task_ids = {tokenizer.convert_tokens_to_ids(task_token(t)): t for t in config.tokens.tasks}

    def _init_queries(self, k: int) -> torch.Tensor:
        """Mean of the existing embedding rows (TPO) plus small noise so the K queries differ."""
        emb = self.llm.get_input_embeddings().weight.detach()
        return emb.mean(0, keepdim=True).repeat(k, 1) + 0.02 * torch.randn(k, emb.shape[1]) * emb.std()

    @property
    def hidden_size(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------------------------- embeddings
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, 3, S, S)`` -> vision features ``(F, N, C)`` and projected visual tokens ``(F, N', H)``."""
        dtype = self.projector.linear_1.weight.dtype
        feats = self.vision(pixel_values.to(dtype))
        pooled, _ = self.projector.pool(feats, self.vision.grid)
        return feats, self.projector(pooled)

    def visual_states(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """The ``(F, N', H)`` rows of ``hidden (B, L, H)`` at the ``<image>`` positions of ``input_ids``, frame by
        frame (N' tokens per frame: the projector's pooled grid); None when the batch has no visual tokens."""
        pos = input_ids == self.image_id
        if not bool(pos.any()):
            return None
        grid = self.projector.pooled_grid(self.vision.grid)
        return hidden[pos].reshape(-1, grid[0] * grid[1], hidden.shape[-1])

    def embed(self, input_ids: torch.Tensor, visual_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input embeddings ``(B, L, H)`` with visual tokens and task queries merged in.

        ``visual_tokens`` ``(F, N', H)`` fill the ``<image>`` positions in row-major order (sample by sample).
        """
        emb = self.llm.get_input_embeddings()(input_ids)
        image_pos = input_ids == self.image_id
        n_image = int(image_pos.sum())
        n_visual = 0 if visual_tokens is None else visual_tokens.shape[0] * visual_tokens.shape[1]
        if n_image != n_visual:
            raise InputError(f"the batch has {n_image} <image> token positions but {n_visual} visual tokens")
        if n_visual:
            emb = emb.masked_scatter(image_pos.unsqueeze(-1), visual_tokens.reshape(-1, emb.shape[-1]).to(emb.dtype))
        return self._merge_queries(input_ids, emb)

    def _merge_queries(self, input_ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        rows, cols, values = [], [], []
        for b, l in (input_ids == self.query_id).nonzero().tolist():
            task, k = self.query_owner(input_ids[b], l)
            rows.append(b)
            cols.append(l)
            values.append(self.queries[task][k])
        if not rows:
            return emb
        idx = (torch.tensor(rows, device=emb.device), torch.tensor(cols, device=emb.device))
        return emb.index_put(idx, torch.stack(values).to(emb.dtype))

    def query_owner(self, ids: torch.Tensor, pos: int) -> tuple[str, int]:
        """The task and index k of the ``<query>`` at ``pos`` (the task token precedes the run of queries)."""
        k = 0
        j = pos - 1
        while j >= 0 and int(ids[j]) == self.query_id:
            k, j = k + 1, j - 1
        task = self.task_ids.get(int(ids[j])) if j >= 0 else None
        if task is None or k >= self.queries[task].shape[0]:
            raise InputError(f"<query> at position {pos} does not follow a task token within its K queries")
        return task, k

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, batch: Batch, logits: Literal["all", "supervised", "none"] = "all") -> MLLMOutput:
        """Teacher-forced forward: logits, LM loss (if ``batch.labels``), last-layer hidden states.

        ``logits``: ``"all"`` positions; ``"supervised"``: only positions whose next label some row of the
        batch supervises (the LM loss is the same; training skips the LM head on prompts and visual tokens,
        a fifth of SmolLM2's forward); ``"none"``: no LM head at all (a stage whose LM weight is 0; loss None).
        """
        if logits not in ("all", "supervised", "none"):
            raise InputError(f"logits must be 'all', 'supervised' or 'none', got {logits!r}")
        feats, visual = (None, None) if batch.pixel_values is None else self.encode_images(batch.pixel_values)
        emb = self.embed(batch.input_ids, visual)
        keep, targets = 0, None  # transformers' logits_to_keep: 0 = every position, or an index tensor
        if logits == "none":
            keep = torch.zeros(0, dtype=torch.long, device=emb.device)
        elif logits == "supervised" and batch.labels is not None:
            keep = (batch.labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)  # (K,) t: some row supervises t+1
            targets = batch.labels[:, keep + 1]  # (B, K) the token position t predicts
        out = self.llm(inputs_embeds=emb, attention_mask=batch.attention_mask, logits_to_keep=keep,
                       position_ids=positions(batch.attention_mask), output_hidden_states=True, use_cache=False)
        loss = None
        if targets is not None:
            loss = _cross_entropy(out.logits, targets)
        elif batch.labels is not None and logits == "all":
            loss = lm_loss(out.logits, batch.labels)
        return MLLMOutput(out.logits, loss, out.hidden_states[-1], feats)

    @torch.no_grad()
    def generate(self, batch: Batch, **kwargs):
        """Decode with a KV cache; see :func:`taskmllm.model.generation.generate` for the arguments."""
        from taskmllm.model.generation import generate

        return generate(self, batch, **kwargs)

    # ------------------------------------------------------------------------------------------- i/o
    def save_pretrained(self, path: str | Path) -> None:
        from taskmllm.model.io import save_pretrained

        save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "TaskMLLM":
        from taskmllm.model.io import load_pretrained

        return load_pretrained(path, device=device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: ``cumsum(mask) - 1``, clamped at 0 on left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts ``labels[t+1]``; ``-100`` is ignored."""
    return _cross_entropy(logits[:, :-1], labels[:, 1:])


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``(B, K, V)`` logits against ``(B, K)`` targets; ``-100`` is ignored (0 if all are)."""
    flat_logits, flat = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    if not bool((flat != IGNORE).any()):
        return flat_logits.sum() * 0.0
    return F.cross_entropy(flat_logits, flat, ignore_index=IGNORE)
