"""Real-data hallucination runners for users who have the files: POPE (COCO question files) and CHAIR (COCO).

- :func:`run_pope` reads question files of the POPE repository (``output/coco/coco_pope_{random,popular,
  adversarial}.json``, one JSON object per line: ``{"question_id", "image", "text", "label"}``), asks each
  ``text`` about ``image_root/image`` and scores with LLaVA's parsing rule (:func:`~taskmllm.eval.hallucination.pope_summary`).
  The split name is ``random`` / ``popular`` / ``adversarial`` when the file name contains it, else its stem.
- :func:`run_chair` captions COCO images and scores CHAIR. Ground truth per image, as in Rohrbach et al.'s
  code: the categories of its instance annotations (``instances_*.json``) plus the objects its reference
  captions (``captions_*.json``) mention. The vocabulary is the category names (regular plurals added) and
  optional extra synonyms ``{category: [synonym, ...]}``.

Both pass the image **path** as the visual (the Pipeline reads it), so memory stays flat on large sets; every
path is checked before the model runs. Prompts are the question text: the model's processor adds ``<image>`` where
the model was trained to see it (``tokens.image_first``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from taskmllm.data.coco import load_coco
from taskmllm.data.annotations import read_json, require, resolve_path
from taskmllm.data.pope import POPE_SPLITS
from taskmllm.errors import ConfigError, DataFormatError, ImageError
from taskmllm.eval.hallucination import ChairVocabulary, chair, pope_summary
from taskmllm.eval.report import PlotSpec
from taskmllm.eval.suites import Answerer, SuiteOutput, answer_all

__all__ = ["CHAIR_PROMPT", "PopeQuestion", "read_coco_captions", "read_pope_questions", "run_chair", "run_pope"]

PathLike = Union[str, "os.PathLike[str]"]
#: The captioning instruction of CHAIR evaluations in the VAR / VHR / OPERA line of work.
CHAIR_PROMPT = "Please describe this image in detail."


@dataclass(frozen=True)
class PopeQuestion:
    """One line of a POPE question file."""

    question_id: object
    image: str
    text: str
    label: str


def read_pope_questions(path: PathLike) -> list[PopeQuestion]:
    """Parse a POPE question file (JSON lines; blank lines skipped).

    Raises:
        DataFormatError: unreadable file, or a line that is not JSON, lacks a key or has a label other than
            yes/no (the error names the line).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, "file", f"cannot read: {exc}") from exc
    out = []
    for k, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, f"line {k}", f"not JSON: {exc}") from exc
        require(entry, ("question_id", "image", "text", "label"), path, f"line {k}")
        label = str(entry["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise DataFormatError(path, f"line {k}", f"label must be 'yes' or 'no', got {entry['label']!r}")
        out.append(PopeQuestion(entry["question_id"], str(entry["image"]), str(entry["text"]), label))
    if not out:
        raise DataFormatError(path, "file", "no questions")
    return out


def _split_name(path: PathLike) -> str:
    stem = Path(path).stem
    return next((s for s in POPE_SPLITS if s in stem), stem)


def _check_images(paths: Collection[str]) -> None:
    missing = sorted(p for p in set(paths) if not os.path.isfile(p))
    if missing:
        raise ImageError(f"{len(missing)} image file(s) not found, e.g. {missing[0]}")


def run_pope(answer: Answerer, question_files: Sequence[PathLike], image_root: Optional[PathLike] = None,
             n: Optional[int] = None, batch_size: int = 16, progress: bool = True) -> SuiteOutput:
    """POPE over one or more question files (one split each); ``n`` keeps the first ``n`` questions per file.

    Raises:
        ConfigError: no file, or two files map to the same split name.
        DataFormatError / ImageError: a malformed file or a missing image.
    """
    if not question_files:
        raise ConfigError("run_pope needs at least one POPE question file")
    per_split: dict[str, list[PopeQuestion]] = {}
    for path in question_files:
        name = _split_name(path)
        if name in per_split:
            raise ConfigError(f"two question files map to POPE split {name!r}")
        per_split[name] = read_pope_questions(path)[:n]
    _check_images([resolve_path(image_root, q.image) for qs in per_split.values() for q in qs])
    splits = {}
    for name, questions in per_split.items():
        pairs = [(resolve_path(image_root, q.image), q.text) for q in questions]  # the model places the image
        results = answer_all(answer, pairs, batch_size, f"pope/{name}", progress)
        splits[name] = ([r.text for r in results], [q.label for q in questions])
    summary = pope_summary(splits)
    return SuiteOutput({"suite": "pope", "files": [str(p) for p in question_files], "pope": summary},
                       [PlotSpec("pope_yes_ratio", {"model": summary})])


def read_coco_captions(path: PathLike) -> dict[object, list[str]]:
    """``{image_id: [caption, ...]}`` of a COCO captions file (``{"annotations": [{"image_id", "caption"}]}``).

    Raises:
        DataFormatError: unreadable JSON or an annotation without ``image_id`` / ``caption``.
    """
    data = read_json(path)
    require(data, ("annotations",), path, "file")
    out: dict[object, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        require(ann, ("image_id", "caption"), path, f"annotations[{i}]")
        out.setdefault(ann["image_id"], []).append(str(ann["caption"]))
    return out


def run_chair(answer: Answerer, instances_file: PathLike, captions_file: Optional[PathLike] = None,
              image_root: Optional[PathLike] = None, n: Optional[int] = None, seed: int = 0,
              synonyms: Optional[Mapping[str, Collection[str]]] = None, prompt: str = CHAIR_PROMPT,
              batch_size: int = 16, progress: bool = True) -> SuiteOutput:
    """CHAIR of the model's captions of ``n`` COCO images (all images when ``n`` is None; else a sample drawn
    with ``seed``, in image-id order).

    Raises:
        DataFormatError / ImageError: malformed annotation files or a missing image.
        MetricInputError: a synonym maps to two categories.
    """
    scenes = list(load_coco(instances_file, image_root, keep_empty=True))
    if not scenes:
        raise DataFormatError(instances_file, "file", "no images")
    if n is not None and n < len(scenes):
        keep = sorted(np.random.default_rng(seed).choice(len(scenes), size=n, replace=False))
        scenes = [scenes[i] for i in keep]
    categories = [c["name"] for c in read_json(instances_file)["categories"] if isinstance(c, dict) and "name" in c]
    vocab_map = {name: list((synonyms or {}).get(name, ())) for name in categories}
    vocab = ChairVocabulary.from_synonyms(vocab_map)
    references = read_coco_captions(captions_file) if captions_file is not None else {}
    gt = []
    for s in scenes:
        objects = {o.category for o in s.objects}
        for caption in references.get(s.meta["image_id"], []):
            objects.update(vocab.extract(caption))
        gt.append(objects)
    paths = [str(s.image_path) for s in scenes]
    _check_images(paths)
    results = answer_all(answer, [(p, prompt) for p in paths], batch_size, "chair", progress)
    metrics = chair([r.text for r in results], gt, vocab)
    metrics["image_ids"] = [s.meta["image_id"] for s in scenes]
    return SuiteOutput({"suite": "chair", "n_images": len(scenes), "chair": metrics})
