"""Media files -> frames: mp4 (PyAV), GIF, frame folders, sampling to the model's frame count, typed errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taskmllm.data.media import MediaLimits, encode_animation, read_image, read_video, sample_indices
from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
from taskmllm.errors import ConfigError, ImageError, VideoError


@pytest.fixture(scope="module")
def clip():
    """12 ShapesWorld frames (objects move between frames)."""
    return ShapesWorld(WorldConfig(image_size=64, num_frames=12), seed=3).video(0).frames


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_sample_indices_spread_uniformly_and_keep_the_ends():
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(12, 4) == [0, 4, 7, 11]
    assert sample_indices(100, 8)[0] == 0 and sample_indices(100, 8)[-1] == 99 and len(sample_indices(100, 8)) == 8


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_video_files_decode_to_sampled_frames(tmp_path, clip, fmt):
    path = _write(tmp_path / f"clip.{fmt}", encode_animation(list(clip), fmt, fps=8))
    frames = read_video(path, num_frames=4)
    want = clip[sample_indices(len(clip), 4)]
    assert len(frames) == 4 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    error = np.abs(np.stack(frames).astype(int) - want.astype(int)).mean()
    assert error < (6.0 if fmt != "gif" else 1e-9), f"{fmt}: mean abs error {error}"  # H.264/WebP are lossy
    other = clip[[1, 5, 6, 10]]  # the wrong frames are much further away: the sampling itself is checked
    assert np.abs(np.stack(frames).astype(int) - other.astype(int)).mean() > 2 * error


def test_frame_folder_and_frame_list(tmp_path, clip):
    for t, frame in enumerate(clip):
        Image.fromarray(frame).save(tmp_path / f"frame_{t:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = read_video(tmp_path, num_frames=8)
    assert np.array_equal(np.stack(frames), clip[sample_indices(12, 8)])
    files = sorted(tmp_path.glob("*.png"))[:3]
    assert np.array_equal(np.stack(read_video(files, num_frames=8)), clip[:3])


def test_image_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:5, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.shape == (10, 12, 3)
    assert (image[:5] == [255, 0, 0]).all() and (image[5:] == 255).all()


def test_bad_images_raise_readable_image_errors(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ImageError, match="dot.png is 1x1 pixels"):
        read_image(tmp_path / "dot.png")
    _write(tmp_path / "bad.jpg", b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="cannot decode image file bad.jpg"):
        read_image(tmp_path / "bad.jpg")
    _write(tmp_path / "empty.png", b"")
    with pytest.raises(ImageError, match="empty"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="not found"):
        read_image(tmp_path / "missing.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="the limit is 1e-05 MB"):
        read_image(tmp_path / "big.png", MediaLimits(max_file_mb=1e-5))


def test_bad_videos_raise_readable_video_errors(tmp_path, clip):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(VideoError, match="zero frames"):
        read_video(tmp_path / "empty_dir", 8)
    _write(tmp_path / "bad.mp4", b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(VideoError, match="cannot decode video file bad.mp4"):
        read_video(tmp_path / "bad.mp4", 8)
    path = _write(tmp_path / "long.mp4", encode_animation(list(clip), "mp4", fps=2))  # 6 s
    with pytest.raises(VideoError, match="s long; the limit is 5 s"):
        read_video(path, 8, MediaLimits(max_video_seconds=5))
    with pytest.raises(VideoError, match="more than 10 frames"):
        read_video(path, 8, MediaLimits(max_decoded_frames=10))
    gif = _write(tmp_path / "long.gif", encode_animation(list(clip), "gif"))
    with pytest.raises(VideoError, match="long.gif has 12 frames; the limit is 10"):
        read_video(gif, 8, MediaLimits(max_decoded_frames=10))
    Image.fromarray(clip[0]).save(tmp_path / "a.png")
    Image.fromarray(clip[1][:32]).save(tmp_path / "b.png")
    with pytest.raises(VideoError, match="frame 1 is 64x32 but frame 0 is 64x64"):
        read_video([tmp_path / "a.png", tmp_path / "b.png"], 8)


def test_encoded_animations_round_trip_frame_count(tmp_path, clip):
    for fmt in ("gif", "png"):
        path = _write(tmp_path / f"x.{fmt}", encode_animation(list(clip[:5]), fmt))
        with Image.open(path) as im:
            assert im.n_frames == 5


def test_malformed_files_found_by_fuzzing_are_typed(tmp_path):
    """Inputs the fuzz suite found escaping as untyped exceptions, kept as regressions."""
    truncated_gif = (b"GIF89a\x10\x00\x10\x00\x81\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04"
                     b"\x00\n\x00\x00\x00,\x00\x00\x00\x00\x10\x00")  # Pillow raised struct.error
    with pytest.raises(VideoError, match="cannot decode video file t.gif: it is not a readable animation"):
        read_video(_write(tmp_path / "t.gif", truncated_gif), 8)
    for frames in (0, -1, 2.5, "4", None, True):  # a comparison with a str raised TypeError
        with pytest.raises(ConfigError, match=r"num_frames must be an integer >= 1"):
            read_video(tmp_path / "t.gif", frames)


def test_pixel_cap_applies_to_videos_before_decoding(tmp_path):
    gif = bytearray(encode_animation([np.zeros((16, 16, 3), np.uint8)] * 2, "gif"))
    gif[6:10] = (9000).to_bytes(2, "little") * 2  # the logical screen claims 9000 x 9000: under Pillow's limits
    with pytest.raises(VideoError, match=r"video huge.gif is 9000x9000 = 81 megapixels; the limit is 64"):
        read_video(_write(tmp_path / "huge.gif", bytes(gif)), 8)
    gif[6:10] = (30000).to_bytes(2, "little") * 2  # 900 megapixels: Pillow itself refuses to open it
    with pytest.raises(VideoError, match=r"video bomb.gif has more than 179 megapixels \(a decompression bomb\?\)"):
        read_video(_write(tmp_path / "bomb.gif", bytes(gif)), 8)
    Image.new("RGB", (300, 200)).save(tmp_path / "frame.png")
    with pytest.raises(ImageError, match=r"image frame.png is 300x200 = 0.06 megapixels; the limit is 0.05"):
        read_image(tmp_path / "frame.png", MediaLimits(max_image_pixels=50_000))
