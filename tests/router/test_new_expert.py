"""Tutorial: a fourth expert, ``<point>``, added from one file — this one — without touching the package.

The steps (README, "Adding an expert"):

1. Write the expert: an :class:`~taskmllm.experts.base.Expert` subclass with ``name``, ``options_cls``,
   ``forward`` / ``loss`` / ``postprocess``, and a result type (an ``ExpertResult``) that draws and serializes
   itself.
2. Register it: ``register_expert("point", PointExpert)``. A model built afterwards gets the task token
   ``<point>`` (one new id in its tokenizer) and K learnable queries for it; the router and the dispatch serve it
   like the built-in experts.
3. Give it data: samples whose answers hold ``<point>`` and whose ``targets`` hold one ``TaskTarget("point", ...)``
   per ``<point>``, from any source kind (here a ShapesWorld-backed one registered beside the built-in kinds).
4. Train with a stage YAML (``taskmllm train``), then use it through ``Pipeline``: the model emits ``<point>``,
   the call is routed to the expert, and ``Result.draw()`` / ``Result.to_json()`` show its output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taskmllm.data.dataset import SourceSpec
from taskmllm.data.sample import Sample
from taskmllm.data.shapesworld import ShapesWorld, WorldConfig
from taskmllm.data.sources import SOURCE_KINDS
from taskmllm.experts import EXPERTS, register_expert
from taskmllm.experts.base import (DecoderOptions, Expert, ExpertPrompt, ExpertResult, TaskTarget, VisionFeatures,
                                   as_tensor)
from taskmllm.experts.canvas import Canvas, Color
from taskmllm.experts.common import FeatureProjection, QueryProjection, cell_centers


# ------------------------------------------------------------------------------------- 1. the expert
@dataclass
class PointOutput:
    """``points (M, 2)`` normalized x, y; ``heat (M, h*w)`` patch logits."""

    points: torch.Tensor
    heat: torch.Tensor


@dataclass
class PointResult(ExpertResult):
    """``point (2,)`` pixel x, y at the original size."""

    point: np.ndarray

    def draw(self, canvas: Canvas, frame: Optional[int], label: str, color: Color, threshold: float) -> None:
        if frame is None:
            x, y = (float(v) for v in self.point)
            canvas.box((x - 3, y - 3, x + 3, y + 3), label, color)

    def to_dict(self) -> dict[str, Any]:
        return {"point": np.round(self.point, 2).tolist()}


class PointExpert(Expert):
    """``<point>``: the center of what the query names, as the expected patch center under a heatmap."""

    name = "point"
    default_num_queries = 1
    options_cls = DecoderOptions

    def __init__(self, spec) -> None:
        super().__init__(spec)
        d = self.options.dim
        self.query_proj = QueryProjection(spec.hidden_size, d)
        self.feature_proj = FeatureProjection(spec.vision_dim, d)

    def forward(self, query_states: torch.Tensor, features: VisionFeatures,
                prompts: Optional[Sequence[ExpertPrompt]] = None) -> PointOutput:
        self.check_inputs(query_states, features, prompts, single_frame=True)
        q = self.query_proj(query_states[:, 0])  # (M, D)
        patches = self.feature_proj(features.features[:, 0])  # (M, N, D)
        heat = (patches @ q[..., None])[..., 0] / q.shape[-1] ** 0.5  # (M, N)
        centers = cell_centers(features.grid, heat.device, heat.dtype)  # (N, 2)
        return PointOutput(heat.softmax(-1) @ centers, heat)

    def loss(self, outputs: PointOutput, targets: Sequence[TaskTarget]) -> dict[str, torch.Tensor]:
        self.check_targets(targets, outputs.points.shape[0])
        boxes = torch.stack([as_tensor(t.boxes, torch.float32, outputs.points.device)[0] for t in targets])
        want = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2) box centers
        return {"point_l1": F.l1_loss(outputs.points, want)}

    def postprocess(self, outputs: PointOutput, sizes: Sequence[tuple[int, int]],
                    score_threshold: Optional[float] = None) -> list[PointResult]:
        scale = [np.array([w, h], np.float32) for h, w in sizes]
        return [PointResult(p.detach().cpu().numpy() * s) for p, s in zip(outputs.points, scale)]


# ------------------------------------------------------------------------------------------- 3. data
class PointSamples:
    """'Point at the <object>.' about ShapesWorld scenes with one object; the target is the object's box."""

    def __init__(self, world: ShapesWorld, length: int) -> None:
        self.world, self.length = world, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        scene = self.world.image(index % 2)  # two scenes, repeated: small enough to learn in a few steps
        obj = scene.objects[0]
        h, w = scene.hw
        phrase = f"the {obj.name}"
        box = (np.asarray(obj.box, np.float32) / np.array([w, h, w, h], np.float32))[None]
        turns = [(f"Point at {phrase}.\n<image>", f"<ref>{phrase}</ref><point>.")]
        return scene.with_turns("point", turns, [TaskTarget("point", phrase, boxes=box)], "point")


