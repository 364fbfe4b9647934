"""The shipped ``smol`` adapter: loads by name onto the packaged base, keeps SmolLM2's language, does the tasks."""

from __future__ import annotations

import pytest

from taskmllm.recipes import SHIPPED
from tests.smol.conftest import require_smol_packages

require_smol_packages()
if not (SHIPPED["smol"] / "adapter.json").is_file():
    pytest.skip("the smol adapter is not in this install (make train-smol)", allow_module_level=True)


@pytest.fixture(scope="module")
def pipe():
    from taskmllm.router.pipeline import Pipeline

    return Pipeline.from_pretrained("smol")


def test_adapter_is_small_and_holds_no_base_weights():
    size = sum(f.stat().st_size for f in SHIPPED["smol"].rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"
    assert not (SHIPPED["smol"] / "model.safetensors").exists()


def test_text_only_question_is_answered_fluently(pipe):
    """The LLM's own abilities survive the LoRA stage: SmolLM2-135M-Instruct's answer, without protocol tokens."""
    result = pipe(None, "What is the capital of France?", max_new_tokens=24)
    print(repr(result.raw_text))
    assert "Paris" in result.text and not result.calls


@pytest.mark.xfail(strict=True, reason="issue #9: the shipped smol ends task answers before the protocol token "
                   "('Sure, ' + <|im_end|>); its token rows need an assign stage")
@pytest.mark.parametrize(("prompt", "task"), [("Please segment the {}.", "seg"), ("Detect all {}s.", "det")])
def test_shapesworld_task_is_routed_to_its_expert(pipe, prompt, task):
    from taskmllm.data.shapesworld import ShapesWorld, WorldConfig

    world = ShapesWorld(WorldConfig(image_size=256), seed=5)
    sample = world.image(0, "test")
    obj = sample.objects[-1]  # drawn last: nothing occludes it
    name = f"{obj.color} {obj.category}" if task == "seg" else obj.category
    result = pipe(sample.image, prompt.format(name), max_new_tokens=32)
    print(repr(result.raw_text))
    assert [c.task for c in result.calls] == [task]
    call = result.calls[0]
    if task == "seg":
        assert call.mask.shape == sample.image.shape[:2] and call.mask.any()
    else:
        assert len(call.boxes) >= 1
