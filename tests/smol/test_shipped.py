"""The shipped ``smol`` adapter: loads by name onto the packaged base, keeps SmolLM2's language, routes the tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from taskmllm.zoo import SHIPPED
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
    # the LLM's difference is low rank: see's and joint's LoRA (r16 each) merged, rank <= 32 per matrix (~20 MB),
    # beside the projector, queries, experts and tokenizer; SmolLM2 itself is 270 MB in bf16
    assert size <= 40 * 2**20, f"{size / 2**20:.1f} MB"
    assert not (SHIPPED["smol"] / "model.safetensors").exists()


#: factual questions and the words a right answer contains (any of them, case-insensitive)
FACTS = [("What is the capital of France?", ["Paris"]), ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
         ("What is the largest planet in our solar system?", ["Jupiter"]),
         ("What language is spoken in Spain?", ["Spanish"]), ("How many days are in a week?", ["seven", "7"]),
         ("What color is the sky on a clear day?", ["blue"]),
         ("What is the boiling point of water in degrees Celsius?", ["100"]),
         ("Who painted the Mona Lisa?", ["Leonardo", "Vinci"])]


def _answers(pipe, **generation) -> list:
    """The Results of the factual questions (greedy, 32 tokens); none calls an expert."""
    answers = [pipe(None, q, max_new_tokens=32, **generation) for q, _ in FACTS]
    for (q, _), a in zip(FACTS, answers):
        print(repr(q), "->", repr(a.raw_text))
        assert not a.calls, "a text-only question must not call an expert"
    return answers


def _known(answers: list) -> int:
    """How many answers name the right fact."""
    return sum(any(w.lower() in a.text.lower() for w in words) for a, (_, words) in zip(answers, FACTS))


@pytest.fixture(scope="module")
def float32_answers(pipe) -> list:
    """The shipped (float32) smol's answers to the factual questions, the reference of the tests below."""
    return _answers(pipe)


def test_text_only_questions_are_answered_as_well_as_by_the_base_llm(float32_answers):
    """The LLM's own abilities survive the LoRA stage: the shipped smol answers the factual questions the
    untouched SmolLM2-135M-Instruct (rebuilt from the packages) answers, give or take one greedy flip."""
    from taskmllm.zoo import build_smol
    from taskmllm.router.joint import JointModel
    from taskmllm.router.pipeline import Pipeline

    base = _known(_answers(Pipeline(JointModel.build(build_smol()).eval())))
    tuned = _known(float32_answers)
    print(f"base {base}/{len(FACTS)}, shipped smol {tuned}/{len(FACTS)}")
    assert base >= 6 and tuned >= base - 1


@pytest.mark.parametrize(("prompt", "task"), [("Please segment the {}.", "seg"), ("Detect all {}s.", "det")])
def test_shapesworld_task_is_routed_to_its_expert(pipe, prompt, task):
    from taskmllm.data.shapesworld import ShapesWorld, WorldConfig

    world = ShapesWorld(WorldConfig(image_size=256), seed=5)
    sample = world.image(0, "test")
    obj = sample.objects[-1]  # drawn last: nothing occludes it
    name = f"{obj.color} {obj.category}" if task == "seg" else obj.category
    result = pipe(sample.image, prompt.format(name), max_new_tokens=32, score_threshold=0.0)
    print(repr(result.raw_text))
    assert [c.task for c in result.calls] == [task]
    call = result.calls[0]
    h, w = sample.image.shape[:2]
    if task == "seg":  # the expert ran on the call (how well it segments is in the model card, not asserted here)
        assert call.mask.shape == (h, w)
    else:  # every slot of the expert that NMS keeps, scored and sorted, in pixels of the image
        det = pipe.model.experts["det"]
        assert 1 <= call.boxes.shape[0] <= det.num_queries and call.boxes.shape[1] == 4
        assert (np.diff(call.scores) <= 0).all()
        iou = box_iou(torch.as_tensor(call.boxes), torch.as_tensor(call.boxes)).fill_diagonal_(0)
        assert (iou <= det.options.nms_iou + 1e-6).all()  # no kept pair overlaps more than the option allows
        assert (call.boxes >= 0).all() and (call.boxes[:, [0, 2]] <= w).all() and (call.boxes[:, [1, 3]] <= h).all()
        assert ((call.scores > 0) & (call.scores < 1)).all()


def test_int8_smol_keeps_its_facts_and_its_routing(float32_answers):
    """The documented CPU choice (int8 LLM weights, bf16 activations) answers the factual questions float32 smol
    answers, give or take one greedy flip, and still routes a segmentation request to the seg expert."""
    from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
    from taskmllm.router.pipeline import Pipeline

    quant = Pipeline.from_pretrained("smol", dtype=torch.bfloat16, quantize="int8")
    assert _known(_answers(quant)) >= _known(float32_answers) - 1
    sample = ShapesWorld(WorldConfig(image_size=256), seed=5).image(0, "test")
    obj = sample.objects[-1]
    result = quant(sample.image, f"Please segment the {obj.color} {obj.category}.", max_new_tokens=32)
    assert [c.task for c in result.calls] == ["seg"] and result.calls[0].mask.shape == sample.image.shape[:2]


def test_bf16_compiled_smol_gives_float32_answers(float32_answers):
    """The documented CPU choice (bf16, ``compile=True``: the compiled step with its one-row products as inductor
    reductions, float32 decode attention) answers the factual questions as float32 smol's default decoder does
    (8 of 8 on the project's AVX-512 host; one greedy flip allowed for another CPU's vector width)."""
    from taskmllm.router.pipeline import Pipeline

    want = [a.text for a in float32_answers]
    fast = Pipeline.from_pretrained("smol", dtype=torch.bfloat16)
    got = [a.text for a in _answers(fast, compile=True)]
    assert fast.model.mllm.decode_steps._steps, "the compiled step ran"
    assert sum(g == w for g, w in zip(got, want)) >= len(FACTS) - 1, list(zip(got, want))


@pytest.mark.parametrize("name", ["vhr", "var", "zerotuning"])
def test_the_shipped_calibration_fits_the_shipped_weights(pipe, name):
    """Each intervention in the shipped ``interventions.json`` is read as calibrated and attaches to the shipped
    model (its layers and heads exist: an out-of-range one is a ConfigError at attach), answering an image question
    with the same expert routing as the plain model."""
    from taskmllm.data.shapesworld import ShapesWorld, WorldConfig

    assert pipe.intervention_source(name) == "calibrated"
    sample = ShapesWorld(WorldConfig(image_size=256), seed=5).image(0, "test")
    obj = sample.objects[-1]
    prompt = f"Is there a {obj.color} {obj.category} in the image?"
    plain = pipe(sample.image, prompt, max_new_tokens=8)
    hooked = pipe(sample.image, prompt, max_new_tokens=8, intervention=name)
    assert hooked.text and [c.task for c in hooked.calls] == [c.task for c in plain.calls]
