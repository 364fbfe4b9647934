"""Fuzz the inference boundary: images, videos, prompts and generation options into ``Pipeline.__call__`` and
the media readers. Every case must end in an answer or a typed error (see ``tests/fuzz/harness.py``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from taskmllm.data.media import MediaLimits, read_image, read_video
from taskmllm.model.generation import GENERATION_OPTIONS
from tests.fuzz.harness import fuzz_settings
from tests.fuzz.strategies import anything, arrays, image_files, pil_images, texts, video_files

GOOD = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)


@fuzz_settings(ci=40, long=1500)
@given(image=st.one_of(arrays(), pil_images(), anything()))
def test_fuzz_image_objects(fuzz_pipeline, figures, image):
    figures.run("image", lambda: fuzz_pipeline(image, "Describe it.", max_new_tokens=2), lambda: repr(image)[:200])


@fuzz_settings(ci=30, long=1500)
@given(file=image_files(), reader=st.sampled_from(["pipeline", "media"]))
def test_fuzz_image_files(fuzz_pipeline, figures, file, reader):
    suffix, content = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(content)
        call = (lambda: fuzz_pipeline(path, "Describe it.", max_new_tokens=2)) if reader == "pipeline" else \
            (lambda: read_image(path, MediaLimits()))
        figures.run("image file", call, lambda: f"{reader} {suffix} {content[:40]!r} ({len(content)} bytes)")


@fuzz_settings(ci=25, long=1000)
@given(file=video_files(), num_frames=st.one_of(st.integers(-2, 10), anything()))
def test_fuzz_video_files(fuzz_pipeline, figures, file, num_frames):
    suffix, content = file

    def call():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"clip{suffix}"
            path.write_bytes(content)
            frames = read_video(path, num_frames)
            fuzz_pipeline(frames, "Follow the star.", max_new_tokens=2)

    figures.run("video file", call, lambda: f"{suffix} {content[:40]!r} num_frames={num_frames!r}")


@fuzz_settings(ci=25, long=1000)
@given(frames=st.one_of(st.lists(st.one_of(st.just(GOOD), arrays(), pil_images(), st.none()), max_size=12),
                        arrays().filter(lambda a: a.ndim == 4)))
def test_fuzz_video_frames(fuzz_pipeline, figures, frames):
    figures.run("video frames", lambda: fuzz_pipeline(frames, "Follow the star.", max_new_tokens=2),
                lambda: repr(frames)[:200])


@fuzz_settings(ci=40, long=1500)
@given(prompt=st.one_of(texts(), st.lists(texts(), max_size=3), anything()),
       visual=st.sampled_from(["image", "none", "video"]))
def test_fuzz_prompts(fuzz_pipeline, figures, prompt, visual):
    pick = {"image": GOOD, "none": None, "video": [GOOD, GOOD]}[visual]
    visuals = [pick] * len(prompt) if isinstance(prompt, list) else pick

    def call():
        results = fuzz_pipeline(visuals, prompt, max_new_tokens=4)
        for result in results if isinstance(results, list) else [results]:
            assert isinstance(result.text, str) and isinstance(result.to_json(), str)

    figures.run("prompt", call, lambda: repr(prompt)[:200])


@fuzz_settings(ci=40, long=1500)
@given(options=st.dictionaries(st.one_of(st.sampled_from([*GENERATION_OPTIONS, "score_threshold"]),
                                         st.text(max_size=6)),
                               st.one_of(anything(), st.integers(1, 40), st.floats(0.01, 3.0)), max_size=4),
       prompt=st.sampled_from(["Describe it.", "Find all red stars.", "Segment the circle."]))
def test_fuzz_generation_options(fuzz_pipeline, figures, options, prompt):
    figures.run("generation", lambda: fuzz_pipeline(GOOD, prompt, **options), lambda: repr(options))


_TURN = st.one_of(st.tuples(st.sampled_from(["user", "assistant", "system", ""]), st.one_of(texts(), anything())),
                  st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool"]),
                                         "content": st.one_of(texts(), anything())}), anything())


@fuzz_settings(ci=40, long=1500)
@given(messages=st.one_of(st.lists(_TURN, max_size=5), anything()))
def test_fuzz_chat_messages(fuzz_pipeline, figures, messages):
    figures.run("chat", lambda: fuzz_pipeline.chat(GOOD, messages, max_new_tokens=2), lambda: repr(messages)[:200])
