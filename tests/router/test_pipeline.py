"""JointModel (joint forward, gradients, checkpoint) and Pipeline end to end on a tiny model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from taskmllm.errors import CheckpointError, ConfigError, InputError, RegistryError, UnknownTaskError
from taskmllm.experts.base import TaskTarget, VisionFeatures
from taskmllm.model.mllm import TaskMLLM
from taskmllm.router.dispatch import run_calls
from taskmllm.router.joint import JointModel
from taskmllm.router.pipeline import Pipeline
from tests.conftest import tiny_config


@pytest.fixture()
def joint(tokenizer):
    torch.manual_seed(0)
    return JointModel.build(TaskMLLM(tiny_config(tokenizer), tokenizer))


def _teach_answer(joint, prompt, visual, answer: str, steps: int = 40) -> None:
    """Overfit the MLLM to answer ``prompt`` about ``visual`` with ``answer`` (AdamW, lr 3e-3)."""
    batch = joint.mllm.processor([prompt], [visual], answers=[answer])
    opt = torch.optim.AdamW(joint.mllm.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = joint.mllm(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sample_batch(joint, rgb_image):
    mask = np.zeros((40, 56), bool)
    mask[5:20, 10:30] = True
    video = [rgb_image] * 3
    prompts = ["Segment the green star.", "Find all hexagons.", "Track the yellow heart.", "What color?"]
    answers = ["Sure, <ref>the green star</ref><seg>.", "<ref>hexagons</ref><det>", "<ref>the heart</ref><track>",
               "Red."]
    targets = [[TaskTarget("seg", mask=mask)],
               [TaskTarget("det", boxes=np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.9]], np.float32))],
               [TaskTarget("track", boxes=np.tile(np.array([[0.2, 0.2, 0.6, 0.6]], np.float32), (3, 1)),
                           visible=np.array([True, True, False]))],
               []]
    batch = joint.mllm.processor(prompts, [rgb_image, rgb_image, video, None], answers=answers)
    return batch, targets


@pytest.mark.parametrize("task", ["seg", "det", "track"])
def test_each_expert_loss_reaches_queries_projector_and_llm(joint, rgb_image, task):
    batch, targets = _sample_batch(joint, rgb_image)
    out = joint(batch, targets)
    assert out.lm_loss.item() > 0 and {c.task for c in out.calls} == {"seg", "det", "track"}
    expert_loss = sum(v for k, v in out.expert_losses.items() if k.startswith(task))
    expert_loss.backward()
    mllm = joint.mllm
    for name, params in {"queries": [mllm.queries[task]], "projector": list(mllm.projector.parameters()),
                         "llm": list(mllm.llm.parameters())}.items():
        grad = sum(p.grad.abs().sum().item() for p in params if p.grad is not None)
        assert grad > 0, f"{task} loss gives no gradient in {name}"


def test_checkpoint_round_trip_and_typed_errors(joint, tmp_path, rgb_image):
    joint.save_pretrained(tmp_path / "ck")
    loaded = JointModel.from_pretrained(tmp_path / "ck")
    batch, targets = _sample_batch(joint, rgb_image)
    joint.eval()
    with torch.no_grad():
        a, b = joint(batch, targets), loaded(batch, targets)
    assert torch.equal(a.loss, b.loss)
    (tmp_path / "ck" / "experts" / "det" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="det.*model.safetensors"):
        JointModel.from_pretrained(tmp_path / "ck")


def test_localizing_box_heads_round_trip(tokenizer, tmp_path, rgb_image):
    """det and track built with ``box_head: localizing`` train a heat term and reload with the same head."""
    torch.manual_seed(0)
    options = {"det": {"box_head": "localizing"}, "track": {"box_head": "localizing"}}
    joint = JointModel.build(TaskMLLM(tiny_config(tokenizer), tokenizer), options=options)
    batch, targets = _sample_batch(joint, rgb_image)
    joint.eval()
    with torch.no_grad():
        a = joint(batch, targets)
    assert {"det_heat", "track_heat"} <= set(a.expert_losses)
    assert all(torch.isfinite(v) for v in a.expert_losses.values())
    joint.save_pretrained(tmp_path / "ck")
    loaded = JointModel.from_pretrained(tmp_path / "ck")
    for name in ("det", "track"):
        assert loaded.experts[name].options.box_head == "localizing"
        assert type(loaded.experts[name].box_head) is type(joint.experts[name].box_head)
    with torch.no_grad():
        b = loaded(batch, targets)
    assert torch.equal(a.loss, b.loss) and a.expert_losses.keys() == b.expert_losses.keys()


def test_set_expert_options_reweights_losses_and_keeps_weights(joint, rgb_image):
    batch, targets = _sample_batch(joint, rgb_image)
    joint.eval()
    with torch.no_grad():
        before = joint(batch, targets).expert_losses
        weights = {k: v.clone() for k, v in joint.experts["seg"].state_dict().items()}
        joint.set_expert_options({"seg": {"dice_weight": 2.0, "bce_weight": 0.5}, "det": {"obj_weight": 3.0}})
        after = joint(batch, targets).expert_losses
    # defaults: LISA's 2 BCE + 0.5 Dice, DETR's objectness weight 1: each term scales by the new / old weight
    assert torch.allclose(after["seg_dice"], before["seg_dice"] * 4)
    assert torch.allclose(after["seg_bce"], before["seg_bce"] / 4)
    assert torch.allclose(after["det_obj"], before["det_obj"] * 3) and torch.equal(after["det_l1"], before["det_l1"])
    assert all(torch.equal(v, weights[k]) for k, v in joint.experts["seg"].state_dict().items())
    assert joint.experts["seg"].spec.options == {"dice_weight": 2.0, "bce_weight": 0.5}
    with pytest.raises(ConfigError, match="change its parameters"):
        joint.set_expert_options({"det": {"box_head": "localizing"}})
    with pytest.raises(ConfigError, match="the model has experts"):
        joint.set_expert_options({"sgm": {"dice_weight": 2.0}})


def test_task_without_expert_and_query_mismatch(joint):
    experts = dict(joint.experts)
    with pytest.raises(UnknownTaskError, match="<track>"):
        JointModel(joint.mllm, {k: v for k, v in experts.items() if k != "track"})
    experts["det"].num_queries = 2
    with pytest.raises(RegistryError, match="expects 2 queries but the model inserts 4"):
        JointModel(joint.mllm, experts)


def test_pipeline_end_to_end(overfit, rgb_image):
    """The overfit model emits <seg> / <det>; the pipeline returns a mask of the image's size and an overlay."""
    model, prompts, images, _ = overfit
    pipe = Pipeline(JointModel.build(model))
    result = pipe(images[0], prompts[0], max_new_tokens=24)
    assert result.text == "Sure, the green star."
    assert [c.task for c in result.calls] == ["seg"] and result.calls[0].phrase == "the green star"
    assert result.calls[0].mask.shape == images[0].shape[:2] and result.calls[0].mask.dtype == bool
    overlay = result.draw()
    assert overlay.size == (images[0].shape[1], images[0].shape[0])
    data = result.to_dict()
    assert data["calls"][0]["mask_rle"]["size"] == list(images[0].shape[:2])


