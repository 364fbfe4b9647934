"""Every bad input the hardening issue lists, fed to ``Pipeline.__call__``: a typed error naming the problem.

The inputs are the issue's (found by an adversarial run on the code of the time); each row asserts the error
class and its message. Checks happen before any compute, and a failed call leaves the model as it was (the
next call answers the same as before).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from taskmllm.errors import ConfigError, ImageError, InputError
from taskmllm.model.interventions import VAR, VHR

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (48, 48, 3), dtype=np.uint8)


def _closed_image():
    image = Image.new("RGB", (32, 32))
    image.close()
    return image


@pytest.mark.parametrize("prompt, message", [
    ("Segment \ud800 the circle", r"the prompt is not valid Unicode text: character 8 is U\+D800, a lone surrogate"),
    (None, r"prompt must be a string or a list of strings, got NoneType"),
    (123, r"prompt must be a string or a list of strings, got int"),
    (b"Segment the circle", r"prompt must be a string or a list of strings, got bytes"),
    ({"text": "hi"}, r"prompt must be a string or a list of strings, got dict"),
    (["fine", None], r"the prompt must be a string, got NoneType None"),
    ([], r"no prompts: give a prompt string or a non-empty list of them"),
])
def test_bad_prompts_are_input_errors(tiny_pipeline, prompt, message):
    with pytest.raises(InputError, match=message):
        tiny_pipeline(IMAGE if not isinstance(prompt, list) else [IMAGE] * len(prompt), prompt)


def test_empty_batch_and_unpaired_visuals(tiny_pipeline):
    with pytest.raises(InputError, match="no prompts"):
        tiny_pipeline([], [])
    with pytest.raises(InputError, match="2 prompts but 1 visuals"):
        tiny_pipeline([IMAGE], ["a", "b"])
    with pytest.raises(InputError, match="a list of 2 prompts needs a list of 2 visuals"):
        tiny_pipeline(IMAGE, ["a", "b"])


@pytest.mark.parametrize("image, message", [
    (np.array([["a", "b"], ["c", "d"]]), r"image array must hold numbers .* got dtype <U1"),
    (np.array([[object(), 1]], dtype=object), r"image array must hold numbers .* got dtype object"),
    (np.full((16, 16, 3), np.nan, np.float32), r"image array has NaN or infinite values"),
    (np.full((16, 16, 3), np.inf, np.float64), r"image array has NaN or infinite values"),
    (Image.new("La", (16, 16)), r"cannot use a PIL image of mode 'La': conversion from La to L not supported"),
    (_closed_image(), r"cannot use a PIL image of mode 'RGB': Operation on closed image"),
    (np.zeros((9000, 9000), np.bool_), r"image array is 9000x9000 = 81 megapixels; the limit is 64 megapixels"),
    (3.5, r"unsupported image type float"),
])
def test_bad_image_objects_are_image_errors(tiny_pipeline, image, message):
    with pytest.raises(ImageError, match=message):
        tiny_pipeline(image, "Describe it.")


def test_bad_image_paths_are_named(tiny_pipeline, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    (tmp_path / "file").write_bytes(b"x")
    cases = [
        ("a" * 5000 + ".png", r"image file a+…a+\.png \(5004 characters\): the path is too long for the file system"),
        (fifo, r"pipe\.png: is not a regular file \(a FIFO, socket or device\)"),
        (tmp_path, r"is a directory, not a file"),
        (loop, r"loop\.png: a symbolic link loop"),
        (tmp_path / "absent.png", r"absent\.png: not found"),
        (tmp_path / "file" / "x.png", r"x\.png: a parent of it is not a directory"),
    ]
    for path, message in cases:
        with pytest.raises(ImageError, match=message):
            tiny_pipeline(path, "Describe it.")


def test_decompression_bomb_is_refused_from_the_header(tiny_pipeline, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels in about 48 KB
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageError, match=r"image bomb\.png has more than 179 megapixels .*the limit is 64 "
                                         r"megapixels \(max_image_pixels\)"):
        tiny_pipeline(bomb, "Describe it.")
    big = tmp_path / "big.png"
    Image.new("1", (9000, 8000)).save(big)  # 72 MP: under Pillow's own limits, over taskmllm's cap
    with pytest.raises(ImageError, match=r"image big\.png is 9000x8000 = 72 megapixels; the limit is 64"):
        tiny_pipeline(big, "Describe it.")


def test_the_pixel_cap_is_a_setting(tiny_pipeline):
    processor = tiny_pipeline.processor
    before = processor.max_image_pixels
    try:
        processor.max_image_pixels = 40 * 40
        with pytest.raises(ImageError, match=r"48x48 = 0.0023 megapixels; the limit is 0.0016 megapixels"):
            tiny_pipeline(IMAGE, "Describe it.")
    finally:
        processor.max_image_pixels = before
    assert tiny_pipeline(IMAGE, "Describe it.", max_new_tokens=2).raw_text is not None


@pytest.mark.parametrize("options, message", [
    ({"do_sample": True, "temperature": float("nan")}, r"temperature must be a finite number > 0, got nan"),
    ({"do_sample": True, "top_p": -1}, r"top_p must be a finite number in \(0, 1\], got -1"),
    ({"do_sample": True, "temperature": "1"}, r"temperature must be a finite number > 0, got '1' \(str\)"),
    ({"do_sample": True, "generator": "x"}, r"generator must be a torch.Generator or None, got str"),
    ({"max_new_tokens": "5"}, r"max_new_tokens must be an integer >= 1, got '5' \(str\)"),
    ({"max_new_tokens": None}, r"max_new_tokens must be an integer >= 1, got None"),
    ({"max_new_tokens": [5]}, r"max_new_tokens must be an integer >= 1, got \[5\]"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
    ({"repetition_penalty": -1.0}, r"repetition_penalty must be a finite number > 0, got -1.0"),
    ({"no_repeat_ngram_size": "2"}, r"no_repeat_ngram_size must be an integer >= 0, got '2' \(str\)"),
    ({"compile": 1}, r"compile must be True or False, got 1 \(int\)"),
    ({"max_new_tokens": -1}, r"max_new_tokens must be an integer >= 1, got -1"),
    ({"max_new_tokens": 0.5}, r"max_new_tokens must be an integer >= 1, got 0.5"),
    ({"max_new_tokens": False}, r"max_new_tokens must be an integer >= 1, got False"),
    ({"max_new_tokens": float("nan")}, r"max_new_tokens must be an integer >= 1, got nan"),
    ({"max_new_tokens": float("inf")}, r"max_new_tokens must be an integer >= 1, got inf"),
    ({"max_new_tokens": 5, "max_tokens": 5}, r"unknown generation option 'max_tokens' \(did you mean "
                                             r"'max_new_tokens'\?\)"),
    ({"do_sample": "yes"}, r"do_sample must be True or False, got 'yes'"),
    ({"score_threshold": "x"}, r"score_threshold must be None or a number in \[0, 1\], got 'x'"),
    ({"score_threshold": 2.0}, r"score_threshold must be None or a number in \[0, 1\], got 2.0"),
])
def test_bad_generation_options_are_config_errors(tiny_pipeline, options, message):
    with pytest.raises(ConfigError, match=message):
        tiny_pipeline(IMAGE, "Find all hexagons.", **options)


class _NoContext:
    def attach(self, model, context):
        return None


@pytest.mark.parametrize("intervention, message", [
    (object(), r"intervention must have an attach\(model, context\) method .* got object"),
    (VHR, r"intervention must be an instance, got the class VHR; pass VHR\(\) instead"),
    (_NoContext(), r"_NoContext.attach returned NoneType, not a context manager"),
])
def test_bad_interventions_are_config_errors_and_leave_no_state(tiny_pipeline, intervention, message):
    before = tiny_pipeline(IMAGE, "Describe it.", max_new_tokens=4).raw_text
    with pytest.raises(ConfigError, match=message):
        tiny_pipeline(IMAGE, "Describe it.", intervention=intervention)
    assert tiny_pipeline(IMAGE, "Describe it.", max_new_tokens=4).raw_text == before


def test_var_with_its_own_defaults_runs_on_a_small_model(tiny_pipeline):
    """``VAR()`` resolves its sink threshold per model (tau 20 is unreachable at hidden size 64)."""
    result = tiny_pipeline(IMAGE, "Describe it.", intervention=VAR(), max_new_tokens=3)
    assert isinstance(result.raw_text, str)


def test_video_frames_are_sampled_once_for_the_result(tiny_pipeline):
    """A 40-frame video is drawn on the frames the model saw (max_frames), not decoded whole again."""
    frames = [IMAGE] * 40
    result = tiny_pipeline(frames, "Describe it.", max_new_tokens=2)
    assert len(result.frames) == tiny_pipeline.model.mllm.config.max_frames


def test_sampling_with_a_generator_on_another_device_is_refused(tiny_pipeline):
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ConfigError, match="generator is on cuda"):
        tiny_pipeline(IMAGE, "Describe it.", do_sample=True, generator=torch.Generator(device="cuda"))


def test_repetition_options_reach_generation(tiny_pipeline):
    """Pipeline and predict's settings pass repetition_penalty / no_repeat_ngram_size to ``generate``: the answer is
    the one ``TaskMLLM.generate`` gives with them, and with 1-grams forbidden no id of prompt + answer repeats."""
    from taskmllm.predict import GenerationSettings

    mllm = tiny_pipeline.model.mllm
    kwargs = GenerationSettings(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=1).kwargs()
    assert kwargs == {"max_new_tokens": 12, "repetition_penalty": 1.3, "no_repeat_ngram_size": 1}
    result = tiny_pipeline(IMAGE, "Describe it.", **kwargs)
    direct = mllm.generate(tiny_pipeline.processor("Describe it.", IMAGE), **kwargs)
    assert result.raw_text == direct.text[0]
    ids = [t for t in direct.sequences[0] if t != mllm.tokenizer.eos_token_id]
    assert len(set(ids)) == len(ids)


def test_a_mixed_batch_decodes_images_and_videos_apart_with_the_same_answers(tiny_pipeline):
    """Images and videos in one call run as two batches (no image row padded to a video's length); every answer is
    the one the request gets alone, in the caller's order."""
    from taskmllm.router.pipeline import _kind_groups

    video = [IMAGE, IMAGE[::-1].copy()]
    visuals = [IMAGE, video, None, video, IMAGE]
    prompts = ["Describe it.", "Track the object.", "Hello?", "What happens?", "Is there a circle?"]
    assert _kind_groups(visuals) == [[0, 2, 4], [1, 3]]
    together = tiny_pipeline(visuals, prompts, max_new_tokens=8)
    alone = [tiny_pipeline(v, p, max_new_tokens=8) for v, p in zip(visuals, prompts)]
    assert [r.raw_text for r in together] == [r.raw_text for r in alone]
    assert [bool(r.frames) for r in together] == [False, True, False, True, False]
