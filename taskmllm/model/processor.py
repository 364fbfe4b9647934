"""Processor: images / videos + text -> a padded :class:`Batch`; token ids -> text.

Images are accepted as a path, a PIL image or a numpy array (RGB, RGBA, grayscale, 16-bit, float 0-1; see
:mod:`taskmllm.model.images`, which also caps their size at ``max_image_pixels``), are converted to RGB and
resized to the model's square input. Text must be a ``str`` of valid Unicode (:func:`check_text`). A video is a
sequence of frames (or a ``(T,H,W,3)`` array), uniformly sampled down to ``max_frames``. ``<image>`` expands to one frame's visual tokens and
``<video>`` to every frame's, in order; answers get K ``<query>`` ids after each task token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from taskmllm.errors import InputError, PromptTooLongError, VideoError
from taskmllm.model.config import MLLMConfig
from taskmllm.model.images import MAX_IMAGE_PIXELS, ImageInput, load_image
from taskmllm.model.tokens import IMAGE, QUERY, VIDEO, ChatTemplate, place_visual, task_token

VisualInput = Union[ImageInput, Sequence[ImageInput], None]
IGNORE = -100


@dataclass
class Batch:
    """A padded batch.

    Attributes:
        input_ids: ``(B, L)`` token ids; visual tokens are ``<image>`` placeholder ids.
        attention_mask: ``(B, L)`` 1 for real tokens, 0 for padding.
        labels: ``(B, L)`` targets for the LM loss (``-100`` where not supervised) or None.
        pixel_values: ``(F, 3, S, S)`` all frames of all samples in sample order, or None.
        frames_per_sample: frames each sample contributes (0 for text-only samples).
        image_sizes: per sample, the original ``(height, width)`` of its first frame (None if no image).
        host: the CPU batch this one was moved from (set by :meth:`to`), so that what depends only on the token
            ids — where the visual tokens, the queries and the supervised labels are — is read on the host
            without waiting for the device (:meth:`on_host`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: Optional[torch.Tensor] = None
    pixel_values: Optional[torch.Tensor] = None
    frames_per_sample: list[int] = field(default_factory=list)
    image_sizes: list[Optional[tuple[int, int]]] = field(default_factory=list)
    host: Optional["Batch"] = field(default=None, repr=False, compare=False)

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None,
           non_blocking: bool = False) -> "Batch":
        """The batch on ``device`` (pixels in ``dtype`` if given); ``non_blocking`` copies asynchronously from
        pinned memory. The result keeps this batch as its ``host`` copy when this one is on the CPU."""
        def move(t: Optional[torch.Tensor], dt: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device=device, dtype=dt or t.dtype, non_blocking=non_blocking)

        host = self.on_host() if self.input_ids.device.type == "cpu" or self.host is not None else None
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.pixel_values, dtype),
                     list(self.frames_per_sample), list(self.image_sizes), host)

    def on_host(self) -> "Batch":
        """Token ids, mask and labels on the CPU: the host copy this batch was moved from (no device sync), or
        this batch when it is on the CPU; a device batch without one is copied (a sync)."""
        if self.host is not None:
            return self.host
        if self.input_ids.device.type == "cpu":
            return self
        return Batch(self.input_ids.cpu(), self.attention_mask.cpu(), None if self.labels is None else self.labels.cpu(),
                     None, list(self.frames_per_sample), list(self.image_sizes))


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: ``cumsum(mask) - 1``, clamped at 0 on left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_text(value: object, what: str = "prompt") -> str:
    """``value`` as text a tokenizer can encode, or :class:`InputError` naming the problem: not a string (None, a
    number, bytes, a dict), or not valid Unicode (a lone surrogate such as ``'\\ud800'``, which has no UTF-8 form)."""
    if not isinstance(value, str):
        raise InputError(f"the {what} must be a string, got {type(value).__name__} {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise InputError(f"the {what} is not valid Unicode text: character {exc.start} is U+{ord(bad):04X}, a lone "
                         "surrogate (decode bytes with errors='replace' first)") from exc
    return value


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _sequence(value: object, what: str) -> list:
    """``value`` (a list, tuple or array of items) as a list, or :class:`InputError`."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
        return list(value)
    raise InputError(f"{what} must be a list, got {type(value).__name__} {_short(value)}")


def sample_frames(frames: Sequence[ImageInput], max_frames: int) -> list[ImageInput]:
    """Uniformly sample at most ``max_frames`` frames (first and last kept). Raises on zero frames."""
    n = len(frames)
    if n == 0:
        raise VideoError("video has zero frames")
    if n <= max_frames:
        return list(frames)
    idx = np.linspace(0, n - 1, max_frames).round().astype(int)
    return [frames[i] for i in idx]


class Processor:
    """Turns prompts, answers and images into :class:`Batch` objects for a :class:`TaskMLLM`.

    ``max_image_pixels``: the largest image (width x height) accepted, checked before decoding a file
    (:data:`~taskmllm.model.images.MAX_IMAGE_PIXELS` by default; set the attribute to change it).
    """

    def __init__(self, tokenizer, config: MLLMConfig, tokens_per_frame: int, max_length: int,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.tokens_per_frame = tokens_per_frame
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.chat = ChatTemplate(**config.tokens.chat)
        ids = tokenizer.convert_tokens_to_ids
        self.image_id, self.video_id, self.query_id = ids(IMAGE), ids(VIDEO), ids(QUERY)
        self.task_ids = {ids(task_token(t)): k for t, k in config.tokens.tasks.items()}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        mean = torch.tensor(config.vision.mean).view(3, 1, 1)
        std = torch.tensor(config.vision.std).view(3, 1, 1)
        self._norm = (mean, std)

    # ------------------------------------------------------------------------------------------ images
    def pixels(self, image: ImageInput) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> ``(3, S, S)`` normalized pixels and its original ``(height, width)``."""
        pil = load_image(image, self.max_image_pixels)
        size = self.config.vision.image_size
        arr = np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1)
        mean, std = self._norm
        return (x - mean) / std, (pil.height, pil.width)

    def frames(self, visual: VisualInput) -> list[ImageInput]:
        """A sample's visual input as a list of frames (empty for text-only)."""
        if visual is None:
            return []
        if isinstance(visual, np.ndarray) and visual.ndim == 4:
            visual = list(visual)
        if isinstance(visual, (list, tuple)):
            return sample_frames(visual, self.config.max_frames)
        return [visual]

    # -------------------------------------------------------------------------------------------- text
    def format_prompt(self, text: str, num_frames: int, is_video: bool) -> str:
        """Chat-formatted prompt; adds ``<image>`` / ``<video>`` when the text has no placeholder, where the model's
        ``tokens.image_first`` / ``tokens.repeat_question`` say (the layout it was trained with)."""
        has_marker = IMAGE in text or VIDEO in text
        if num_frames and not has_marker:
            layout = self.config.tokens
            text = place_visual(text, is_video, layout.image_first, layout.repeat_question)
        elif not num_frames and has_marker:
            raise InputError("the prompt has an <image>/<video> placeholder but no image was given")
        return self.chat.prompt(text)

    def encode(self, prompt: str, num_frames: int, is_video: bool, answer: Optional[str] = None,
               add_eos: bool = True) -> tuple[list[int], list[int]]:
        """Token ids and labels of one sample, visual placeholders expanded, queries after task tokens."""
        if answer is not None:
            return self.encode_turns([(prompt, answer)], num_frames, is_video, add_eos)
        tok = self.tokenizer
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = self._expand_visual(head + tok.encode(self.format_prompt(check_text(prompt), num_frames, is_video),
                                                    add_special_tokens=False), num_frames)
        self._check_length(ids, num_frames)
        return ids, [IGNORE] * len(ids)

    def encode_chat(self, history: Sequence[tuple[str, str]], question: str, num_frames: int,
                    is_video: bool) -> tuple[list[int], list[int]]:
        """Ids (and unsupervised labels) of a conversation to continue: the earlier ``(question, answer)`` turns
        encoded as in training (:meth:`encode_turns`: the visual placeholder with the first question, every answer
        followed by EOS, queries after its task tokens), then ``question`` up to where the assistant answers.
        Without history this is :meth:`encode`.

        Raises:
            InputError: a turn that is not text, or a placeholder in ``question`` after the first turn (the picture
                belongs to the first question).
            PromptTooLongError: the conversation does not fit the LLM's context.
        """
        if not history:
            return self.encode(question, num_frames, is_video)
        question = check_text(question)
        if IMAGE in question or VIDEO in question:
            raise InputError("only the conversation's first question may hold the <image>/<video> placeholder")
        # an answer as decoded starts with the separator the template puts before it
        history = [(q, a.lstrip() if isinstance(a, str) else a) for q, a in history]
        ids, _ = self.encode_turns(history, num_frames, is_video)
        text = self.chat.user_prefix + question + self.chat.assistant_prefix
        ids = ids + self.tokenizer.encode(text, add_special_tokens=False)
        self._check_length(ids, num_frames)
        return ids, [IGNORE] * len(ids)

    def encode_turns(self, turns: Sequence[tuple[str, str]], num_frames: int, is_video: bool,
                     add_eos: bool = True) -> tuple[list[int], list[int]]:
        """Ids and labels of a conversation ``[(question, answer), ...]``: every answer is supervised (LLaVA's
        multi-turn training), each followed by EOS; the visual placeholder (added after the first question when
        no question has one) is expanded; queries follow task tokens and are not supervised."""
        if not turns:
            raise InputError("a conversation needs at least one (question, answer) turn")
        tok = self.tokenizer
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        labels = [IGNORE] * len(ids)
        turns = [(check_text(q, "question"), check_text(a, "answer")) for q, a in turns]
        has_marker = any(IMAGE in q or VIDEO in q for q, _ in turns)
        for k, (question, answer) in enumerate(turns):
            if k == 0:  # the system text, and the placeholder added when no question has one
                text = self.chat.prompt(question) if has_marker else self.format_prompt(question, num_frames, is_video)
            else:
                text = self.chat.user_prefix + question + self.chat.assistant_prefix
            q_ids = tok.encode(text, add_special_tokens=False)
            a_ids = self.insert_queries(tok.encode(self.chat.answer_sep + answer, add_special_tokens=False))
            a_ids += [tok.eos_token_id] if add_eos else []
            ids += q_ids + a_ids
            labels += [IGNORE] * len(q_ids) + [IGNORE if i == self.query_id else i for i in a_ids]
        if num_frames == 0 and has_marker:
            raise InputError("the prompt has an <image>/<video> placeholder but no image was given")
        expanded = self._expand_visual(ids, num_frames)
        labels = self._expand_visual(labels, num_frames, like=ids)
        self._check_length(expanded, num_frames)
        return expanded, labels

    def _check_length(self, ids: list[int], num_frames: int) -> None:
        if len(ids) > self.max_length:
            raise PromptTooLongError(
                f"the sample needs {len(ids)} tokens (with {num_frames} frame(s) of {self.tokens_per_frame} visual "
                f"tokens) but the language model's context holds {self.max_length}")

    def _expand_visual(self, ids: list[int], num_frames: int, like: Optional[list[int]] = None) -> list[int]:
        """``<image>`` -> one frame's visual tokens, ``<video>`` -> every frame's. With ``like`` (the ids),
        ``ids`` are values aligned with it (labels) and are repeated where ``like`` expands."""
        out: list[int] = []
        markers = 0
        for i, value in zip(like if like is not None else ids, ids):
            fill = self.image_id if like is None else value
            if i == self.image_id:
                out += [fill] * self.tokens_per_frame
                markers += 1
            elif i == self.video_id:
                out += [fill] * (self.tokens_per_frame * num_frames)
                markers += num_frames
            else:
                out.append(value)
        if markers != num_frames:
            raise InputError(f"the prompt's <image>/<video> placeholders cover {markers} frame(s) "
                             f"but {num_frames} were given")
        return out

    def insert_queries(self, ids: Sequence[int]) -> list[int]:
        """Drop any ``<query>`` ids and put exactly K after each task token."""
        out: list[int] = []
        for i in ids:
            if i == self.query_id:
                continue
            out.append(i)
            if i in self.task_ids:
                out += [self.query_id] * self.task_ids[i]
        return out

    def __call__(self, prompts: Union[str, Sequence[str]], images: Union[VisualInput, Sequence[VisualInput]] = None,
                 answers: Optional[Sequence[Optional[str]]] = None, padding_side: str = "left",
                 histories: Optional[Sequence[Sequence[tuple[str, str]]]] = None) -> Batch:
        """Build a batch. ``images[i]`` is an image, a list of frames (a video) or None for sample ``i``.
        ``histories[i]``: the earlier ``(question, answer)`` turns of sample ``i``'s conversation about its image
        (:meth:`encode_chat`; generation only, not with ``answers``).

        Raises:
            InputError: no prompts, a prompt that is not valid text, or as many images as prompts missing.
        """
        if isinstance(prompts, str):
            prompts, images = [prompts], [images]
            answers = None if answers is None else [answers] if isinstance(answers, str) else answers
        prompts = [check_text(p) for p in _sequence(prompts, "prompts")]
        if not prompts:
            raise InputError("no prompts: give a prompt string or a non-empty list of them")
        images = [None] * len(prompts) if images is None else _sequence(images, "images")
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} images")
        if answers is not None and len(_sequence(answers, "answers")) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(answers)} answers")
        if histories is not None and (answers is not None or len(_sequence(histories, "histories")) != len(prompts)):
            raise InputError(f"{len(prompts)} prompts need as many histories (and no answers)")
        rows, pix, counts, sizes = [], [], [], []
        for i, prompt in enumerate(prompts):
            is_video, frames, tensors = self._visual(images[i])
            pix += [t for t, _ in tensors]
            counts.append(len(frames))
            sizes.append(tensors[0][1] if tensors else None)
            if histories is not None:
                rows.append(self.encode_chat(histories[i], prompt, len(frames), is_video))
            else:
                rows.append(self.encode(prompt, len(frames), is_video, None if answers is None else answers[i]))
        return self._pad(rows, pix, counts, sizes, padding_side, with_labels=answers is not None)

    def conversations(self, turns: Sequence[Sequence[tuple[str, str]]], images: Sequence[VisualInput],
                      padding_side: str = "right") -> Batch:
        """A training batch of multi-turn conversations (:meth:`encode_turns`): ``turns[i]`` is sample ``i``'s
        ``[(question, answer), ...]`` about ``images[i]`` (an image, a list of frames, or None)."""
        if len(images) != len(turns):
            raise InputError(f"{len(turns)} conversations but {len(images)} images")
        rows, pix, counts, sizes = [], [], [], []
        for conv, visual in zip(turns, images):
            is_video, frames, tensors = self._visual(visual)
            pix += [t for t, _ in tensors]
            counts.append(len(frames))
            sizes.append(tensors[0][1] if tensors else None)
            rows.append(self.encode_turns(conv, len(frames), is_video))
        return self._pad(rows, pix, counts, sizes, padding_side, with_labels=True)

    def _visual(self, visual: VisualInput) -> tuple[bool, list, list]:
        """``(is_video, frames, [(pixels, (H, W)), ...])`` of one sample's visual input."""
        is_video = isinstance(visual, (list, tuple)) or (isinstance(visual, np.ndarray) and visual.ndim == 4)
        frames = self.frames(visual)
        return is_video, frames, [self.pixels(f) for f in frames]

    def _pad(self, rows, pix, counts, sizes, side: str, with_labels: bool) -> Batch:
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            sl = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
            input_ids[b, sl] = torch.tensor(ids)
            labels[b, sl] = torch.tensor(lab)
            mask[b, sl] = 1
        pixel_values = torch.stack(pix) if pix else None
        return Batch(input_ids, mask, labels if with_labels else None, pixel_values, counts, sizes)

    def decode(self, ids: Sequence[int], keep_queries: bool = False) -> str:
        """Text of generated ids: BOS/EOS/PAD dropped, protocol tokens kept (``<query>`` only if asked)."""
        drop = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.pad_id}
        if not keep_queries:
            drop.add(self.query_id)
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)
