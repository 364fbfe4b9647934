"""MOT-challenge sequences -> video :class:`~taskmllm.data.sample.Sample` (error API: see formats).

A sequence folder holds ``seqinfo.ini`` (``[Sequence]`` imDir, seqLength, imWidth, imHeight, imExt),
the frames ``img1/000001.jpg ...`` and ``gt/gt.txt`` with one line per (frame, track):
``frame, id, left, top, width, height, conf, class, visibility`` (1-based frames; MOT15 lines have 10
columns, ``conf, x, y, z``, and no class/visibility). Rows with ``conf == 0`` are ignored (MOT's "do not
evaluate" flag); ``classes`` filters the class column when present. Class names are MOT17's
(:data:`MOT_CLASSES`) unless ``seqinfo.ini`` names its own in a ``[Classes]`` section (``1 = circle``; an
extension ``taskmllm data export`` writes): then every class it names is kept by default. Boxes are clipped to
the image; a box entirely outside it is an error, and so is a track whose rows skip a frame (MOT annotates a
track through occlusions, with visibility 0, so a gap is a broken file). ``visible[t]``: the track has a row in
frame t with visibility above ``min_visibility`` (any row when there is no visibility column). Masks are ``None``.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Optional, Sequence, Union

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
    names: dict[int, str] = {}
    if os.path.isfile(ini):
        parser = configparser.ConfigParser()  # lower-cases the keys
        try:
            parser.read(ini)
            names = {int(k): v.strip() for k, v in parser["Classes"].items()} if parser.has_section("Classes") else {}
        except (configparser.Error, ValueError) as exc:
            raise DataFormatError(ini, "file", f"cannot parse: {exc}") from exc
        sec = dict(parser["Sequence"]) if parser.has_section("Sequence") else {}
    info = {"name": sec.get("name", os.path.basename(os.path.normpath(seq))), "imDir": sec.get("imdir", "img1"),
            "imExt": sec.get("imext", ".jpg"), "classes": names}
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


def load_mot(seq_dir: PathLike, strict: bool = True, classes: Union[Sequence[int], str, None] = "auto",
             min_visibility: float = 0.0, clip_len: Optional[int] = None, gt_file: Optional[PathLike] = None,
             stride: int = 1, check_files: bool = True) -> LoadResult:
    """Load one MOT sequence as video scene samples (``task="scene"``, ``source="mot"``).

    Args:
        seq_dir: the sequence folder.
        classes: class ids kept; ``"auto"``: the classes ``seqinfo.ini`` names, else MOT's pedestrians ``(1,)``;
            ``None`` keeps every class.
        min_visibility: a row counts as visible when its visibility is above this.
        clip_len: cut the sequence into clips of this many frames (one sample each); ``None``: one sample.
        gt_file: ground-truth file (default ``seq_dir/gt/gt.txt``).
        stride: keep every ``stride``-th frame (a clip of ``clip_len`` frames spans ``clip_len * stride``).
        check_files: every frame file must exist (else ``DataFormatError`` naming the first missing one).
    """
    if stride < 1 or (clip_len is not None and clip_len < 1):
        raise DataFormatError(seq_dir, "options", f"stride and clip_len must be >= 1, got {stride}, {clip_len}")
    seq = str(seq_dir)
    info = _seqinfo(seq)
    gt = str(gt_file) if gt_file is not None else os.path.join(seq, "gt", "gt.txt")
    if classes == "auto":
        classes = tuple(info["classes"]) if info["classes"] else (1,)
    result = LoadResult()
    rows = _read_rows(gt, info, classes, result)
    frame_paths = [os.path.join(seq, info["imDir"], f"{t + 1:06d}{info['imExt']}") for t in range(info["seqLength"])]
    if check_files:
        missing = next((p for p in frame_paths if not os.path.isfile(p)), None)
        if missing is not None:
            raise DataFormatError(seq, f"frame {frame_paths.index(missing) + 1}", f"frame file not found: {missing}")
    names = info["classes"] or MOT_CLASSES
    kept = list(range(0, info["seqLength"], stride))
    clip = clip_len or len(kept)
    for k in range(0, len(kept), clip):
        frames = kept[k:k + clip]
        objects = _tracks(rows, frames, min_visibility, names)
        if objects:
            meta = {"sequence": info["name"], "start": frames[0], "frames": frames, "stride": stride,
                    "height": info["imHeight"], "width": info["imWidth"]}
            result.samples.append(Sample(id=f"mot/{info['name']}/{frames[0]}", source="mot", objects=objects,
                                         meta=meta, frame_paths=[frame_paths[t] for t in frames]))
    return finish(result, gt, strict)


def mot_sequences(path: PathLike) -> list[Path]:
    """The MOT sequence folders at ``path``: ``path`` itself when it holds ``gt/gt.txt``, else its subfolders that do.

    Raises:
        DataFormatError: ``path`` is neither a sequence nor a folder of sequences.
    """
    root = Path(path)
    if (root / "gt" / "gt.txt").is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / "gt" / "gt.txt").is_file()) if root.is_dir() else []
    if not found:
        raise DataFormatError(path, "file", "neither a MOT sequence (gt/gt.txt) nor a folder of sequences")
    return found


def _read_rows(gt: str, info: dict, classes: Optional[Sequence[int]], result: LoadResult) -> dict:
    """``{frame: {track: (box, visibility, class)}}`` of the kept rows; malformed lines and tracks with a gap
    become errors in ``result`` (a track with a gap is dropped whole)."""
    t_len, w, h = info["seqLength"], info["imWidth"], info["imHeight"]
    try:
        with open(gt, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise DataFormatError(gt, "file", f"cannot read: {exc}") from exc
    rows: dict[int, dict[int, tuple[np.ndarray, float, Optional[int]]]] = {}
    seen: dict[int, dict[int, int]] = {}  # track -> frame -> line
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            frame, tid, box, vis, cls = _parse_line(line, gt, n, t_len, w, h)
            if frame in seen.get(tid, {}):
                raise DataFormatError(gt, f"line {n}", f"track {tid} appears twice in frame {frame + 1}")
        except DataFormatError as err:
            result.errors.append(err)
            continue
        seen.setdefault(tid, {})[frame] = n
        if box is None or (classes is not None and cls is not None and cls not in classes):
            continue
        rows.setdefault(frame, {})[tid] = (box, vis, cls)
    for tid, frames in seen.items():
        order = sorted(frames)
        gap = next((i for i in range(1, len(order)) if order[i] != order[i - 1] + 1), None)
        if gap is not None:
            a, b = order[gap - 1] + 1, order[gap] + 1
            result.errors.append(DataFormatError(gt, f"line {frames[order[gap]]} (track {tid})",
                                                 f"track {tid} has a gap in frame numbers: it jumps from frame {a} "
                                                 f"to frame {b} (a track's rows must cover consecutive frames)"))
            for frame in order:
                rows.get(frame, {}).pop(tid, None)
    return rows


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


def _tracks(rows: dict, frames: Sequence[int], min_visibility: float, names: dict[int, str]) -> list[ObjectGT]:
    t_len = len(frames)
    ids = sorted({tid for t in frames for tid in rows.get(t, {})})
    objects = []
    for tid in ids:
        boxes, visible, present = np.zeros((t_len, 4)), np.zeros(t_len, bool), np.zeros(t_len, bool)
        cls = None
        for i, t in enumerate(frames):
            row = rows.get(t, {}).get(tid)
            if row is not None:
                box, vis, cls = row
                present[i] = True
                visible[i] = vis > min_visibility
                if visible[i]:
                    boxes[i] = box
        idx = np.flatnonzero(visible)
        if idx.size == 0:
            continue
        objects.append(ObjectGT(id=tid, category=names.get(cls, "object") if cls else "pedestrian",
                                boxes=boxes, visible=visible, present=present,
                                interval=(int(idx[0]), int(idx[-1]))))
    return objects
