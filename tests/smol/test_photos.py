"""The shipped ``smol`` on the bundled photos (issue #27): a yes/no question about what a photo shows is answered in
words, with no task token, and a description does not loop (no 4-gram said three times)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taskmllm.zoo import SHIPPED
from tests.smol.conftest import require_smol_packages

require_smol_packages()
if not (SHIPPED["smol"] / "adapter.json").is_file():
    pytest.skip("the smol adapter is not in this install (make train-smol)", allow_module_level=True)

#: bundled photo -> (what it shows, what it does not)
PHOTOS = {"photo-cat.jpg": ("cat", "dog"), "photo-astronaut.jpg": ("person", "horse"),
          "photo-coffee.jpg": ("cup", "bicycle")}


def repeated_ngram(text: str, n: int = 4, times: int = 3) -> tuple[str, ...] | None:
    """The first word ``n``-gram that occurs ``times`` times or more in ``text`` (case-insensitive), else None."""
    words = text.lower().split()
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return gram
    return None


def test_repeated_ngram_by_hand():
    assert repeated_ngram("a b c d a b c d a b c d") == ("a", "b", "c", "d")
    assert repeated_ngram("a b c d a b c d") is None
    assert repeated_ngram("A large circle, a large circle, a large circle, a large circle", 3) == ("a", "large", "circle,")


@pytest.fixture(scope="module")
def pipe():
    from taskmllm.router.pipeline import Pipeline

    return Pipeline.from_pretrained("smol")


def _photo(name: str) -> np.ndarray:
    from taskmllm.demo.examples import example_file

    return np.asarray(Image.open(example_file(name)).convert("RGB"))


def test_yes_no_questions_about_photos_call_no_expert(pipe):
    asked = []
    for name, objects in PHOTOS.items():
        for obj in objects:
            result = pipe(_photo(name), f"Is there a {obj} in the image?", max_new_tokens=16)
            asked.append((name, obj, result.raw_text))
    print(asked)
    assert all("<" not in raw for _, _, raw in asked), asked


def test_photo_descriptions_do_not_loop(pipe):
    captions = {name: pipe(_photo(name), "Describe the image.", max_new_tokens=64).text for name in PHOTOS}
    print(captions)
    assert all(repeated_ngram(text) is None for text in captions.values()), captions
