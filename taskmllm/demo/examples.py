"""Bundled examples: ShapesWorld images and a video with in-distribution instructions, and real photos.

The files live in ``taskmllm/assets/examples/`` (package data) with a manifest, ``examples.json``::

    from taskmllm.demo.examples import example_file, examples
    example_file("shapes-seg.png")          # absolute path of a bundled file
    [(e.file.name, e.instruction) for e in examples()]

``python -m taskmllm.demo.examples`` rewrites them (deterministic; needs scikit-image for the photos).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from taskmllm.errors import ConfigError, InputError

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
MANIFEST = "examples.json"
_PHOTOS = (("chelsea", "Segment the cat.", "photo-cat.jpg"),
           ("coffee", "Is there a cup in the image?", "photo-coffee.jpg"),
           ("astronaut", "Describe the image.", "photo-astronaut.jpg"))


@dataclass(frozen=True)
class Example:
    """One bundled example: ``kind`` is ``"image"`` or ``"video"``; ``file`` an absolute path."""

    name: str
    kind: str
    file: Path
    instruction: str


def examples(directory: Union[str, Path] = EXAMPLES_DIR) -> list[Example]:
    """The examples listed in ``directory/examples.json``, in order.

    Raises:
        ConfigError: the manifest is missing, malformed, or names a missing file.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        entries = json.loads(path.read_text())
        items = [Example(e["name"], e["kind"], directory / e["file"], e["instruction"]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the example manifest: {exc}") from exc
    for item in items:
        if item.kind not in ("image", "video") or not item.file.is_file():
            raise ConfigError(f"{path}: example {item.name!r} has kind {item.kind!r} and file {item.file} "
                              "(kind must be image or video, and the file must exist)")
    return items


def example_file(name: str, directory: Union[str, Path] = EXAMPLES_DIR) -> Path:
    """Absolute path of the bundled file ``name`` (e.g. ``"shapes-seg.png"``).

    Raises:
        InputError: no bundled file has that name.
    """
    path = Path(directory) / name
    if not path.is_file():
        known = sorted(p.name for p in Path(directory).glob("*") if p.name != MANIFEST)
        raise InputError(f"no bundled example file {name!r}; bundled: {known}")
    return path


def write_examples(out: Union[str, Path] = EXAMPLES_DIR, seed: int = 7) -> list[Example]:
    """Write the example files and manifest to ``out``: ShapesWorld ``test`` scenes with a question of each
    kind (segmentation, detection, counting, tracking) and three scikit-image photos, 256 px on the long side."""
    import numpy as np
    from PIL import Image

    from taskmllm.data.media import encode_animation
    from taskmllm.data.shapesworld import ShapesWorld, TaskSource, WorldConfig
    from taskmllm.model.tokens import IMAGE, VIDEO

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(WorldConfig(), seed=seed)
    entries = []
    for task, index, name in (("seg", 1, "shapes-seg.png"), ("det", 5, "shapes-det.png"),
                              ("count", 11, "shapes-count.png"), ("track", 2, "shapes-track.gif")):
        sample = TaskSource(world, task, split="test")[index]
        question = sample.turns[0][0].replace(IMAGE, "").replace(VIDEO, "").strip()
        if sample.is_video:
            (out / name).write_bytes(encode_animation(list(sample.frames), "gif", fps=4))
        else:
            Image.fromarray(sample.image).save(out / name, optimize=True)
        entries.append({"name": f"ShapesWorld {task}", "kind": "video" if sample.is_video else "image",
                        "file": name, "instruction": question})
    try:
        from skimage import data as skdata
    except ImportError as exc:
        raise ConfigError("writing the photo examples needs scikit-image: pip install scikit-image") from exc
    for photo, instruction, name in _PHOTOS:
        image = Image.fromarray(np.asarray(getattr(skdata, photo)())).convert("RGB")
        image.thumbnail((256, 256), Image.LANCZOS)
        image.save(out / name, quality=88, optimize=True)
        entries.append({"name": f"photo: {photo}", "kind": "image", "file": name, "instruction": instruction})
    (out / MANIFEST).write_text(json.dumps(entries, indent=2) + "\n")
    return examples(out)


if __name__ == "__main__":
    for e in write_examples():
        print(f"{e.kind:5s} {e.file.name:22s} {e.instruction}")
