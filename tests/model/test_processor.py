"""Processor: image formats are converted; bad input raises a typed error that names the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from taskmllm.errors import ImageError, InputError, PromptTooLongError, VideoError
from taskmllm.model.processor import load_image


def test_accepts_path_pil_numpy_and_converts_modes(tmp_path, rgb_image):
    path = tmp_path / "x.png"
    Image.fromarray(rgb_image).save(path)
    ref = np.asarray(load_image(rgb_image))
    assert np.array_equal(np.asarray(load_image(path)), ref)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(rgb_image))), ref)
    gray = load_image(rgb_image[..., 0])
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[..., 1], rgb_image[..., 0])
    rgba = np.dstack([rgb_image, np.zeros(rgb_image.shape[:2], np.uint8)])  # fully transparent -> white
    assert (np.asarray(load_image(rgba)) == 255).all()
    sixteen = (rgb_image[..., 0].astype(np.uint16) * 257)
    assert np.array_equal(np.asarray(load_image(sixteen))[..., 0], rgb_image[..., 0])
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    assert np.abs(np.asarray(load_image(tmp_path / "16.png"))[..., 0].astype(int) - rgb_image[..., 0]).max() <= 1
    assert np.asarray(load_image(np.ones((4, 4, 3), np.float32))).max() == 255


def test_corrupt_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="cannot decode image file .*bad.png"):
        load_image(tmp_path / "bad.png")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")


def test_zero_size_image():
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))


def test_zero_video_frames(tiny_model):
    with pytest.raises(VideoError, match="zero frames"):
        tiny_model.processor("What happens?", [], answers=None)


def test_prompt_longer_than_context(tiny_model):
    with pytest.raises(PromptTooLongError, match="context holds 512"):
        tiny_model.processor("red circle " * 400)


def test_placeholder_without_image(tiny_model):
    with pytest.raises(InputError, match="no image"):
        tiny_model.processor("<image> what is it?")


def test_batch_layout(tiny_model, rgb_image):
    proc = tiny_model.processor
    frames = [rgb_image] * 3
    batch = proc(["one", "two words here", "video"], [rgb_image, None, frames],
                 answers=["<ref>it</ref><seg>", "no", "<ref>x</ref><track>"])
    assert batch.pixel_values.shape == (4, 3, 48, 48)
    assert batch.frames_per_sample == [1, 0, 3]
    n_visual = (batch.input_ids == tiny_model.image_id).sum(-1).tolist()
    assert n_visual == [9, 0, 27]
    assert (batch.attention_mask[:, -1] == 1).all()  # left padding
    queries = batch.input_ids == tiny_model.query_id
    assert queries.sum().item() == 2 and (batch.labels[queries] == -100).all()
    assert (batch.labels[batch.input_ids == tiny_model.image_id] == -100).all()
    eos = tiny_model.tokenizer.eos_token_id
    assert (batch.labels[:, -1] == eos).all()
    assert torch.equal(batch.pixel_values[1], batch.pixel_values[2])


def test_conversations_supervise_every_answer(tiny_model, rgb_image):
    """A one-turn conversation is exactly the single-turn batch; a multi-turn one supervises each answer + EOS
    (queries excluded), expands the image once, and its text is the chat template's ``prompt(q, history)``."""
    proc, tok = tiny_model.processor, tiny_model.tokenizer
    turns = [("What is it?", "<ref>it</ref><seg>."), ("And now?", "No.")]
    single = proc(["What is it?"], [rgb_image], answers=["<ref>it</ref><seg>."], padding_side="right")
    one = proc.conversations([turns[:1]], [rgb_image])
    assert torch.equal(one.input_ids, single.input_ids) and torch.equal(one.labels, single.labels)
    batch = proc.conversations([turns, [("hi", "hello")]], [rgb_image, None])
    ids, labels = batch.input_ids[0], batch.labels[0]
    assert (ids == tiny_model.image_id).sum() == 9 and batch.frames_per_sample == [1, 0]
    eos = tok.eos_token_id
    want = []
    for _, answer in turns:
        want += [i for i in proc.insert_queries(tok.encode(proc.chat.answer_sep + answer, add_special_tokens=False))
                 if i != tiny_model.query_id] + [eos]
    assert labels[labels != -100].tolist() == want
    assert (ids == tiny_model.query_id).sum() == 1 and (labels[ids == tiny_model.query_id] == -100).all()
    text = tok.decode(ids[batch.attention_mask[0] == 1].tolist())
    assert re.sub("(<image>)+", "<image>", text) == (
        "<s>USER: What is it?\n<image> ASSISTANT: <ref>it</ref><seg><query>.</s>USER: And now? ASSISTANT: No.</s>")
    with pytest.raises(InputError, match="at least one"):
        proc.conversations([[]], [rgb_image])
    with pytest.raises(InputError, match="placeholder but no image"):
        proc.conversations([[("Look <image>", "ok")]], [None])
    with pytest.raises(InputError, match="2 conversations but 1 images"):
        proc.conversations([turns, turns], [rgb_image])
