"""COCO instances and RefCOCO-style refs -> :class:`~taskmllm.data.sample.Sample` (error API: see formats).

Masks are decoded with pycocotools exactly as ``COCO.annToMask`` does: polygons (a list of flat
``[x1, y1, x2, y2, ...]`` lists) are merged, uncompressed RLE (``counts`` a list) is converted, compressed RLE
(``counts`` a string) is decoded as is. A polygon must enclose an area and must not cross itself (checked with
shapely); an RLE must have its image's size. Boxes: COCO ``bbox`` ``[x, y, w, h]`` -> pixel ``x1, y1, x2, y2``,
within the image (1 px of float rounding allowed). An annotation's optional ``attributes`` (``{"color": "red"}``,
strings; an extension some COCO-style sets carry) become the object's ``labels``.
"""

from __future__ import annotations

import dataclasses
import os
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


def rle_string_counts(counts: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (a port of pycocotools' ``rleFrString``: 5 bits per
    character, offset 48, continuation bit 0x20, sign bit 0x10, runs from the third on stored as differences)."""
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    out: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("compressed RLE string ends inside a number")
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        out.append(x + out[-2] if len(out) > 2 else x)
    return out


def check_polygons(seg: list) -> None:
    """Raise ``ValueError`` naming the polygon of ``seg`` (COCO's flat ``[x1, y1, ...]`` lists) that is empty
    (fewer than 3 points, or no area) or intersects itself."""
    from shapely import make_valid
    from shapely.geometry import LinearRing, Polygon

    if not seg:
        raise ValueError("empty polygon list")
    for k, poly in enumerate(seg):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            raise ValueError(f"polygon {k} is empty: it needs a flat list of >= 3 (x, y) pairs")
        points = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(points).all():
            raise ValueError(f"polygon {k} has a coordinate that is not a finite number")
        if make_valid(Polygon(points)).area == 0:  # (a crossing outline's signed areas may cancel: repair first)
            raise ValueError(f"polygon {k} is empty: its points enclose no area")
        if not LinearRing(points).is_simple:
            raise ValueError(f"polygon {k} intersects itself")


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool mask of a COCO ``segmentation`` (polygons, uncompressed or compressed RLE).

    Raises:
        ValueError: the segmentation is malformed (callers wrap it into ``DataFormatError``).
    """
    return mask_utils.decode(segmentation_rle(seg, height, width)).astype(bool)


def segmentation_rle(seg: Any, height: int, width: int) -> dict:
    """The compressed RLE of a COCO ``segmentation`` (polygons merged, uncompressed RLE converted), checked.

    Raises:
        ValueError: the segmentation is malformed (see :func:`decode_segmentation`).
    """
    if isinstance(seg, list):
        check_polygons(seg)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [height, width]:
            raise ValueError(f"RLE size {seg['size']} differs from the image size {[height, width]}")
        if isinstance(seg["counts"], list):
            if sum(seg["counts"]) != height * width:
                raise ValueError("uncompressed RLE counts do not sum to height * width")
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg["counts"], (str, bytes)):
            counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
            rle = {"size": [height, width], "counts": counts}
            total = sum(rle_string_counts(seg["counts"]))
            if total != height * width:
                raise ValueError(f"compressed RLE runs cover {total} pixels, its {height}x{width} image has "
                                 f"{height * width}")
        else:
            raise ValueError("RLE counts must be a list or a string")
    else:
        raise ValueError("segmentation must be a polygon list or an RLE dict with 'counts' and 'size'")
    return rle


def _index(data: Any, path: str, result: LoadResult, image_root: Optional[PathLike], check_files: bool):
    require(data, ("images", "annotations", "categories"), path, "file")
    images, cats = {}, {}
    for i, img in enumerate(data["images"]):
        name = f"images[{i}]" + (f" (id={img.get('id')})" if isinstance(img, dict) else "")
        try:
            require(img, ("id", "width", "height", "file_name"), path, name)
            if int(img["width"]) <= 0 or int(img["height"]) <= 0:
                raise DataFormatError(path, name, "width and height must be positive")
            file = resolve_path(image_root, str(img["file_name"]))
            if check_files and not os.path.isfile(file):
                raise DataFormatError(path, name, f"image file not found: {file}")
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


def _object(ann: Any, i: int, path: str, images: dict, cats: dict, lazy: bool) -> tuple[Any, ObjectGT]:
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
        rle = segmentation_rle(ann["segmentation"], h, w)
        mask = None if lazy else mask_utils.decode(rle).astype(bool)
    except (ValueError, TypeError) as exc:
        raise DataFormatError(path, name, f"bad segmentation: {exc}") from exc
    attributes = ann.get("attributes", {})
    if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
        raise DataFormatError(path, name, f"attributes must map names to strings, got {attributes!r}")
    obj = ObjectGT(id=int(ann["id"]), category=str(cats[ann["category_id"]]), mask=mask,
                   box=np.array([x, y, x + bw, y + bh]), area=int(mask_utils.area(rle)),
                   labels={str(k): v for k, v in attributes.items()}, rle=rle if lazy else None)
    return ann["image_id"], obj


def load_coco(ann_file: PathLike, image_root: Optional[PathLike] = None, strict: bool = True,
              keep_empty: bool = False, check_files: bool = True, lazy_masks: bool = False) -> LoadResult:
    """Load COCO instances: one scene sample (``task="scene"``) per image with its objects.

    Args:
        ann_file: ``instances_*.json``.
        image_root: folder of the images (``file_name`` is relative to it).
        keep_empty: keep images without valid annotations.
        check_files: an image whose file does not exist is a malformed entry (``images[i] (id=...)``).
        lazy_masks: keep each mask as its compressed RLE (``ObjectGT.rle``, decoded by ``mask_array()``) instead
            of decoding it now: what training sources do (COCO train's masks take ~260 GB decoded).
    """
    path = str(ann_file)
    data = read_json(path)
    result = LoadResult()
    images, cats = _index(data, path, result, image_root, check_files)
    objects: dict[Any, list[ObjectGT]] = {k: [] for k in images}
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id, obj = _object(ann, i, path, images, cats, lazy_masks)
            objects[image_id].append(obj)
        except DataFormatError as err:
            result.errors.append(err)
    categories = list(dict.fromkeys(str(c) for c in cats.values()))
    for image_id, img in images.items():
        if objects[image_id] or keep_empty:
            result.samples.append(_scene(image_id, img, objects[image_id], image_root, categories))
    return finish(result, path, strict)


def _scene(image_id: Any, img: dict, objects: list[ObjectGT], image_root: Optional[PathLike],
           categories: list[str]) -> Sample:
    meta = {"image_id": image_id, "file_name": img["file_name"], "height": int(img["height"]),
            "width": int(img["width"]), "categories": categories}
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


def load_refs(ann_file: PathLike, refs_file: PathLike, image_root: Optional[PathLike] = None,
              split: Optional[str] = None, strict: bool = True, allow_pickle: bool = False,
              check_files: bool = True, lazy_masks: bool = False) -> LoadResult:
    """Load RefCOCO-style refs as one scene sample per ref (``source="refcoco"``, ``task="scene"``).

    Refs (a JSON list, or the original ``refs(unc).p`` with ``allow_pickle=True``) hold ``ref_id``, ``ann_id``,
    ``image_id``, ``split`` and ``sentences`` (``[{"sent": ...}]``); ``ann_file`` is the COCO instances file of
    their images. Each sample holds every object of its image; ``meta`` names the referred one (``ann_id``) and
    its expressions (``sentences``, whitespace normalized), ``ref_id`` and ``split``. ``split`` keeps only refs of
    that split; ``lazy_masks``: see :func:`load_coco`.
    """
    instances = load_coco(ann_file, image_root, strict=False, keep_empty=True, check_files=check_files,
                          lazy_masks=lazy_masks)
    result = LoadResult(errors=list(instances.errors))
    by_ann = {o.id: (s, o) for s in instances.samples for o in s.objects}
    refs = _read_refs(str(refs_file), allow_pickle)
    if not isinstance(refs, list):
        raise DataFormatError(refs_file, "file", "expected a list of refs at the top level")
    for i, ref in enumerate(refs):
        name = f"refs[{i}]" + (f" (ref_id={ref.get('ref_id')})" if isinstance(ref, dict) else "")
        try:
            sample = _ref_scene(ref, name, str(refs_file), by_ann)
        except DataFormatError as err:
            result.errors.append(err)
            continue
        if split is None or sample.meta["split"] == split:
            result.samples.append(sample)
    return finish(result, refs_file, strict)


def _ref_scene(ref: Any, name: str, path: str, by_ann: dict) -> Sample:
    require(ref, ("ref_id", "ann_id", "image_id", "sentences"), path, name)
    if ref["ann_id"] not in by_ann:
        raise DataFormatError(path, name, f"unknown (or malformed) annotation id {ref['ann_id']!r}")
    scene, _ = by_ann[ref["ann_id"]]
    if scene.meta["image_id"] != ref["image_id"]:
        raise DataFormatError(path, name, f"image id {ref['image_id']!r} differs from its annotation's")
    sentences: Sequence[Any] = ref["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise DataFormatError(path, name, "'sentences' must be a non-empty list")
    for j, sent in enumerate(sentences):
        require(sent, ("sent",), path, f"{name} sentences[{j}]")
    phrases = [" ".join(str(sent["sent"]).split()) for sent in sentences]
    if not all(phrases):
        raise DataFormatError(path, name, "a sentence is empty")
    out = dataclasses.replace(scene, id=f"refcoco/{ref['ref_id']}", source="refcoco", meta=dict(scene.meta))
    out.meta.update(ref_id=ref["ref_id"], ann_id=ref["ann_id"], split=ref.get("split"), sentences=phrases)
    return out


def referred(sample: Sample) -> ObjectGT:
    """The object a ref sample of :func:`load_refs` refers to."""
    return next(o for o in sample.objects if o.id == sample.meta["ann_id"])


def load_refcoco(ann_file: PathLike, refs_file: PathLike, image_root: Optional[PathLike] = None,
                 split: Optional[str] = None, task: str = "seg", strict: bool = True,
                 question_first: bool = True, allow_pickle: bool = False, check_files: bool = True) -> LoadResult:
    """Load RefCOCO-style refs (see :func:`load_refs`): one sample per (ref, sentence) with a ``seg`` or ``det``
    target.

    Samples: question ``"Please segment {sent}."`` / ``"Where is {sent}?"``, answer ``"Sure, <ref>{sent}</ref><seg>."``
    / ``"<ref>{sent}</ref><det>."``, target mask (and box) of the referred annotation. (Training sources write
    paraphrased conversations instead: ``kind: refcoco`` in ``data.sources``.)
    """
    if task not in ("seg", "det"):
        raise DataFormatError(refs_file, "task", f"task must be 'seg' or 'det', got {task!r}")
    refs = load_refs(ann_file, refs_file, image_root, split, strict, allow_pickle, check_files)
    result = LoadResult(errors=list(refs.errors))
    for ref in refs:
        result.samples.extend(_ref_samples(ref, task, question_first))
    return result


def _ref_samples(scene: Sample, task: str, question_first: bool) -> list[Sample]:
    obj = referred(scene)
    h, w = scene.meta["height"], scene.meta["width"]
    box = (obj.box / np.array([w, h, w, h])).astype(np.float32)[None]
    out = []
    for j, phrase in enumerate(scene.meta["sentences"]):
        if task == "seg":
            q, a = f"Please segment {phrase}.", f"Sure, {REF_OPEN}{phrase}{REF_CLOSE}{task_token('seg')}."
            target = TaskTarget("seg", phrase, mask=obj.mask_array(), boxes=box)
        else:
            q, a = f"Where is {phrase}?", f"{REF_OPEN}{phrase}{REF_CLOSE}{task_token('det')}."
            target = TaskTarget("det", phrase, boxes=box)
        q = place_visual(q, image_first=not question_first)
        s = scene.with_turns(task, [(q, a)], [target], str(j), Grounding(q, (obj.id,)))
        s.id = f"refcoco/{scene.meta['ref_id']}/{j}"
        out.append(s)
    return out


__all__ = ["check_polygons", "decode_segmentation", "load_coco", "load_refcoco", "load_refs", "referred",
           "rle_string_counts", "segmentation_rle"]