def test_pipeline_video_tracking_box_per_frame(tokenizer, rgb_image):
    """A model overfit to answer with <track> returns one box per frame of the video."""
    torch.manual_seed(0)
    joint = JointModel.build(TaskMLLM(tiny_config(tokenizer), tokenizer))
    video = [rgb_image, rgb_image[::-1].copy(), rgb_image[:, ::-1].copy()]
    prompt, answer = "Track the object in <box>100,100,500,500</box>.", "<ref>the object</ref><track>."
    _teach_answer(joint, prompt, video, answer)
    result = Pipeline(joint)(video, prompt, max_new_tokens=16)
    assert [c.task for c in result.calls] == ["track"]
    assert result.calls[0].boxes.shape == (3, 4)
    assert len(result.draw()) == 3


def test_public_api_load_model(joint, tmp_path):
    import taskmllm

    joint.save_pretrained(tmp_path / "joint")
    joint.mllm.save_pretrained(tmp_path / "mllm")
    assert isinstance(taskmllm.load_model(tmp_path / "joint"), taskmllm.JointModel)
    assert isinstance(taskmllm.load_model(tmp_path / "mllm"), taskmllm.TaskMLLM)
    assert isinstance(taskmllm.Pipeline(taskmllm.load_model(tmp_path / "joint")), taskmllm.Pipeline)
    with pytest.raises(AttributeError):
        taskmllm.NotAThing  # noqa: B018


@pytest.mark.parametrize("box", ["<box>10,20,300,1000</box>", "<box>10,20,300</box>"])
def test_prompt_box_outside_range_is_a_typed_error(joint, rgb_image, box):
    from taskmllm.errors import BoxFormatError

    with pytest.raises(BoxFormatError, match="box"):
        Pipeline(joint)([rgb_image] * 2, f"Track the object in {box}.")


