"""MOT-challenge sequences -> video :class:`~taskmllm.data.sample.Sample` (error API: see formats).

A sequence folder holds ``seqinfo.ini`` (``[Sequence]`` imDir, seqLength, imWidth, imHeight, imExt),
the frames ``img1/000001.jpg ...`` and ``gt/gt.txt`` with one line per (frame, track):
``frame, id, left, top, width, height, conf, class, visibility`` (1-based frames; MOT15 lines have 10
columns, ``conf, x, y, z``, and no class/visibility). Rows with ``conf == 0`` are ignored (MOT's "do not
evaluate" flag); ``classes`` filters the class column when present. Boxes are clipped to the image; a
box entirely outside it is an error. ``visible[t]``: the track has a row in frame t with visibility above
``min_visibility`` (any row when there is no visibility column). Masks are ``None``.
"""

from __future__ import annotations

import configparser
import os
from typing import Optional, Sequence

import numpy as np

from taskmllm.data.annotations import LoadResult, PathLike, finish
from taskmllm.data.sample import ObjectGT, Sample, read_rgb
from taskmllm.errors import DataFormatError, ImageError

MOT_CLASSES: dict[int, str] = {1: "pedestrian", 2: "person on vehicle", 3: "car", 4: "bicycle", 5: "motorbike",
                               6: "non motorized vehicle", 7: "static person", 8: "distractor", 9: "occluder",
                               10: "occluder on the ground", 11: "occluder full", 12: "reflection"}
_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp")


def _seqinfo(seq: str) -> dict:
    ini = os.path.join(seq, "seqinfo.ini")
    sec: dict[str, str] = {}
    if os.path.isfile(ini):
        parser = configparser.ConfigParser()  # lower-cases the keys
        try:
            parser.read(ini)
        except configparser.Error as exc:
            raise DataFormatError(ini, "file", f"cannot parse: {exc}") from exc
        sec = dict(parser["Sequence"]) if parser.has_section("Sequence") else {}
    info = {"name": sec.get("name", os.path.basename(os.path.normpath(seq))), "imDir": sec.get("imdir", "img1"),
            "imExt": sec.get("imext", ".jpg")}
    for key in ("seqLength", "imWidth", "imHeight"):
        if key.lower() in sec:
            info[key] = sec[key.lower()]
    folder = os.path.join(seq, info["imDir"])
    if "seqLength" not in info:
        if not os.path.isdir(folder):
            raise DataFormatError(seq, "file", f"no seqinfo.ini and no frame folder {folder}")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMG_EXT))
        if not files:
            raise DataFormatError(seq, "file", f"no frames in {folder}")
        info["seqLength"], info["imExt"] = len(files), os.path.splitext(files[0])[1]
    if "imWidth" not in info or "imHeight" not in info:
        try:
            first = read_rgb(os.path.join(folder, f"{1:06d}{info['imExt']}"))
        except ImageError as exc:
            raise DataFormatError(seq, "file", f"image size unknown: {exc}") from exc
        info["imHeight"], info["imWidth"] = first.shape[:2]
    try:
        return {**info, "seqLength": int(info["seqLength"]), "imWidth": int(info["imWidth"]),
                "imHeight": int(info["imHeight"])}
    except ValueError as exc:
        raise DataFormatError(ini, "file", f"bad number: {exc}") from exc


