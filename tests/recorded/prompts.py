"""A fixed set of requests to the shipped models, and how their answers are recorded and compared.

``python -m tests.recorded.prompts MODEL OUT.json`` records ``MODEL``'s answers (``Result.to_dict()`` without
timings, for every request alone and for the first seven as one batch). The recordings in this folder were made
with the code before the architecture refactor (commit 3fb5c79), so the tests that replay them show that the
refactor changed no answer.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np


def requests() -> list[tuple[Any, str]]:
    """``(visual, prompt)`` pairs: ShapesWorld images and videos, the bundled photos and a text-only question."""
    from taskmllm.data.media import read_video
    from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
    from taskmllm.demo.examples import example_file

    world = ShapesWorld(WorldConfig(), seed=424242)
    img = [world.image(i, "test").image for i in range(3)]
    vid = list(world.video(0, "test").frames)
    frames = read_video(example_file("shapes-track.gif"), num_frames=8)
    cat = example_file("photo-cat.jpg")
    return [
        (example_file("shapes-seg.png"), "Can you segment the bottommost blue object?"),
        (example_file("shapes-det.png"), "Find all circles."),
        (example_file("shapes-count.png"), "How many squares are there?"),
        (img[0], "Describe the image."),
        (img[1], "Is there a red circle in the image?"),
        (img[2], "What color is the largest object?"),
        (img[0], "Where is the small circle?"),
        (frames, "Follow the cyan star through the video."),
        (vid, "When is the red square visible?"),
        (vid, "Track the object in <box>100,100,400,400</box> of the first frame."),
        (cat, "Is there a cat in the image?"),
        (cat, "Describe the image."),
        (None, "What is the capital of France?"),
    ]


def record(result) -> dict[str, Any]:
    """What is compared of a result: its JSON form without the timings."""
    data = result.to_dict()
    data.pop("timings")
    return data


def answers(pipe, batched: int = 7) -> dict[str, list]:
    """Every request alone, then the first ``batched`` as one batch, at 48 new tokens."""
    reqs = requests()
    single = [record(pipe(v, p, max_new_tokens=48)) for v, p in reqs]
    batch = [record(r) for r in pipe([v for v, _ in reqs[:batched]], [p for _, p in reqs[:batched]],
                                     max_new_tokens=48)]
    return {"prompts": [p for _, p in reqs], "single": single, "batched": batch}


def assert_like(got: list[dict], want: list[dict], min_same: int, mask_iou: float = 0.85) -> None:
    """Lower-precision answers against fp32 ones: the same text for at least ``min_same`` requests and, where the
    text agrees, masks within IoU ``mask_iou``, boxes within 4 px, scores and visibility within 0.05. (bf16 keeps 8
    bits of mantissa in the mask logits: on the CPU the 1,417-pixel mask of request 0 moves its boundary to IoU
    0.896 with fp32.)"""
    from pycocotools import mask as mask_utils

    same = [i for i, (g, w) in enumerate(zip(got, want)) if g["text"] == w["text"]]
    assert len(same) >= min_same, [(g["text"], w["text"]) for g, w in zip(got, want)]
    for i in same:
        for g, w in zip(got[i]["calls"], want[i]["calls"]):
            if "mask_rle" in w:
                a, b = (mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}).astype(bool)
                        for m in (g["mask_rle"], w["mask_rle"]))
                union = (a | b).sum()
                assert union == 0 or (a & b).sum() / union >= mask_iou, f"request {i}: mask IoU < {mask_iou}"
            for key, tol in (("boxes", 4.0), ("scores", 0.05), ("visibility", 0.05)):
                if key in w and len(g[key]) == len(w[key]):
                    np.testing.assert_allclose(np.asarray(g[key], float), np.asarray(w[key], float), atol=tol,
                                               err_msg=f"request {i}: {key}")


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Texts and calls identical; masks within IoU 0.99, boxes within 1 px, scores within 2e-3 (floating-point
    reductions may differ between CPUs)."""
    from pycocotools import mask as mask_utils

    assert got["text"] == want["text"] and got["raw_text"] == want["raw_text"]
    assert [(c["task"], c["phrase"]) for c in got["calls"]] == [(c["task"], c["phrase"]) for c in want["calls"]]
    for g, w in zip(got["calls"], want["calls"]):
        assert set(g) == set(w), (set(g), set(w))
        if "mask_rle" in w:
            a, b = (mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}).astype(bool)
                    for m in (g["mask_rle"], w["mask_rle"]))
            union = (a | b).sum()
            assert union == 0 or (a & b).sum() / union >= 0.99
        for key, tol in (("boxes", 1.0), ("scores", 2e-3), ("visibility", 2e-3)):
            if key in w:
                np.testing.assert_allclose(np.asarray(g[key], float), np.asarray(w[key], float), atol=tol, rtol=0)


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from taskmllm.router.pipeline import Pipeline

    model, out = sys.argv[1], sys.argv[2]
    with open(out, "w") as f:
        json.dump(answers(Pipeline.from_pretrained(model)), f, indent=1)
