"""COCO instances and RefCOCO-style refs -> :class:`~taskmllm.data.sample.Sample` (error API: see formats).

Masks are decoded with pycocotools exactly as ``COCO.annToMask`` does: polygons (a list of flat
``[x1, y1, x2, y2, ...]`` lists) are merged, uncompressed RLE (``counts`` a list) is converted, compressed RLE
(``counts`` a string) is decoded as is. Boxes: COCO ``bbox`` ``[x, y, w, h]`` -> pixel ``x1, y1, x2, y2``.
"""

from __future__ import annotations

import pickle
from typing import Any, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from taskmllm.data.annotations import LoadResult, PathLike, finish, read_json, require, resolve_path
from taskmllm.data.sample import Grounding, ObjectGT, Sample
from taskmllm.errors import DataFormatError
from taskmllm.experts.base import TaskTarget
from taskmllm.model.tokens import REF_CLOSE, REF_OPEN, place_visual, task_token

BOX_TOLERANCE = 1.0  # pixels a COCO box may exceed its image by (float rounding in real files)


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool mask of a COCO ``segmentation`` (polygons, uncompressed or compressed RLE).

    Raises:
        ValueError: the segmentation is malformed (callers wrap it into ``DataFormatError``).
    """
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise ValueError("polygons must be lists of >= 3 (x, y) pairs")
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [height, width]:
            raise ValueError(f"RLE size {seg['size']} differs from the image size {[height, width]}")
        if isinstance(seg["counts"], list):
            if sum(seg["counts"]) != height * width:
                raise ValueError("uncompressed RLE counts do not sum to height * width")
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg["counts"], (str, bytes)):
            rle = seg
        else:
            raise ValueError("RLE counts must be a list or a string")
    else:
        raise ValueError("segmentation must be a polygon list or an RLE dict with 'counts' and 'size'")
    return mask_utils.decode(rle).astype(bool)


def _index(data: Any, path: str, result: LoadResult):
    require(data, ("images", "annotations", "categories"), path, "file")
    images, cats = {}, {}
    for i, img in enumerate(data["images"]):
        name = f"images[{i}]" + (f" (id={img.get('id')})" if isinstance(img, dict) else "")
        try:
            require(img, ("id", "width", "height", "file_name"), path, name)
            if int(img["width"]) <= 0 or int(img["height"]) <= 0:
                raise DataFormatError(path, name, "width and height must be positive")
            images[img["id"]] = img
        except DataFormatError as err:
            result.errors.append(err)
        except (TypeError, ValueError) as exc:
            result.errors.append(DataFormatError(path, name, f"bad value: {exc}"))
    for i, cat in enumerate(data["categories"]):
        try:
            require(cat, ("id", "name"), path, f"categories[{i}]")
            cats[cat["id"]] = cat["name"]
        except DataFormatError as err:
            result.errors.append(err)
    return images, cats


def _object(ann: Any, i: int, path: str, images: dict, cats: dict) -> tuple[Any, ObjectGT]:
    name = f"annotations[{i}]" + (f" (id={ann.get('id')})" if isinstance(ann, dict) else "")
    require(ann, ("id", "image_id", "category_id", "bbox", "segmentation"), path, name)
    if ann["image_id"] not in images:
        raise DataFormatError(path, name, f"unknown image id {ann['image_id']!r}")
    if ann["category_id"] not in cats:
        raise DataFormatError(path, name, f"unknown category id {ann['category_id']!r}")
    img = images[ann["image_id"]]
    h, w = int(img["height"]), int(img["width"])
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise DataFormatError(path, name, f"bbox must be [x, y, w, h], got {bbox!r}")
    x, y, bw, bh = (float(v) for v in bbox)
    if bw < 0 or bh < 0 or x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + bw > w + BOX_TOLERANCE \
            or y + bh > h + BOX_TOLERANCE:
        raise DataFormatError(path, name, f"bbox {bbox} lies outside its {w}x{h} image")
    try:
        mask = decode_segmentation(ann["segmentation"], h, w)
    except (ValueError, TypeError) as exc:
        raise DataFormatError(path, name, f"bad segmentation: {exc}") from exc
    obj = ObjectGT(id=int(ann["id"]), category=str(cats[ann["category_id"]]), mask=mask,
                   box=np.array([x, y, x + bw, y + bh]), area=int(mask.sum()))
    return ann["image_id"], obj


def load_coco(ann_file: PathLike, image_root: Optional[PathLike] = None, strict: bool = True,
              keep_empty: bool = False) -> LoadResult:
    """Load COCO instances: one scene sample (``task="scene"``) per image with its objects.

    Args:
        ann_file: ``instances_*.json``.
        image_root: folder of the images (``file_name`` is relative to it).
        keep_empty: keep images without valid annotations.
    """
    path = str(ann_file)
    data = read_json(path)
    result = LoadResult()
    images, cats = _index(data, path, result)
    objects: dict[Any, list[ObjectGT]] = {k: [] for k in images}
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id, obj = _object(ann, i, path, images, cats)
            objects[image_id].append(obj)
        except DataFormatError as err:
            result.errors.append(err)
    for image_id, img in images.items():
        if objects[image_id] or keep_empty:
            result.samples.append(_scene(image_id, img, objects[image_id], image_root))
    return finish(result, path, strict)


def _scene(image_id: Any, img: dict, objects: list[ObjectGT], image_root: Optional[PathLike]) -> Sample:
    meta = {"image_id": image_id, "file_name": img["file_name"], "height": int(img["height"]),
            "width": int(img["width"])}
    return Sample(id=f"coco/{image_id}", source="coco", objects=objects, meta=meta,
                  image_path=resolve_path(image_root, img["file_name"]))


def _read_refs(refs_file: str, allow_pickle: bool) -> Any:
    if refs_file.endswith(".p") or refs_file.endswith(".pkl"):
        if not allow_pickle:
            raise DataFormatError(refs_file, "file", "refs are a pickle; pass allow_pickle=True if you trust "
                                  "the file, or convert it to JSON")
        try:
            with open(refs_file, "rb") as f:
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise DataFormatError(refs_file, "file", f"cannot read pickle: {exc}") from exc
    return read_json(refs_file)


def load_refcoco(ann_file: PathLike, refs_file: PathLike, image_root: Optional[PathLike] = None,
                 split: Optional[str] = None, task: str = "seg", strict: bool = True,
                 question_first: bool = True, allow_pickle: bool = False) -> LoadResult:
    """Load RefCOCO-style refs: one sample per (ref, sentence) with a ``seg`` or ``det`` target.

    Refs (JSON list, or the original ``refs(unc).p`` with ``allow_pickle=True``) hold ``ref_id``, ``ann_id``,
    ``image_id``, ``split`` and ``sentences`` (``[{"sent": ...}]``). Samples: question ``"Please segment
    {sent}."`` / ``"Where is {sent}?"``, answer ``"Sure, <ref>{sent}</ref><seg>."`` /
    ``"<ref>{sent}</ref><det>."``, target mask (and box) of the referred annotation.
    """
    if task not in ("seg", "det"):
        raise DataFormatError(refs_file, "task", f"task must be 'seg' or 'det', got {task!r}")
    instances = load_coco(ann_file, image_root, strict=False, keep_empty=True)
    result = LoadResult(errors=list(instances.errors))
    by_ann = {o.id: (s, o) for s in instances.samples for o in s.objects}
    refs = _read_refs(str(refs_file), allow_pickle)
    if not isinstance(refs, list):
        raise DataFormatError(refs_file, "file", "expected a list of refs at the top level")
    for i, ref in enumerate(refs):
        name = f"refs[{i}]" + (f" (ref_id={ref.get('ref_id')})" if isinstance(ref, dict) else "")
        try:
            result.samples.extend(_ref_samples(ref, name, str(refs_file), by_ann, split, task, question_first))
        except DataFormatError as err:
            result.errors.append(err)
    return finish(result, refs_file, strict)


def _ref_samples(ref: Any, name: str, path: str, by_ann: dict, split: Optional[str], task: str,
                 question_first: bool) -> list[Sample]:
    require(ref, ("ref_id", "ann_id", "image_id", "sentences"), path, name)
    if ref["ann_id"] not in by_ann:
        raise DataFormatError(path, name, f"unknown (or malformed) annotation id {ref['ann_id']!r}")
    scene, obj = by_ann[ref["ann_id"]]
    if scene.meta["image_id"] != ref["image_id"]:
        raise DataFormatError(path, name, f"image id {ref['image_id']!r} differs from its annotation's")
    if split is not None and ref.get("split") != split:
        return []
    sentences: Sequence[Any] = ref["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise DataFormatError(path, name, "'sentences' must be a non-empty list")
    h, w = scene.meta["height"], scene.meta["width"]
    box = (obj.box / np.array([w, h, w, h])).astype(np.float32)[None]
    out = []
    for j, sent in enumerate(sentences):
        require(sent, ("sent",), path, f"{name} sentences[{j}]")
        phrase = " ".join(str(sent["sent"]).split())
        if task == "seg":
            q, a = f"Please segment {phrase}.", f"Sure, {REF_OPEN}{phrase}{REF_CLOSE}{task_token('seg')}."
            target = TaskTarget("seg", phrase, mask=obj.mask, boxes=box)
        else:
            q, a = f"Where is {phrase}?", f"{REF_OPEN}{phrase}{REF_CLOSE}{task_token('det')}."
            target = TaskTarget("det", phrase, boxes=box)
        q = place_visual(q, image_first=not question_first)
        s = scene.with_turns(task, [(q, a)], [target], f"ref{ref['ref_id']}/{j}", Grounding(q, (obj.id,)))
        s.source = "refcoco"
        s.meta.update(ref_id=ref["ref_id"], ann_id=ref["ann_id"], split=ref.get("split"))
        out.append(s)
    return out


__all__ = ["decode_segmentation", "load_coco", "load_refcoco"]
