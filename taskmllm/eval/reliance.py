"""Image reliance: how much an MLLM's answers depend on the image it is shown.

A VQA accuracy at chance can mean the model reads the image badly, or not at all. This metric separates the
two: for each sample, the teacher-forced negative log-likelihood (summed over the answer's tokens, in nats)
of the reference answer is computed twice — with the sample's own image and with another sample's image
(the images of a batch rotated by one, so every sample sees a different scene) — and the **gap**
``nll(other image) - nll(own image)`` is averaged. A model that ignores its visual tokens has a gap of exactly
0; one that reads them has a positive gap (how many nats the right image is worth to the answer).

    from taskmllm.eval.reliance import image_reliance
    image_reliance(mllm, samples)  # {"own_nll": .., "other_nll": .., "gap": .., "n": ..}
    reliance_by_task(mllm, n=64)   # {task: that dict} on ShapesWorld test questions

``taskmllm train-recipe`` writes ``eval/image_reliance.json`` and the model card shows the gaps.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from taskmllm.errors import InputError
from taskmllm.model.processor import IGNORE

__all__ = ["RELIANCE_TASKS", "answer_nll", "image_reliance", "reliance_by_task", "sequence_nll"]

#: The ShapesWorld question tasks whose answers depend on the image (captions: the objects; the rest: VQA).
RELIANCE_TASKS: tuple[str, ...] = ("caption", "exist", "color", "shape", "count", "relation")


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, L, V)`` logits (position t predicts token t + 1), ``(B, L)`` labels -> ``(B,)`` NLL summed over
    each row's supervised tokens (labels != ``IGNORE``)."""
    targets = labels[:, 1:]  # (B, L-1)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    return -(picked * (targets != IGNORE)).sum(1)


@torch.no_grad()
def answer_nll(mllm: Any, prompts: Sequence[str], visuals: Sequence[Any], answers: Sequence[str]) -> torch.Tensor:
    """Teacher-forced NLL of each answer, summed over its supervised tokens: ``(B,)`` nats.

    ``mllm`` is a :class:`~taskmllm.model.mllm.TaskMLLM` (its processor builds the batch; answers with task
    tokens get their queries as in training).
    """
    batch = mllm.processor(list(prompts), list(visuals), answers=list(answers), padding_side="right")
    batch = batch.to(mllm.device)
    return sequence_nll(mllm(batch, logits="all").logits, batch.labels)


def image_reliance(mllm: Any, samples: Sequence[Any], batch_size: int = 16) -> dict[str, float]:
    """Mean answer NLL with the own image, with another sample's image, and their gap (see the module doc).

    ``samples``: :class:`~taskmllm.data.sample.Sample` objects with pixels loaded and one turn each; batches of
    ``batch_size`` (at least 2, so that a sample can be shown another's image) rotate images within the batch.

    Raises:
        InputError: fewer than 2 samples, ``batch_size < 2``, or a sample without an image or video.
    """
    if len(samples) < 2 or batch_size < 2:
        raise InputError(f"image reliance needs at least 2 samples and batch_size >= 2 "
                         f"(got {len(samples)} samples, batch_size {batch_size})")
    visuals = [s.frames if s.frames is not None else s.image for s in samples]
    if any(v is None for v in visuals):
        raise InputError("image reliance needs samples with pixels (call Sample.load())")
    own, other = [], []
    was_training = mllm.training
    mllm.eval()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = list(range(start, min(start + batch_size, len(samples))))
            if len(chunk) < 2:  # a last batch of one borrows its neighbour's image
                chunk = [chunk[0] - 1, chunk[0]]
            prompts = [samples[i].turns[0][0] for i in chunk]
            answers = [samples[i].turns[0][1] for i in chunk]
            vis = [visuals[i] for i in chunk]
            nll_own = answer_nll(mllm, prompts, vis, answers)
            nll_other = answer_nll(mllm, prompts, vis[1:] + vis[:1], answers)
            keep = slice(1, None) if chunk[0] < start else slice(None)  # do not count a borrowed sample twice
            own.append(nll_own[keep])
            other.append(nll_other[keep])
    finally:
        mllm.train(was_training)
    own_t, other_t = torch.cat(own), torch.cat(other)
    return {"own_nll": float(own_t.mean()), "other_nll": float(other_t.mean()),
            "gap": float((other_t - own_t).mean()), "n": int(own_t.numel())}


def reliance_by_task(mllm: Any, tasks: Sequence[str] = RELIANCE_TASKS, n: int = 64, seed: Optional[int] = None,
                     batch_size: int = 16) -> dict[str, dict[str, float]]:
    """:func:`image_reliance` on ``n`` ShapesWorld ``test`` questions of each task (drawn at the model's input
    size, from the evaluation world ``seed``, default ``DEFAULT_EVAL_SEED``)."""
    from taskmllm.data.shapesworld import ConversationConfig, WorldConfig, shapesworld_dataset
    from taskmllm.eval.suites import DEFAULT_EVAL_SEED

    world = WorldConfig(image_size=mllm.config.vision.image_size)
    out = {}
    for task in tasks:
        data = shapesworld_dataset({task: 1.0}, n, seed=DEFAULT_EVAL_SEED if seed is None else seed, split="test",
                                   config=world, conversation=ConversationConfig(question_first=None))
        out[task] = image_reliance(mllm, [data[i] for i in range(n)], batch_size)
    return out