def test_score_threshold_keeps_every_detection_slot(tokenizer, rgb_image):
    """``score_threshold=0`` (what evaluation passes) returns all K slots ranked by score; the default keeps
    exactly the slots scoring above the detection expert's 0.5."""
    torch.manual_seed(0)
    joint = JointModel.build(TaskMLLM(tiny_config(tokenizer), tokenizer))
    prompt = "Find all hexagons."
    _teach_answer(joint, prompt, rgb_image, "<ref>hexagons</ref><det>.")
    pipe = Pipeline(joint)
    every = pipe(rgb_image, prompt, max_new_tokens=16, score_threshold=0.0).calls
    kept = pipe(rgb_image, prompt, max_new_tokens=16).calls
    assert [c.task for c in every] == [c.task for c in kept] == ["det"]
    k = joint.mllm.queries["det"].shape[0]
    assert every[0].boxes.shape == (k, 4) and np.all(np.diff(every[0].scores) <= 0)
    n_above = int((every[0].scores > 0.5).sum())
    assert len(kept[0].boxes) == n_above
    np.testing.assert_allclose(kept[0].boxes, every[0].boxes[:n_above])


def _run(joint, calls, inputs):
    """The outputs of the one expert run of ``calls`` (all of one task and frame count) through the dispatch."""
    runs = run_calls(joint.experts, calls, inputs)
    assert len(runs) == 1
    return runs[0].outputs


def test_image_expert_called_about_a_video_reads_its_first_frame(joint, rgb_image):
    """A model may emit <det> for a video question (the smol eval met one): the call runs on frame 0."""
    other = rgb_image[::-1].copy()
    boxes = np.array([[0.1, 0.1, 0.4, 0.5]], np.float32)
    batch = joint.mllm.processor(["Find all hexagons."], [[rgb_image, other, other]],
                                 answers=["<ref>hexagons</ref><det>"])
    joint.eval()
    with torch.no_grad():
        assert set(joint(batch, [[TaskTarget("det", boxes=boxes)]]).expert_losses) >= {"det_l1", "det_obj"}
        mllm_out = joint.mllm(batch, "none")
        calls = joint.router.route(batch.input_ids, mllm_out.hidden_states, batch.attention_mask)
        assert [c.task for c in calls] == ["det"]
        video_out = _run(joint, calls, mllm_out.expert_inputs)
        first = mllm_out.expert_inputs.features[:1][None]  # (1, 1, N, C): frame 0 of the one video
        vf = VisionFeatures(first, joint.mllm.vision.grid, joint.mllm.config.vision.image_size)
        expected = joint.experts["det"](calls[0].query_states[None], vf)
    torch.testing.assert_close(video_out.boxes, expected.boxes)
    torch.testing.assert_close(video_out.logits, expected.logits)


def test_experts_with_llm_context_read_the_prompts_visual_token_states(joint, rgb_image):
    """``llm_context``: the teacher-forced forward hands each call the LLM's last-layer states at its visual tokens
    (the oracle: the same rows cut from ``TaskMLLM.forward``'s hidden states by hand), and generation hands the
    experts the same states from its prefill."""
    joint.set_expert_options({"det": {"llm_context": True}})
    assert joint.experts["det"].feature_proj.context is not None  # a new parameter, added by the option
    batch, _ = _sample_batch(joint, rgb_image)
    joint.eval()
    with torch.no_grad():
        out = joint.mllm(batch, "none")
        calls = [c for c in joint.router.route(batch.input_ids, out.hidden_states, batch.attention_mask)
                 if c.task == "det"]
        states = joint.mllm.visual_states(batch.input_ids, out.hidden_states)
        rows = out.hidden_states[batch.input_ids == joint.mllm.image_id]  # every visual token, in order
        assert states.shape[0] == sum(batch.frames_per_sample) and torch.equal(states.flatten(0, 1), rows)
        assert torch.equal(out.expert_inputs.visual_states, states)
        got = _run(joint, calls, out.expert_inputs)
        feats = out.expert_inputs.features
        first = torch.stack([feats[sum(batch.frames_per_sample[:c.sample])] for c in calls])[:, None]
        context = torch.stack([states[sum(batch.frames_per_sample[:c.sample])] for c in calls])[:, None]
        grid = joint.mllm.projector.pooled_grid(joint.mllm.vision.grid)
        vf = VisionFeatures(first, joint.mllm.vision.grid, joint.mllm.config.vision.image_size, context, grid)
        want = joint.experts["det"](torch.stack([c.query_states for c in calls]), vf)
        torch.testing.assert_close(got.boxes, want.boxes)
        with pytest.raises(InputError, match="llm_context"):
            _run(joint, calls, replace(out.expert_inputs, visual_states=None))
        prompt = joint.mllm.processor(["Find all hexagons."], [rgb_image])
        gen = joint.mllm.generate(prompt, max_new_tokens=2)
        teacher = joint.mllm(prompt, "none")
        torch.testing.assert_close(gen.expert_inputs.visual_states,
                                   joint.mllm.visual_states(prompt.input_ids, teacher.hidden_states), atol=1e-5, rtol=1e-5)


