"""Pipeline: image or video + instruction -> :class:`Result` (text, masks, boxes, tracks).

    pipe = Pipeline.from_pretrained("path/to/checkpoint")
    result = pipe(image, "Segment the red circle.")
    result.text, result.calls[0].mask, result.draw()
    pipe(image, "Is there a star in the image?", intervention="vhr")  # VHR with the model's calibrated settings
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from taskmllm.errors import ConfigError, InputError
from taskmllm.model.expert_inputs import ExpertInputs
from taskmllm.model.generation import Intervention, check_generation, check_intervention
from taskmllm.model.images import load_image
from taskmllm.model.interventions.calibrated import make_intervention
from taskmllm.model.processor import VisualInput, check_text
from taskmllm.model.tokens import decode_boxes, strip_protocol
from taskmllm.router.dispatch import run_calls
from taskmllm.router.joint import JointModel
from taskmllm.router.result import CallResult, Result
from taskmllm.router.router import TaskCall


class Pipeline:
    """Inference over a :class:`JointModel`: generate, route the task calls, run the experts, postprocess."""

    def __init__(self, model: JointModel, calibration: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        """``calibration``: the model's calibrated intervention settings ``{name: settings}``
        (``interventions.json``, :func:`~taskmllm.zoo.model_calibration`), used by named interventions."""
        self.model = model.eval()
        self.calibration: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (calibration or {}).items()}
        self._named: dict[str, Intervention] = {}  # named interventions built once (VAR calibrates its sink dims once)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                        verify: bool = True, dtype: Optional[torch.dtype] = None,
                        weight_layout: str = "stored", quantize: Optional[str] = None) -> "Pipeline":
        """Load a checkpoint directory written by ``JointModel.save_pretrained``, or a shipped model by name
        (``"tiny"``, the embedded default), with the calibrated intervention settings it carries. ``verify``:
        check the weight files' SHA-256 against the checksums recorded at save, and the weights for NaN/inf (a
        :class:`CheckpointError` naming the file). ``dtype`` (e.g. ``torch.bfloat16``; None: as stored) loads the
        weights straight into that dtype, with no float32 copy (``JointModel.from_pretrained``). ``weight_layout``:
        ``"stored"`` (row-major, as saved) or ``"tuned"``: each LLM weight shape in the memory order that the CPU's
        BLAS streams fastest at batch 1, timed at load (~1 s; :mod:`taskmllm.model.weight_layout`; CPU only).
        ``quantize``: None, ``"int8"`` (one scale per output row) or ``"int4"`` (a scale and minimum per row and
        group of 32 columns, llama.cpp's Q4_1 scheme; CPU only): the LLM's linear layers (LM head included) get
        integer weights, quantized from the stored weights before the cast to ``dtype``; on the CPU pair it with
        ``dtype=torch.bfloat16`` (:mod:`taskmllm.model.quantization`). Inference only: answers can differ from
        the float model's (``bench/decode.py`` reports how many do)."""
        from taskmllm.model.attention import use_float32_decode_attention
        from taskmllm.model.quantization import check_quantization, quantize_linears
        from taskmllm.model.weight_layout import tune_linear_layout
        from taskmllm.zoo import model_calibration

        if weight_layout not in ("stored", "tuned"):
            raise ConfigError(f"weight_layout must be 'stored' or 'tuned', got {weight_layout!r}")
        if quantize is not None:
            check_quantization(quantize)  # before the weights load
        calibration = model_calibration(path)  # a malformed interventions.json fails before the weights load
        model = JointModel.from_pretrained(path, device=device, verify=verify, dtype=None if quantize else dtype)
        if quantize is not None:
            quantize_linears(model.mllm.llm, quantize)  # from the stored precision, then the cast
            if dtype is not None:
                model.to(dtype=dtype)
        if weight_layout == "tuned":
            tune_linear_layout(model.mllm.llm)
        use_float32_decode_attention(model.mllm.llm)  # bf16/fp16 on the CPU: decode-step SDPA in float32
        return cls(model, calibration)

    def intervention(self, name: Optional[str], **overrides: Any) -> Optional[Intervention]:
        """A named intervention for this model: ``"vhr"``, ``"var"``, ``"zerotuning"`` with the model's calibrated
        settings (else each method's defaults), single settings replaced by ``overrides`` (None values ignored);
        ``"none"``/None -> None. VAR's per-model ``tau=None`` is resolved (and an explicit one checked against the
        hidden size), so the object names the tau it uses. Built once per name and overrides.

        Raises:
            ConfigError: an unknown name or a bad setting.
        """
        import json

        from taskmllm.model.interventions import VAR

        key = json.dumps([name, sorted((k, v) for k, v in overrides.items() if v is not None)], default=str)
        if key not in self._named:
            hook = make_intervention(name, self.calibration, **overrides)
            if isinstance(hook, VAR):  # an explicit tau is checked here, not at the first generation
                hook = VAR.from_settings({**hook.settings(), "tau": hook.tau_for(self.model.mllm)})
            if hook is None:
                return None
            self._named[key] = hook
        return self._named[key]

    def intervention_source(self, name: Optional[str]) -> Optional[str]:
        """Where the settings of the named intervention come from: ``"calibrated"`` (the model carries them),
        ``"defaults"``, or None for no intervention (``"none"``/None)."""
        if name is None or (isinstance(name, str) and name.lower() == "none"):
            return None
        return "calibrated" if isinstance(name, str) and name.lower() in self.calibration else "defaults"

    @property
    def processor(self):
        return self.model.mllm.processor

    @torch.no_grad()
    def __call__(self, visual: Union[VisualInput, Sequence[VisualInput]], prompt: Union[str, Sequence[str]], /,
                 max_new_tokens: int = 64, intervention: Union[Intervention, str, None] = None,
                 score_threshold: Optional[float] = None, **generation) -> Union[Result, list[Result]]:
        """Answer ``prompt`` about ``visual`` (an image, a list of frames, or None).

        ``score_threshold``: the lowest detection score kept (None: the detection expert's option, 0.5);
        evaluation passes 0 so that COCO AP ranks every slot, as DETR's evaluation does.

        Lists of prompts (with a list of visuals, one per prompt, or None) run as one batch and return a list of
        results. ``generation`` is passed to ``TaskMLLM.generate`` (``do_sample``, ``temperature``, ``top_p``,
        ``generator``, ``use_cache``).

        ``visual`` and ``prompt`` are positional (a ``prompt=`` keyword is an unknown generation option).
        Every argument is checked before any compute: a prompt that is not a string of valid Unicode, a batch
        whose prompts and visuals do not pair up, or an unreadable image is an :class:`InputError` (or
        :class:`ImageError` / :class:`VideoError`); an unknown or out-of-range generation option, a
        ``score_threshold`` outside [0, 1] or an ``intervention`` that is not one is a :class:`ConfigError`.
        ``intervention``: an object (``VHR(...)``, ``VAR(...)``, ``ZeroTuning(...)``) or a name resolved by
        :meth:`intervention` (the model's calibrated settings).
        """
        single = isinstance(prompt, str)
        prompts, visuals = _requests(visual, prompt)
        results = self._answer(prompts, visuals, None, max_new_tokens, intervention, score_threshold, generation)
        return results[0] if single else results

    @torch.no_grad()
    def chat(self, visual: VisualInput, messages: Sequence[Any], /, max_new_tokens: int = 64,
             intervention: Union[Intervention, str, None] = None, score_threshold: Optional[float] = None,
             **generation) -> Result:
        """The next answer of a conversation about ``visual`` (an image, a list of frames, or None).

        ``messages``: the conversation so far, alternating user and assistant turns and ending with the user's
        new question, each a ``{"role": "user" | "assistant", "content": text}`` dict (the chat-message format of
        transformers and Gradio) or a ``(role, text)`` pair::

            first = pipe(image, "Is there a red circle?")
            pipe.chat(image, [("user", "Is there a red circle?"), ("assistant", first.raw_text),
                              ("user", "Segment it.")])

        An assistant turn is the model's transcript (``Result.raw_text``, task tokens included: what the model
        said), the picture goes with the first question. The earlier turns are encoded as in multi-turn training
        (:meth:`Processor.encode_chat`); one user message is the same as ``pipe(visual, text)``. The options are
        those of :meth:`__call__`.

        Raises:
            InputError: messages that are not such a conversation (naming the first bad one), or one too long for
                the model (:class:`PromptTooLongError`).
        """
        history, question = chat_turns(messages)
        return self._answer([question], [visual], [history], max_new_tokens, intervention, score_threshold,
                            generation)[0]

    @torch.no_grad()
    def chat_batch(self, visuals: Sequence[VisualInput], conversations: Sequence[Sequence[Any]], /,
                   max_new_tokens: int = 64, intervention: Union[Intervention, str, None] = None,
                   score_threshold: Optional[float] = None, **generation) -> list[Result]:
        """The next answers of several conversations as one batch: ``conversations[i]`` (messages as in
        :meth:`chat`) about ``visuals[i]``. A greedy answer is the one :meth:`chat` gives that conversation alone;
        the options are those of :meth:`__call__` (one intervention and one set of generation options for all).

        Raises:
            InputError: not two lists of the same non-zero length, or a conversation that is not one (naming it).
        """
        if (not isinstance(visuals, (list, tuple)) or not isinstance(conversations, (list, tuple)) or not conversations
                or len(visuals) != len(conversations)):
            raise InputError("chat_batch needs a non-empty list of conversations and a list of as many visuals (an "
                             "image, a list of frames or None each)")
        turns = []
        for i, messages in enumerate(conversations):
            try:
                turns.append(chat_turns(messages))
            except InputError as exc:
                raise InputError(f"conversation {i}: {exc}") from exc
        return self._answer([q for _, q in turns], list(visuals), [h for h, _ in turns], max_new_tokens,
                            intervention, score_threshold, generation)

    def _answer(self, prompts: list[str], visuals: list, histories: Optional[list], max_new_tokens: int,
                intervention: Union[Intervention, str, None], score_threshold: Optional[float],
                generation: dict) -> list[Result]:
        """Checked options, one generation over the batch, the experts: a :class:`Result` per prompt."""
        mllm = self.model.mllm
        options = check_generation({"max_new_tokens": max_new_tokens, **generation}, mllm.device)
        if isinstance(intervention, str):
            intervention = self.intervention(intervention)
        check_intervention(intervention)
        score_threshold = _check_threshold(score_threshold)
        prompt_boxes = [_prompt_box(p) for p in prompts]  # a malformed <box> fails before any compute
        results: list[Result] = [None] * len(prompts)  # type: ignore[list-item]
        groups = _kind_groups(visuals) if intervention is None else [list(range(len(prompts)))]
        for group in groups:  # images and videos decode apart: no image row padded to a video
            answered = self._run([prompts[i] for i in group], [visuals[i] for i in group],
                                 None if histories is None else [histories[i] for i in group],
                                 [prompt_boxes[i] for i in group], intervention, score_threshold, options)
            for i, result in zip(group, answered):
                results[i] = result
        return results

    def _run(self, prompts: list[str], visuals: list, histories: Optional[list],
             prompt_boxes: list[Optional[torch.Tensor]], intervention: Optional[Intervention],
             score_threshold: Optional[float], options: dict[str, Any]) -> list[Result]:
        """One batched generation + routing + expert run over checked requests (``histories``: each request's
        earlier chat turns, or None); a result per prompt."""
        mllm = self.model.mllm
        t0 = time.perf_counter()
        batch = self.processor(prompts, visuals, histories=histories)
        t1 = time.perf_counter()
        out = mllm.generate(batch, intervention=intervention, **options)
        t2 = time.perf_counter()
        calls = self.model.router.route_generation(out)
        per_call = self._run_experts(calls, out.expert_inputs, batch.frames_per_sample, prompt_boxes,
                                     score_threshold)
        timings = {"preprocess": t1 - t0, "generate": t2 - t1, "experts": time.perf_counter() - t2}
        results = []
        for b in range(len(prompts)):
            raw = mllm.processor.decode(out.sequences[b])
            results.append(Result(text=strip_protocol(raw, self.model.experts), raw_text=raw,
                                  calls=[per_call[id(c)] for c in calls if c.sample == b], timings=timings,
                                  **self._pictures(visuals[b])))
        return results

    def _pictures(self, visual: VisualInput) -> dict:
        """The pictures a result draws on: the image, or the frames the model saw (sampled like the processor)."""
        if visual is None:
            return {}
        cap = self.processor.max_image_pixels
        if isinstance(visual, (list, tuple)) or (isinstance(visual, np.ndarray) and visual.ndim == 4):
            return {"frames": [load_image(f, cap) for f in self.processor.frames(visual)]}
        return {"image": load_image(visual, cap)}

    def _run_experts(self, calls: list[TaskCall], inputs: Optional[ExpertInputs], frames_per_sample: list[int],
                     prompt_boxes: list[Optional[torch.Tensor]],
                     score_threshold: Optional[float] = None) -> dict[int, CallResult]:
        """Every call's :class:`CallResult`; a task token about no image keeps its text and gets no output."""
        results = {id(c): CallResult(c.task, c.phrase) for c in calls if frames_per_sample[c.sample] == 0}
        seeing = [c for c in calls if frames_per_sample[c.sample] > 0]
        options = {} if score_threshold is None else {"score_threshold": score_threshold}
        for run in run_calls(self.model.experts, seeing, inputs, prompt_boxes):
            sizes = [inputs.image_sizes[c.sample] for c in run.calls]
            for c, r in zip(run.calls, self.model.experts[run.task].postprocess(run.outputs, sizes, **options)):
                results[id(c)] = CallResult(run.task, c.phrase, r)
        return results


def _kind_groups(visuals: Sequence[VisualInput]) -> list[list[int]]:
    """Indices of a batch's requests in two groups, in order: text-only and image requests, and video requests.
    A left-padded batch pads every row to its longest prompt: an image question batched with 8-frame videos would
    prefill ~8x its tokens (``bench/pipeline.py``). Greedy generation is batch-invariant (tested), so the grouping
    changes no greedy answer; sampled answers of a mixed batch draw from the generator group by group. Calls with
    an intervention stay one batch (its inspection attributes describe the whole call)."""
    def video(visual: VisualInput) -> bool:
        return isinstance(visual, (list, tuple)) or (isinstance(visual, np.ndarray) and visual.ndim == 4)

    groups: dict[bool, list[int]] = {}
    for i, visual in enumerate(visuals):
        groups.setdefault(video(visual), []).append(i)
    return list(groups.values())


def _prompt_box(prompt: str) -> Optional[torch.Tensor]:
    """The first ``<box>`` of a prompt as a normalized ``(4,)`` tensor (a tracking target), if any."""
    boxes = decode_boxes(prompt)
    return torch.tensor(boxes[0], dtype=torch.float32) if boxes else None


def _requests(visual: object, prompt: object) -> tuple[list[str], list]:
    """``(prompts, visuals)`` of one call: a prompt string with its visual, or a non-empty list of prompts with a
    list of as many visuals (or None: all text-only).

    Raises:
        InputError: anything else, naming what was given.
    """
    if isinstance(prompt, str):
        return [check_text(prompt)], [visual]
    if not isinstance(prompt, (list, tuple)):
        raise InputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompt:
        raise InputError("no prompts: give a prompt string or a non-empty list of them")
    prompts = [check_text(p) for p in prompt]
    if visual is None:
        return prompts, [None] * len(prompts)
    if not isinstance(visual, (list, tuple)):
        raise InputError(f"a list of {len(prompts)} prompts needs a list of {len(prompts)} visuals (an image, a list "
                         f"of frames or None each), got {type(visual).__name__}")
    if len(visual) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(visual)} visuals; give one visual (or None) per prompt")
    return prompts, list(visual)


