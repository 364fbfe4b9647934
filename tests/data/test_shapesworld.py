"""ShapesWorld generator: determinism, exact masks and boxes, video tracks, held-out compositions, priors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from taskmllm.data.shapesworld import backgrounds as bg_module
from taskmllm.data.shapesworld import TaskSource
from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
from taskmllm.data.shapesworld.vocab import COLORS


def _raster(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Independent composition oracle: draw one polygon alone."""
    im = Image.new("1", (w, h), 0)
    ImageDraw.Draw(im).polygon([tuple(map(float, p)) for p in poly], fill=1, outline=1)
    return np.array(im, dtype=bool)


def _box(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return None if xs.size == 0 else [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return abs(sum(x[i] * y[(i + 1) % len(x)] - x[(i + 1) % len(x)] * y[i] for i in range(len(x)))) / 2


def test_same_seed_is_byte_identical_and_seeds_differ():
    a, b, c = ShapesWorld(seed=3), ShapesWorld(seed=3), ShapesWorld(seed=4)
    for i in range(5):
        sa, sb, sc = a.image(i), b.image(i), c.image(i)
        assert sa.image.tobytes() == sb.image.tobytes()
        assert [o.mask.tobytes() for o in sa.objects] == [o.mask.tobytes() for o in sb.objects]
        assert sa.image.tobytes() != sc.image.tobytes()
    va, vb, vc = a.video(1), b.video(1), c.video(1)
    assert va.frames.tobytes() == vb.frames.tobytes() and va.frames.tobytes() != vc.frames.tobytes()
    assert [o.masks.tobytes() for o in va.objects] == [o.masks.tobytes() for o in vb.objects]
    for task in ("caption", "seg", "det", "track", "temporal"):
        ta, tb, tc = (TaskSource(w, task) for w in (a, b, c))
        texts = [[ta[i].turns for i in range(6)], [tb[i].turns for i in range(6)], [tc[i].turns for i in range(6)]]
        assert texts[0] == texts[1] and texts[0] != texts[2]


def test_image_masks_are_exact_rasterized_areas_and_boxes_tight():
    world = ShapesWorld(seed=0)
    n_objects = n_occluded = 0
    for i in range(60):
        s = world.image(i)
        h, w = s.image.shape[:2]
        objs = sorted(s.objects, key=lambda o: o.depth)
        union = np.zeros((h, w), bool)
        for k, o in enumerate(objs):
            full = _raster(o.polygon, h, w)
            nearer = np.zeros((h, w), bool)
            for other in objs[k + 1:]:
                nearer |= _raster(other.polygon, h, w)
            expected = full & ~nearer
            assert np.array_equal(o.mask, expected)
            assert o.area == int(o.mask.sum()) == int(expected.sum()) > 0
            perimeter = np.linalg.norm(np.diff(np.vstack([o.polygon, o.polygon[:1]]), axis=0), axis=1).sum()
            assert abs(full.sum() - _shoelace(o.polygon)) <= perimeter + 4
            assert o.mask.sum() >= 0.4 * full.sum() - 1
            assert list(o.box) == _box(o.mask)
            assert np.all(s.image[o.mask] == np.array(COLORS[o.color], np.uint8))
            assert not (union & o.mask).any()
            union |= o.mask
            n_objects += 1
            n_occluded += int(o.mask.sum() < full.sum())
    assert n_occluded > 0 and n_objects > 100


def test_video_tracks_follow_masks():
    world = ShapesWorld(seed=1)
    gaps = late = 0
    for i in range(12):
        v = world.video(i)
        t_len, h, w = v.frames.shape[:3]
        objs = sorted(v.objects, key=lambda o: o.depth)
        for o in objs:
            assert o.masks.shape == (t_len, h, w) and o.boxes.shape == (t_len, 4)
            for t in range(t_len):
                box = _box(o.masks[t])
                assert bool(o.visible[t]) == (box is not None)
                if box is not None:
                    assert list(o.boxes[t]) == box
                    assert o.present[t]
                    assert np.all(v.frames[t][o.masks[t]] == np.array(COLORS[o.color], np.uint8))
            vis = np.flatnonzero(o.masks.reshape(t_len, -1).any(1))
            assert o.interval == (vis[0], vis[-1])
            gaps += int(len(vis) != vis[-1] - vis[0] + 1)
            late += int(vis[0] > 0 or vis[-1] < t_len - 1)
        # per frame: the visible masks are the present polygons minus the nearer present polygons
        for t in range(t_len):
            for k, o in enumerate(objs):
                if not o.present[t]:
                    assert not o.masks[t].any()
                    continue
                nearer = np.zeros((h, w), bool)
                for other in objs[k + 1:]:
                    if other.present[t]:
                        nearer |= _raster(other.polygons[t], h, w)
                assert np.array_equal(o.masks[t], _raster(o.polygons[t], h, w) & ~nearer)
    assert late > 0  # objects enter and leave


def test_heldout_compositions_never_in_training():
    cfg = WorldConfig(image_size=64, num_frames=4)
    world = ShapesWorld(cfg, seed=5)
    held = set(cfg.heldout)
    for split in ("train", "val"):
        for i in range(200):
            assert not {(o.color, o.category) for o in world.image(i, split).objects} & held
        for i in range(20):
            assert not {(o.color, o.category) for o in world.video(i, split).objects} & held
    for i in range(50):
        assert {(o.color, o.category) for o in world.image(i, "heldout").objects} & held
    seen_test = set()
    for i in range(200):
        seen_test |= {(o.color, o.category) for o in world.image(i, "test").objects}
    assert seen_test & held
    # training texts never name a held-out pair either
    names = {f"{c} {s}" for c, s in held}
    for task in ("exist", "det", "caption", "seg", "color"):
        src = TaskSource(world, task, "train")
        for i in range(40):
            text = " ".join(q + " " + a for q, a in src[i].turns)
            assert not any(n in text or n + "s" in text for n in names), text


def test_cooccurrence_prior():
    cfg = WorldConfig(image_size=64, cooccurrence=(("star", "heart", 0.8),))
    world = ShapesWorld(cfg, seed=2)
    with_star = with_both = without_star = heart_without_star = 0
    for i in range(600):
        classes = {o.category for o in world.image(i).objects}
        if "star" in classes:
            with_star += 1
            with_both += "heart" in classes
        else:
            without_star += 1
            heart_without_star += "heart" in classes
    assert abs(with_both / with_star - 0.8) < 0.08
    assert heart_without_star / without_star < 0.6


def test_no_skimage_falls_back(monkeypatch):
    monkeypatch.setattr(bg_module, "_skimage_data_dir", lambda: None)
    world = ShapesWorld(WorldConfig(backgrounds=("photo",)), seed=0)
    s = world.image(0)
    assert s.image.shape == (128, 128, 3) and world.backgrounds.kinds() == ("plain", "textured")


def test_photo_backgrounds_used_when_available():
    world = ShapesWorld(WorldConfig(backgrounds=("photo",)), seed=0)
    if not world.backgrounds.photos:
        pytest.skip("scikit-image photos not installed")
    img = world.image(0).image
    assert img.reshape(-1, 3).std(0).mean() > 5
