"""Samples -> the public datasets' own file layouts: COCO instances, RefCOCO refs, MOT sequences, LLaVA JSON.

The inverse of the loaders (:mod:`taskmllm.data.formats`): what a writer writes, its loader reads back as the same
objects (masks, boxes, categories, labels, phrases, tracks, visibility). Pixels are written as PNG (lossless), so
the frames read back are the ones written. Each writer fills a folder it is given; ``taskmllm data export``
(:mod:`taskmllm.data.shapesworld.export`) writes ShapesWorld through them into a fresh folder atomically.

- COCO: ``images`` / ``annotations`` / ``categories``; masks as compressed RLE (exact for any mask; pycocotools
  reads it like a polygon), ``bbox`` ``[x, y, w, h]``, ``area`` the mask's pixels, ``iscrowd`` 0, and an object's
  ``labels`` as the annotation's ``attributes`` (an extension the loader reads; other tools ignore it).
- RefCOCO: a COCO instances file plus ``refs.json``: the refer toolkit's ``refs(unc).p`` as JSON (``ref_id``,
  ``ann_id``, ``image_id``, ``category_id``, ``split``, ``file_name``, ``sent_ids``, ``sentences`` with ``sent``,
  ``raw``, ``tokens``, ``sent_id``).
- MOT: ``seqinfo.ini``, ``img1/000001.png ...``, ``gt/gt.txt`` (``frame, id, left, top, width, height, 1, class,
  visibility``), one row per frame from the first to the last frame a track is present; the class names in a
  ``[Classes]`` section of ``seqinfo.ini``.
- LLaVA: ``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from taskmllm.data.sample import ObjectGT, Sample

__all__ = ["coco_json", "write_coco", "write_llava", "write_mot_sequence", "write_refcoco"]


def _save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def _annotation(obj: ObjectGT, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    mask = obj.mask_array()
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    x1, y1, x2, y2 = (float(v) for v in obj.box)
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
           "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(np.asarray(mask).sum()),
           "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}
    labels = {k: v for k, v in obj.labels.items() if isinstance(v, str)}
    if labels:
        ann["attributes"] = labels
    return ann


def coco_json(scenes: Sequence[Sample], file_names: Sequence[str], categories: Sequence[str]) -> dict[str, Any]:
    """The COCO instances dict of image ``scenes`` (objects with ``mask`` and ``box``); image ``i`` has id ``i + 1``
    and file ``file_names[i]``, annotations are numbered from 1 in order, ``categories`` get ids from 1."""
    cat_ids = {name: k + 1 for k, name in enumerate(categories)}
    images, annotations = [], []
    for i, (scene, name) in enumerate(zip(scenes, file_names)):
        h, w = scene.hw
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for obj in scene.objects:
            annotations.append(_annotation(obj, len(annotations) + 1, i + 1, cat_ids[obj.category]))
    return {"info": {"description": "written by taskmllm"}, "licenses": [], "images": images,
            "annotations": annotations,
            "categories": [{"id": k, "name": name, "supercategory": "object"} for name, k in cat_ids.items()]}


def write_coco(scenes: Sequence[Sample], ann_file: Path, image_dir: Path, file_names: Sequence[str],
               categories: Sequence[str]) -> dict[str, Any]:
    """Write the scenes' images (PNG) under ``image_dir`` and their instances to ``ann_file`` (see :func:`coco_json`;
    ``file_names`` are relative to ``image_dir``); returns the instances dict."""
    for scene, name in zip(scenes, file_names):
        _save_png(scene.image, image_dir / name)
    data = coco_json(scenes, file_names, categories)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(data))
    return data


def write_refcoco(scenes: Sequence[Sample], expressions: Sequence[Mapping[int, Sequence[str]]], out: Path,
                  image_dir: Path, file_names: Sequence[str], categories: Sequence[str], split: str) -> Path:
    """RefCOCO's layout: ``out/instances.json`` (COCO) and ``out/refs.json``, one ref per object of scene ``i`` that
    ``expressions[i]`` (object id -> sentences) names; images under ``image_dir``. Returns ``out/refs.json``."""
    data = write_coco(scenes, out / "instances.json", image_dir, file_names, categories)
    refs, sent_id = [], 0
    for i, (scene, names) in enumerate(zip(scenes, expressions)):
        anns = [a for a in data["annotations"] if a["image_id"] == i + 1]
        for obj, ann in zip(scene.objects, anns):
            sents = list(names.get(obj.id, ()))
            if not sents:
                continue
            ids = list(range(sent_id, sent_id + len(sents)))
            sent_id += len(sents)
            refs.append({"ref_id": len(refs), "ann_id": ann["id"], "image_id": i + 1,
                         "category_id": ann["category_id"], "split": split, "file_name": file_names[i],
                         "sent_ids": ids, "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": k}
                                                        for s, k in zip(sents, ids)]})
    path = out / "refs.json"
    path.write_text(json.dumps(refs))
    return path


def write_mot_sequence(video: Sample, seq_dir: Path, categories: Sequence[str],
                       extents: Optional[Mapping[int, np.ndarray]] = None,
                       visibility: Optional[Mapping[int, np.ndarray]] = None, frame_rate: int = 10) -> Path:
    """One MOT sequence of ``video`` (objects with ``boxes``, ``visible`` and ``present``) in ``seq_dir``.

    Track ids are object id + 1 (MOT's ids start at 1), classes the 1-based index in ``categories``. A track has a
    row in every frame from the first to the last in which it is present: its ``boxes`` where visible, elsewhere
    ``extents[id][t]`` (the object's full outline, pixel xyxy; required for such frames) with visibility 0.
    ``visibility[id]`` gives the visible fraction per frame (default 1 where visible).

    Raises:
        ValueError: a track is present in non-consecutive frames, or an occluded frame has no extent.
    """
    name = seq_dir.name
    h, w = video.hw
    for t, frame in enumerate(video.frames):
        _save_png(frame, seq_dir / "img1" / f"{t + 1:06d}.png")
    classes = "".join(f"{k + 1} = {c}\n" for k, c in enumerate(categories))
    (seq_dir / "seqinfo.ini").write_text(
        f"[Sequence]\nname={name}\nimDir=img1\nframeRate={frame_rate}\nseqLength={video.num_frames}\n"
        f"imWidth={w}\nimHeight={h}\nimExt=.png\n\n[Classes]\n{classes}")
    lines = []
    for obj in video.objects:
        lines += _track_rows(obj, categories.index(obj.category) + 1, (extents or {}).get(obj.id),
                             (visibility or {}).get(obj.id))
    (seq_dir / "gt").mkdir(parents=True, exist_ok=True)
    (seq_dir / "gt" / "gt.txt").write_text("".join(line + "\n" for line in lines))
    return seq_dir


def _track_rows(obj: ObjectGT, cls: int, extent: Optional[np.ndarray], vis: Optional[np.ndarray]) -> list[str]:
    present = np.asarray(obj.present if obj.present is not None else obj.visible, bool)
    frames = np.flatnonzero(present)
    if frames.size and frames[-1] - frames[0] + 1 != frames.size:
        raise ValueError(f"object {obj.id} is present in non-consecutive frames {frames.tolist()}")
    rows = []
    for t in frames:
        if obj.visible[t]:
            box, v = obj.boxes[t], 1.0 if vis is None else float(vis[t])
        elif extent is not None:
            box, v = extent[t], 0.0
        else:
            raise ValueError(f"object {obj.id} is present but hidden in frame {t}: its extent is needed")
        x1, y1, x2, y2 = (float(c) for c in box)
        rows.append(f"{t + 1},{obj.id + 1},{x1:g},{y1:g},{x2 - x1:g},{y2 - y1:g},1,{cls},{v:.6g}")
    return rows


def write_llava(entries: Sequence[tuple[Sample, str]], json_path: Path, image_dir: Path) -> Path:
    """LLaVA conversation JSON of ``(sample with turns and an image, image file name under image_dir)`` pairs."""
    data = []
    for sample, name in entries:
        _save_png(sample.image, image_dir / name)
        conversation = []
        for question, answer in sample.turns:
            conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        data.append({"id": sample.id, "image": name, "conversations": conversation})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1))
    return json_path