def test_detach_context_cuts_only_the_llms_gradient_through_the_visual_states(joint, rgb_image):
    """``detach_context``: the loss and the expert's own gradient are unchanged; the LLM's gradient is the one
    of the query path alone (oracle: the expert run by hand on the visual-token states as constants), and it
    differs from the undetached one (the context path carried gradient)."""
    joint.set_expert_options({"seg": {"llm_context": True}})
    batch, targets = _sample_batch(joint, rgb_image)
    joint.eval()  # no dropout: the three passes below must see the same forward

    def backward(run) -> tuple[float, dict[str, torch.Tensor]]:
        joint.zero_grad()
        loss = run()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in joint.named_parameters() if p.grad is not None}

    def joint_loss(detach):
        out = joint(batch, targets, tasks=["seg"], logits="none", detach_context=detach)
        return sum(v for k, v in out.expert_losses.items() if k.startswith("seg"))

    def by_hand():
        out = joint.mllm(batch, "none")
        calls = [c for c in joint.router.route(batch.input_ids, out.hidden_states, batch.attention_mask)
                 if c.task == "seg"]
        states = joint.mllm.visual_states(batch.input_ids, out.hidden_states).detach()
        pred = _run(joint, calls, replace(out.expert_inputs, visual_states=states))
        return sum(joint.experts["seg"].loss(pred, [targets[c.sample][0] for c in calls]).values())

    full_loss, full = backward(lambda: joint_loss(()))
    cut_loss, cut = backward(lambda: joint_loss(["seg"]))
    want_loss, want = backward(by_hand)
    assert cut_loss == pytest.approx(full_loss, abs=1e-6) and cut_loss == pytest.approx(want_loss, abs=1e-6)
    llm = [n for n in cut if n.startswith("mllm.llm.")]
    assert llm and set(cut) == set(want)
    for name in cut:
        torch.testing.assert_close(cut[name], want[name], atol=1e-6, rtol=1e-5)
        if name.startswith("experts.seg."):
            torch.testing.assert_close(cut[name], full[name], atol=1e-6, rtol=1e-5)
    assert max((cut[n] - full[n]).abs().max().item() for n in llm) > 1e-4


def test_seg_detail_reads_the_calls_own_pixels(joint, rgb_image):
    """``detail``: the dispatch hands the seg expert the frame its call is about (oracle: that frame's row of the
    batch's ``pixel_values``, cut by hand), and the joint loss trains the new stem."""
    joint.set_expert_options({"seg": {"detail": True}})
    torch.nn.init.normal_(joint.experts["seg"].detail.net[-1].weight, std=0.1)
    batch, targets = _sample_batch(joint, rgb_image)
    joint.eval()
    with torch.no_grad():
        out = joint.mllm(batch, "none")
        calls = [c for c in joint.router.route(batch.input_ids, out.hidden_states, batch.attention_mask)
                 if c.task == "seg"]
        got = _run(joint, calls, out.expert_inputs)
        starts = [sum(batch.frames_per_sample[:c.sample]) for c in calls]
        feats = out.expert_inputs.features
        vf = VisionFeatures(torch.stack([feats[s] for s in starts])[:, None], joint.mllm.vision.grid,
                            joint.mllm.config.vision.image_size,
                            pixels=torch.stack([batch.pixel_values[s] for s in starts])[:, None])
        want = joint.experts["seg"](torch.stack([c.query_states for c in calls]), vf)
        torch.testing.assert_close(got.mask_logits, want.mask_logits)
    joint.train()
    joint(batch, targets).loss.backward()
    assert joint.experts["seg"].detail.net[0].weight.grad.abs().sum() > 0
