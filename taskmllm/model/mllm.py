"""TaskMLLM: vision tower -> projector -> any transformers causal LM, composed (not forked).

The model owns the learnable task queries: after each task token, K query embeddings replace the
``<query>`` placeholders' input embeddings (TPO's task embedding, VisionLLM v2's 4 queries). The hidden state
routed to an expert is the **last-layer hidden state at the query's own position** (the position whose input
is the query embedding) — in teacher forcing and in generation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from taskmllm.errors import CheckpointError, ConfigError, InputError
from taskmllm.model.config import MLLMConfig
from taskmllm.model.expert_inputs import ExpertInputs
from taskmllm.model.decoding import CompiledSteps
from taskmllm.model.generation import GenerationOutput, check_generation, generate
from taskmllm.model.devices import check_device
from taskmllm.model.io import (CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, atomic_directory_write, check_finite_weights,
                               record_checksums, verify_checksums)
from taskmllm.model.linear_backend import onednn_linears
from taskmllm.model.processor import IGNORE, Batch, Processor, positions
from taskmllm.model.projector import Projector
from taskmllm.model.quantization import check_not_quantized
from taskmllm.model.queries import TaskQueries
from taskmllm.model.tokenizer import add_protocol_tokens, checkpoint_tokenizer
from taskmllm.model.tokens import IMAGE, QUERY, task_token
from taskmllm.model.vision import build_vision_tower, hf_checkpointing


@dataclass
class MLLMOutput:
    """Result of a teacher-forced forward.

    Attributes:
        logits: ``(B, L, V)``; ``(B, K, V)`` at the K positions ``forward(..., logits="supervised")`` kept
            (``(B, 0, V)`` for ``logits="none"``).
        loss: mean next-token cross-entropy over supervised labels (None without labels).
        hidden_states: ``(B, L, H)`` last-layer hidden states (after the LM's final norm).
        layer_states: the LM's hidden states by depth: ``layer_states[0]`` the input embeddings,
            ``layer_states[l]`` the output of block l (the last one after the final norm), each ``(B, L, H)``.
        expert_inputs: what the batch offers its experts (vision features, visual-token states, pixels); None
            for a text-only batch.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    hidden_states: torch.Tensor
    layer_states: tuple[torch.Tensor, ...]
    expert_inputs: Optional[ExpertInputs]


def build_llm(llm_config: dict):
    """A randomly initialised transformers causal LM from a config dict with ``model_type``.

    Raises:
        ConfigError: the config is not one transformers builds, or a size is out of bounds
            (:func:`taskmllm.model.config_check.check_llm`).
    """
    from transformers import AutoModelForCausalLM

    from taskmllm.model.config_check import check_llm

    return AutoModelForCausalLM.from_config(check_llm(llm_config))


class TaskMLLM(nn.Module):
    """LLaVA-style MLLM with task tokens and learnable task queries.

    Args:
        config: the model's :class:`MLLMConfig`.
        tokenizer: a transformers tokenizer holding every protocol token as one id.
        llm: an existing causal LM (e.g. imported weights); built from ``config.llm`` when None.
        vision: an existing vision tower for ``config.vision`` (e.g. imported weights); built when None.
    """

    def __init__(self, config: MLLMConfig, tokenizer, llm: Optional[nn.Module] = None,
                 vision: Optional[nn.Module] = None) -> None:
        super().__init__()
        config.validate()  # before any module is built: nothing allocates from a malformed config
        self.config = config
        self.tokenizer = tokenizer
        self.decode_steps = CompiledSteps()  # generate(compile=True)'s compiled steps, kept across calls
        self.checkpointing = False  # activations recomputed in backward (set_gradient_checkpointing)
        self.vision = vision if vision is not None else build_vision_tower(config.vision)
        self.llm = llm if llm is not None else build_llm(config.llm)
        add_protocol_tokens(tokenizer, config.tokens.tasks)
        self._fit_vocabulary(pretrained=llm is not None)
        hidden = self.llm.get_input_embeddings().embedding_dim
        self.projector = Projector(config.projector, self.vision.width, hidden)
        self.queries = TaskQueries({
            name: nn.Parameter(self._init_queries(k)) for name, k in config.tokens.tasks.items()})
        self.grid = self.projector.pooled_grid(self.vision.grid)  # (h', w') of the LLM's visual tokens
        if min(self.vision.grid) < 1 or min(self.grid) < 1:
            raise ConfigError(f"vision.image_size {config.vision.image_size} gives a {self.vision.grid} patch grid, "
                              f"pooled by {config.projector.pool} to {self.grid}: the LLM would see no visual token")
        max_len = getattr(self.llm.config, "max_position_embeddings", 2048)
        self.processor = Processor(tokenizer, config, self.grid[0] * self.grid[1], max_len)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.query_id = tokenizer.convert_tokens_to_ids(QUERY)
        self.task_ids = {tokenizer.convert_tokens_to_ids(task_token(t)): t for t in config.tokens.tasks}

    def _fit_vocabulary(self, pretrained: bool) -> None:
        """Give a ``pretrained`` LLM embedding rows for tokens the tokenizer gained (protocol and task tokens): each
        new row, input and output, is the mean of the existing rows (TPO); ``config.llm`` records the new size.

        Raises:
            ConfigError: the tokenizer holds more tokens than an LLM built from ``config.llm`` has rows.
        """
        rows = self.llm.get_input_embeddings().num_embeddings
        if len(self.tokenizer) <= rows:
            return
        if not pretrained:
            raise ConfigError(f"tokenizer has {len(self.tokenizer)} tokens but the LLM's embedding has {rows} rows")
        self.llm.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self._mean_init_rows(rows, len(self.tokenizer))
        self.config.llm["vocab_size"] = self.llm.config.vocab_size

    def _mean_init_rows(self, start: int, end: int) -> None:
        """Input and output embedding rows ``start:end`` become the mean of the rows before ``start`` (TPO)."""
        with torch.no_grad():
            for emb in {self.llm.get_input_embeddings(), self.llm.get_output_embeddings()} - {None}:
                emb.weight[start:end] = emb.weight[:start].mean(0)

    def add_tasks(self, tasks: Mapping[str, int]) -> list[str]:
        """Give the model the task tokens and learnable queries of ``tasks`` (name -> K) it does not have yet.

        A token the tokenizer lacks gets a new id; its embedding rows (input and output) start at the mean of the
        rows of the tokens the tokenizer had before (TPO), also when the LLM already had spare rows for it. Its K
        queries start at that mean plus small noise. ``config.tokens.tasks`` records the tasks, so the model saves
        and reloads with them. Returns the names added.

        Raises:
            ConfigError: a task the model has with another query count.
        """
        clash = {t: k for t, k in tasks.items() if t in self.config.tokens.tasks and self.config.tokens.tasks[t] != k}
        if clash:
            raise ConfigError(f"the model has tasks {clash} with other query counts: "
                              f"{ {t: self.config.tokens.tasks[t] for t in clash} }")
        new = {t: int(k) for t, k in tasks.items() if t not in self.config.tokens.tasks}
        if not new:
            return []
        known = len(self.tokenizer)
        add_protocol_tokens(self.tokenizer, new)
        if len(self.tokenizer) > self.llm.get_input_embeddings().num_embeddings:
            self.llm.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            self.config.llm["vocab_size"] = self.llm.config.vocab_size
        self._mean_init_rows(known, len(self.tokenizer))
        ref = self.llm.get_input_embeddings().weight
        for name, k in new.items():
            self.queries[name] = nn.Parameter(self._init_queries(k).to(ref.device, ref.dtype))
        self.config.tokens.tasks = {**self.config.tokens.tasks, **new}
        self.task_ids = {self.tokenizer.convert_tokens_to_ids(task_token(t)): t for t in self.config.tokens.tasks}
        self.processor = Processor(self.tokenizer, self.config, self.processor.tokens_per_frame,
                                   self.processor.max_length)
        return list(new)

    def _init_queries(self, k: int) -> torch.Tensor:
        """Mean of the existing embedding rows (TPO) plus small noise so the K queries differ."""
        emb = self.llm.get_input_embeddings().weight.detach()
        noise = torch.randn(k, emb.shape[1], device=emb.device)  # on the meta device when built empty (loading)
        return emb.mean(0, keepdim=True).repeat(k, 1) + 0.02 * noise * emb.std()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the LLM's and the vision tower's activations in backward instead of storing them (less
        memory, the same gradients; transformers' and open_clip's own checkpointing, non-reentrant)."""
        hf_checkpointing(self.llm, enabled)
        self.vision.set_gradient_checkpointing(enabled)
        self.checkpointing = enabled

    def _linear_rows(self, rows: int) -> int:
        """The rows for :func:`onednn_linears` of a forward: none when autograd records a checkpointed forward
        (its recomputation in backward runs outside the block, with the BLAS, and must save the same tensors)."""
        return 0 if self.checkpointing and torch.is_grad_enabled() else rows

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
        rows = self._linear_rows(pixel_values.shape[0] * self.vision.grid[0] * self.vision.grid[1])
        with onednn_linears(rows if self.vision.has_linears else 0, pixel_values.device):
            feats = self.vision(pixel_values.to(dtype))
        with onednn_linears(rows, pixel_values.device):
            pooled, _ = self.projector.pool(feats, self.vision.grid)
            return feats, self.projector(pooled)

    def visual_states(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """The ``(F, N', H)`` rows of ``hidden (B, L, H)`` at the ``<image>`` positions of ``input_ids``, frame by
        frame (N' tokens per frame: the projector's pooled grid); None when the batch has no visual tokens.
        ``input_ids`` may be the batch's host copy (nothing then waits for the device)."""
        pos = input_ids == self.image_id
        if not bool(pos.any()):
            return None
        return hidden[pos].reshape(-1, self.grid[0] * self.grid[1], hidden.shape[-1])

    def expert_inputs(self, batch: Batch, features: Optional[torch.Tensor],
                      hidden: torch.Tensor) -> Optional[ExpertInputs]:
        """What ``batch`` offers its experts, given its vision ``features (F, N, C)`` and the LLM's last-layer
        ``hidden (B, L, H)`` states; None for a text-only batch."""
        if features is None:
            return None
        return ExpertInputs(features, self.vision.grid, self.config.vision.image_size, list(batch.frames_per_sample),
                            list(batch.image_sizes), self.visual_states(batch.on_host().input_ids, hidden), self.grid,
                            batch.pixel_values)

    def embed(self, input_ids: torch.Tensor, visual_tokens: Optional[torch.Tensor] = None,
              host_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input embeddings ``(B, L, H)`` with visual tokens and task queries merged in.

        ``visual_tokens`` ``(F, N', H)`` fill the ``<image>`` positions in row-major order (sample by sample).
        ``host_ids``: ``input_ids`` on the CPU, if the caller has them: where the visual tokens and the queries are
        is then read there, and nothing waits for the device (copied from ``input_ids`` otherwise).
        """
        host_ids = input_ids.cpu() if host_ids is None else host_ids
        emb = self.llm.get_input_embeddings()(input_ids)
        image_pos = input_ids == self.image_id
        n_image = int((host_ids == self.image_id).sum())
        n_visual = 0 if visual_tokens is None else visual_tokens.shape[0] * visual_tokens.shape[1]
        if n_image != n_visual:
            raise InputError(f"the batch has {n_image} <image> token positions but {n_visual} visual tokens")
        if n_visual:
            emb = emb.masked_scatter(image_pos.unsqueeze(-1), visual_tokens.reshape(-1, emb.shape[-1]).to(emb.dtype))
        return self._merge_queries(host_ids, emb)

    def _merge_queries(self, host_ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` with each ``<query>`` position's embedding replaced by its task's query ``k`` (positions read
        from the CPU ids ``host_ids``)."""
        if not len(self.queries):
            return emb
        starts = self.queries.rows()
        rows, cols, which = [], [], []
        for b, l in (host_ids == self.query_id).nonzero().tolist():
            task, k = self.query_owner(host_ids[b], l)
            rows.append(b)
            cols.append(l)
            which.append(starts[task] + k)
        table = self.queries()  # every query, whether the batch has them or not: the same graph on every batch
        idx = [torch.tensor(v, dtype=torch.long).to(emb.device, non_blocking=True) for v in (rows, cols, which)]
        return emb.index_put(tuple(idx[:2]), table[idx[2]].to(emb.dtype))

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
        host = batch.on_host()  # token ids on the CPU: positions are read there, the device never waits
        feats, visual = (None, None) if batch.pixel_values is None else self.encode_images(batch.pixel_values)
        emb = self.embed(batch.input_ids, visual, host.input_ids)
        keep, targets = 0, None  # transformers' logits_to_keep: 0 = every position, or an index tensor
        if logits == "none":
            keep = torch.zeros(0, dtype=torch.long, device=emb.device)
        elif logits == "supervised" and batch.labels is not None:
            kept = (host.labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)  # (K,) t: some row supervises t+1
            keep = kept.to(emb.device, non_blocking=True)
            targets = batch.labels[:, keep + 1]  # (B, K) the token position t predicts
        with onednn_linears(self._linear_rows(emb.shape[0] * emb.shape[1]), emb.device):
            out = self.llm(inputs_embeds=emb, attention_mask=batch.attention_mask, logits_to_keep=keep,
                           position_ids=positions(batch.attention_mask), output_hidden_states=True, use_cache=False)
        loss = None
        supervised = host.labels is not None and bool((host.labels[:, 1:] != IGNORE).any())
        if targets is not None:
            loss = _cross_entropy(out.logits, targets, supervised)
        elif batch.labels is not None and logits == "all":
            loss = _cross_entropy(out.logits[:, :-1], batch.labels[:, 1:], supervised)
        hidden = out.hidden_states[-1]
        return MLLMOutput(out.logits, loss, hidden, out.hidden_states, self.expert_inputs(batch, feats, hidden))

    @torch.no_grad()
    def generate(self, batch: Batch, **kwargs) -> GenerationOutput:
        """Decode with a KV cache; see :func:`taskmllm.model.generation.generate` for the arguments (sampling,
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``compile``, ``intervention``).

        Raises:
            ConfigError: an unknown keyword argument, or a value of the wrong type or range.
        """
        intervention = kwargs.pop("intervention", None)
        return generate(self, batch, intervention=intervention, **check_generation(kwargs, self.device))

    # ------------------------------------------------------------------------------------------- i/o
    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + ``tokenizer/`` + ``checksums.json`` to directory ``path``
        atomically."""
        def write(tmp: Path) -> None:
            self.write_files(tmp)
            record_checksums(tmp)

        return atomic_directory_write(path, write)

    def write_files(self, directory: Path) -> None:
        """Write the checkpoint's files into the existing ``directory`` (no checksums: the caller's save records
        them over everything it writes)."""
        from safetensors.torch import save_model

        check_not_quantized(self)  # quantized layers are inference only: a checkpoint holds float weights
        self.config.save(directory / CONFIG_FILE)
        save_model(self, str(directory / WEIGHTS_FILE))
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        bases: Optional[Mapping[str, Callable[..., "TaskMLLM"]]] = None,
                        verify: bool = True, dtype: Optional[torch.dtype] = None) -> "TaskMLLM":
        """Load a directory written by :meth:`save_pretrained`, or an adapter directory (``adapter.json``, see
        :mod:`taskmllm.model.adapter`) whose base ``bases[name](**base_args)`` rebuilds.

        ``verify``: check the weight file against the ``checksums.json`` recorded at save and every tensor it holds
        for NaN/inf (:func:`~taskmllm.model.io.verify_checksums`, :func:`~taskmllm.model.io.check_finite_weights`;
        an adapter's own tensors, not its base's, which come from installed packages).
        The config is validated before any module is built.

        ``dtype`` (e.g. ``torch.bfloat16``; None: as stored): the modules are built on the meta device (no random
        initialisation) and each weight is read onto ``device`` and cast to ``dtype`` there
        (:mod:`taskmllm.model.loading`): no float32 copy of the model is ever made. An adapter's base is rebuilt from
        its packages in float32 (its differences are applied at full precision), then cast.

        Raises:
            CheckpointError: a missing file, a config of another format version or with bad fields, an unreadable
                tokenizer, or corrupt weights; the message names the file.
            ConfigError: ``device`` is not a device of this machine.
        """
        from taskmllm.model.adapter import ADAPTER_FILE, ADAPTER_META, load_adapter

        device = check_device(device)
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(path, "checkpoint directory not found")
        if (path / ADAPTER_META).is_file():
            if not bases:
                raise CheckpointError(path / ADAPTER_META, "an adapter checkpoint: its base model is rebuilt by "
                                      "JointModel.from_pretrained / Pipeline.from_pretrained (or pass bases=)")
            if verify:
                verify_checksums(path, [ADAPTER_FILE])
            model = load_adapter(path, bases, verify=verify)  # scans the adapter's tensors, not the package base
            return model.to(device=device, dtype=dtype).eval()
        model = cls._load_full(path, verify, device, dtype)
        if verify:
            check_finite_weights(model, path / WEIGHTS_FILE)
        return model.eval()

    @classmethod
    def _load_full(cls, path: Path, verify: bool, device: torch.device,
                   dtype: Optional[torch.dtype]) -> "TaskMLLM":
        """A full checkpoint directory (config, weights, tokenizer), built without random initialisation and its
        weights read onto ``device`` in ``dtype`` (None: as stored)."""
        from safetensors import SafetensorError

        from taskmllm.model.loading import empty_module, load_weights

        for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR):
            if not (path / name).exists():
                raise CheckpointError(path / name, "missing from the checkpoint directory")
        if verify:
            verify_checksums(path, [WEIGHTS_FILE])
        try:
            config = MLLMConfig.load(path / CONFIG_FILE)
        except ConfigError as exc:
            raise CheckpointError(path / CONFIG_FILE, str(exc)) from exc
        try:
            tokenizer = checkpoint_tokenizer(path / TOKENIZER_DIR)
            model = empty_module(lambda: cls(config, tokenizer))
        except ConfigError as exc:  # the tokenizer does not fit the config
            raise CheckpointError(path, str(exc)) from exc
        try:
            missing, unexpected = load_weights(model, path / WEIGHTS_FILE, dtype, device)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(path / WEIGHTS_FILE, f"cannot read weights: {exc}") from exc
        if missing or unexpected:
            raise CheckpointError(path / WEIGHTS_FILE, f"weights do not match the config: missing "
                                  f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return model


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts ``labels[t+1]``; ``-100`` is ignored."""
    return _cross_entropy(logits[:, :-1], labels[:, 1:])


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, supervised: Optional[bool] = None) -> torch.Tensor:
    """Mean cross-entropy of ``(B, K, V)`` logits against ``(B, K)`` targets; ``-100`` is ignored (0 if all are).
    ``supervised``: whether any target is not ignored, when the caller knows it from the host (else read here)."""
    flat_logits, flat = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    if supervised is None:
        supervised = bool((flat != IGNORE).any())
    if not supervised:
        return flat_logits.sum() * 0.0
    return F.cross_entropy(flat_logits, flat, ignore_index=IGNORE)
