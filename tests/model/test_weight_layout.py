"""Weight layout tuning: the same function with weights in another memory order, the faster order per shape kept,
saving still writes the stored (row-major) tensors, and Pipeline's option."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from taskmllm.errors import ConfigError
from taskmllm.model.weight_layout import layout_of, tune_linear_layout
from taskmllm.router.pipeline import Pipeline


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 256))


def test_layout_of_names_the_memory_order():
    w = torch.randn(8, 4)
    assert layout_of(w) == "row"
    assert layout_of(w.t().contiguous().t()) == "column"
    assert layout_of(torch.randn(5, 1)) == "row", "a vector-like matrix is contiguous both ways: row"


def test_tuning_keeps_the_function_and_reports_each_shape(tmp_path):
    model = mlp()
    x = torch.randn(3, 64)
    want = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tune_linear_layout(model, rows=1, repeats=2)
    assert set(report) == {"256x64 float32", "64x256 float32"}, "one entry per (out, in, dtype)"
    for group in report.values():
        assert group["chosen"] in ("row", "column") and group["row"] > 0 and group["column"] > 0
        assert group[group["chosen"]] == min(group["row"], group["column"])
    for layer in (model[0], model[4]):  # the same shape gets the same layout
        assert layout_of(layer.weight.data) == report["256x64 float32"]["chosen"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "values unchanged"
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    save_model(model, str(tmp_path / "m.safetensors"))
    saved = load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(saved[k], before[k]) and saved[k].is_contiguous() for k in before)


def test_every_weight_ends_in_the_chosen_layout_whatever_it_started_in():
    model = mlp()
    for layer in (model[0], model[2], model[4]):  # start column-major: a 'row' choice must convert back
        layer.weight.data = layer.weight.data.t().contiguous().t()
    report = tune_linear_layout(model, repeats=1)
    assert layout_of(model[0].weight.data) == layout_of(model[4].weight.data) == report["256x64 float32"]["chosen"]
    assert layout_of(model[2].weight.data) == report["64x256 float32"]["chosen"]


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="rows >= 1"):
        tune_linear_layout(mlp(), rows=0)
    with pytest.raises(ConfigError, match="weight_layout"):
        Pipeline.from_pretrained("tiny", weight_layout="fast")


def test_pipeline_with_tuned_layout_answers_as_stored():
    stored, tuned = Pipeline.from_pretrained("tiny"), Pipeline.from_pretrained("tiny", weight_layout="tuned")
    import numpy as np

    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    image[16:48, 16:48] = (220, 30, 30)
    for question in ("What color is the shape?", "Is there a square in the image?"):
        assert tuned(image, question).text == stored(image, question).text
