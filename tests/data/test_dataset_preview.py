"""Mixed datasets (ShapesWorld and loaded samples) and the preview grid."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from taskmllm.data.shapesworld.conversations import VIDEO_TASKS
from taskmllm.data.dataset import MixedDataset, collate_samples
from taskmllm.data.shapesworld import TaskSource, shapesworld_dataset
from taskmllm.data.preview import render_preview
from taskmllm.data.shapesworld.preview import preview_main
from taskmllm.data.sample import Sample
from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
from taskmllm.errors import ConfigError


def test_mix_ratios_and_determinism():
    ds = shapesworld_dataset({"seg": 3.0, "exist": 1.0, "track": 0.0}, length=2000, seed=4,
                             config=WorldConfig(image_size=64))
    counts = Counter(ds.locate(i)[0] for i in range(len(ds)))
    assert set(counts) == {"seg", "exist"} and abs(counts["seg"] / 2000 - 0.75) < 0.04
    a, b = ds[7], shapesworld_dataset({"seg": 3.0, "exist": 1.0}, length=2000, seed=4,
                                      config=WorldConfig(image_size=64))[7]
    assert a.turns == b.turns and a.image.tobytes() == b.image.tobytes()
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert len(batch) == 4 and all(isinstance(s, Sample) and s.image.shape == (64, 64, 3) for s in batch)
    with pytest.raises(ConfigError):
        MixedDataset({"seg": [batch[0]]}, {"det": 1.0}, 10)


def test_mixing_real_format_samples_with_shapesworld(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(path)
    real = [Sample(id=f"r{i}", source="llava", task="conversation", image_path=str(path),
                   turns=[("Hi\n<image>", "Hello.")]) for i in range(3)]
    world = ShapesWorld(WorldConfig(image_size=64, num_frames=4), seed=0)
    ds = MixedDataset({"conversation": real, "track": TaskSource(world, "track")},
                      {"conversation": 1.0, "track": 1.0}, length=40, seed=1)
    items = [ds[i] for i in range(40)]
    kinds = Counter(s.task for s in items)
    assert kinds["conversation"] > 5 and kinds["track"] > 5
    for s in items:
        if s.task == "conversation":
            assert s.image.shape == (10, 12, 3)
        else:
            assert s.frames.shape == (4, 64, 64, 3) and s.targets[0].boxes.shape == (4, 4)


def test_preview_png(tmp_path):
    out = preview_main(n=9, out=str(tmp_path / "grid.png"), seed=0)
    with Image.open(out) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] > 256 and arr.shape[1] > 3 * 256
    assert (np.abs(arr.astype(int) - [255, 0, 0]).sum(-1) == 0).sum() > 50  # red target boxes drawn
    assert (arr.reshape(-1, 3) == 0).all(-1).sum() > 100  # dark text written
    world = ShapesWorld(WorldConfig(num_frames=4), seed=0)
    vids = [TaskSource(world, t)[0] for t in VIDEO_TASKS]
    render_preview(vids, str(tmp_path / "v.png"), cols=3)
    assert Image.open(tmp_path / "v.png").size[0] > 3 * 256