def chat_turns(messages: object) -> tuple[list[tuple[str, str]], str]:
    """``(history, question)`` of a conversation: ``messages`` alternate ``user`` and ``assistant`` (dicts with
    ``role`` and ``content``, or ``(role, text)`` pairs), starting and ending with ``user``.

    Raises:
        InputError: not a non-empty list of such messages, naming the first bad one.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError(f"messages must be a non-empty list of user/assistant turns, got {type(messages).__name__}")
    texts = []
    for i, m in enumerate(messages):
        role, content = ((m.get("role"), m.get("content")) if isinstance(m, Mapping)
                         else tuple(m) if isinstance(m, (list, tuple)) and len(m) == 2 else (None, None))
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise InputError(f"message {i} must be a {want!r} turn ({{'role': ..., 'content': ...}} or (role, text); "
                             f"turns alternate, starting with the user's), got {m!r:.80}")
        texts.append(check_text(content, f"message {i}'s content"))
    if len(texts) % 2 == 0:
        raise InputError("the conversation must end with the user's question (an odd number of messages)")
    return list(zip(texts[0:-1:2], texts[1::2])), texts[-1]


def _check_threshold(value: object) -> Optional[float]:
    """``score_threshold``: None, or a finite number in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"score_threshold must be None or a number in [0, 1], got {value!r} "
                          f"({type(value).__name__})")
    return float(value)