@dataclass
class PointSpec(SourceSpec):
    image_size: int = 48

    def build(self, length: int, seed: int) -> PointSamples:
        world = ShapesWorld(WorldConfig(image_size=self.image_size, max_objects=1, use_photos=False), seed=seed)
        return PointSamples(world, length)


# --------------------------------------------------------------------------------------- 2. + 4.
@pytest.fixture()
def point_expert(monkeypatch):
    register_expert("point", PointExpert)  # the one registry line
    monkeypatch.setitem(SOURCE_KINDS, "points", PointSpec)
    yield
    EXPERTS.pop("point")


def test_a_new_expert_from_one_file_trains_routes_draws_and_serializes(point_expert, tmp_path):
    from taskmllm.router.joint import JointModel
    from taskmllm.router.pipeline import Pipeline
    from taskmllm.training.config import load_config
    from taskmllm.training.train import train
    from tests.training.helpers import TINY

    stage = tmp_path / "point.yaml"
    stage.write_text("model: {init: tiny}\n"
                     "stage: {name: point, trainable: {llm: full, projector: full, queries: full, experts: full}}\n"
                     "data: {sources: {pts: {kind: points}}, length: 64, batch_size: 2}\n"
                     "optim: {lr: 3.0e-3, warmup_steps: 1}\n"
                     "max_steps: 60\n")
    small = [o for o in TINY if not o.startswith("--data.sources.shapes")]  # the tests' 1-block, 64-wide model
    cfg = load_config(stage, small + [f"--out_dir={tmp_path / 'run'}", "--save_every=60"])
    final = train(cfg)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["point_l1"] < rows[0]["point_l1"]  # the expert's loss is logged and falls
    joint = JointModel.from_pretrained(final)
    tok = joint.mllm.tokenizer
    assert len(tok.encode("<point>", add_special_tokens=False)) == 1  # a task token of its own
    assert tok.convert_tokens_to_ids("<point>") not in {tok.unk_token_id, None}
    assert "point" in joint.experts and joint.mllm.queries["point"].shape[0] == 1

    sample = PointSamples(ShapesWorld(WorldConfig(image_size=48, max_objects=1, use_photos=False), seed=0), 2)[0]
    result = Pipeline(joint)(sample.image, sample.turns[0][0].replace("\n<image>", ""), max_new_tokens=16)
    assert "<point>" in result.raw_text, result.raw_text  # emitted by generation
    call = result.calls[0]
    assert call.task == "point" and isinstance(call.output, PointResult)  # routed to the expert
    assert call.phrase == sample.turns[0][1].split("</ref>")[0].removeprefix("<ref>")
    x, y = call.output.point
    assert 0 <= x <= 48 and 0 <= y <= 48
    drawn = np.asarray(result.draw())  # drawn by the expert's result ...
    assert (drawn != np.asarray(result.image)).any()
    data = json.loads(result.to_json())  # ... and serialized by it
    assert data["calls"][0]["task"] == "point" and len(data["calls"][0]["point"]) == 2
    assert call.mask is None and call.boxes is None  # fields of other experts' results are simply absent