def load_mot(seq_dir: PathLike, strict: bool = True, classes: Optional[Sequence[int]] = (1,),
             min_visibility: float = 0.0, clip_len: Optional[int] = None,
             gt_file: Optional[PathLike] = None) -> LoadResult:
    """Load one MOT sequence as video scene samples (``task="scene"``, ``source="mot"``).

    Args:
        seq_dir: the sequence folder.
        classes: class ids kept (``None`` keeps every class).
        min_visibility: a row counts as visible when its visibility is above this.
        clip_len: cut the sequence into clips of this many frames (one sample each); ``None``: one sample.
        gt_file: ground-truth file (default ``seq_dir/gt/gt.txt``).
    """
    seq = str(seq_dir)
    info = _seqinfo(seq)
    gt = str(gt_file) if gt_file is not None else os.path.join(seq, "gt", "gt.txt")
    t_len, w, h = info["seqLength"], info["imWidth"], info["imHeight"]
    result = LoadResult()
    rows: dict[int, dict[int, tuple[np.ndarray, float, int]]] = {}
    try:
        with open(gt, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise DataFormatError(gt, "file", f"cannot read: {exc}") from exc
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            frame, tid, box, vis, cls = _parse_line(line, gt, n, t_len, w, h)
            if tid in rows.get(frame, {}):
                raise DataFormatError(gt, f"line {n}", f"track {tid} appears twice in frame {frame}")
        except DataFormatError as err:
            result.errors.append(err)
            continue
        if box is None or (classes is not None and cls is not None and cls not in classes):
            continue
        rows.setdefault(frame, {})[tid] = (box, vis, cls)
    frame_paths = [os.path.join(seq, info["imDir"], f"{t + 1:06d}{info['imExt']}") for t in range(t_len)]
    clip = clip_len or t_len
    for start in range(0, t_len, clip):
        stop = min(t_len, start + clip)
        objects = _tracks(rows, start, stop, min_visibility)
        if objects:
            meta = {"sequence": info["name"], "start": start, "height": h, "width": w}
            result.samples.append(Sample(id=f"mot/{info['name']}/{start}", source="mot", objects=objects,
                                         meta=meta, frame_paths=frame_paths[start:stop]))
    return finish(result, gt, strict)


def _parse_line(line: str, gt: str, n: int, t_len: int, w: int, h: int):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 6:
        raise DataFormatError(gt, f"line {n}", f"expected >= 6 comma-separated columns, got {len(parts)}")
    try:
        vals = [float(p) for p in parts]
    except ValueError as exc:
        raise DataFormatError(gt, f"line {n}", f"non-numeric column: {exc}") from exc
    frame, tid = int(vals[0]), int(vals[1])
    if not 1 <= frame <= t_len:
        raise DataFormatError(gt, f"line {n}", f"frame {frame} outside the sequence's 1..{t_len}")
    left, top, bw, bh = vals[2:6]
    if bw <= 0 or bh <= 0:
        raise DataFormatError(gt, f"line {n}", f"box width and height must be positive, got {bw}, {bh}")
    x1, y1, x2, y2 = max(0.0, left), max(0.0, top), min(float(w), left + bw), min(float(h), top + bh)
    if x1 >= x2 or y1 >= y2:
        raise DataFormatError(gt, f"line {n}", f"box {left, top, bw, bh} lies outside the {w}x{h} image")
    conf = vals[6] if len(vals) > 6 else 1.0
    mot15 = len(vals) == 10
    cls = int(vals[7]) if len(vals) > 7 and not mot15 else None
    vis = vals[8] if len(vals) > 8 and not mot15 else 1.0
    box = None if conf == 0 else np.array([x1, y1, x2, y2])
    return frame - 1, tid, box, vis, cls


def _tracks(rows: dict, start: int, stop: int, min_visibility: float) -> list[ObjectGT]:
    t_len = stop - start
    ids = sorted({tid for t in range(start, stop) for tid in rows.get(t, {})})
    objects = []
    for tid in ids:
        boxes, visible, present = np.zeros((t_len, 4)), np.zeros(t_len, bool), np.zeros(t_len, bool)
        cls = None
        for t in range(start, stop):
            row = rows.get(t, {}).get(tid)
            if row is not None:
                box, vis, cls = row
                present[t - start] = True
                visible[t - start] = vis > min_visibility
                if visible[t - start]:
                    boxes[t - start] = box
        idx = np.flatnonzero(visible)
        if idx.size == 0:
            continue
        objects.append(ObjectGT(id=tid, category=MOT_CLASSES.get(cls, "object") if cls else "pedestrian",
                                boxes=boxes, visible=visible, present=present,
                                interval=(int(idx[0]), int(idx[-1]))))
    return objects
