"""``taskmllm eval`` end to end on a randomly initialised tiny checkpoint (CPU): JSON, markdown table, PNG plots."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from taskmllm.cli import main
from taskmllm.errors import ConfigError
from taskmllm.eval.benchmarks import make_intervention
from taskmllm.eval.suites import HELDOUT_TASKS, SHAPES_TASKS
from taskmllm.model.interventions import VAR, VHR
from taskmllm.model.mllm import TaskMLLM
from taskmllm.router.joint import JointModel
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-random"
    JointModel.build(TaskMLLM(tiny_config(tokenizer), tokenizer)).save_pretrained(path)
    return path


def test_eval_shapes_writes_json_table_and_readable_plots(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(checkpoint), "--suite", "shapes", "--n", "2", "--out", str(out),
               "--max-new-tokens", "12", "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "shapes" and results["model"] == str(checkpoint) and results["n_per_task"] == 2
    assert set(results["summary"]) == set(SHAPES_TASKS) and set(results["heldout_summary"]) == set(HELDOUT_TASKS)
    for row in results["summary"].values():
        assert row["n"] == 2 and 0.0 <= row["routing"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| summary | n | routing | metric | score |" in table and "| track_box | 2 |" in table
    assert table in capsys.readouterr().out
    for name in ("tracking_success.png", "tracking_precision.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 200


def test_eval_pope_with_var_intervention(checkpoint, tmp_path):
    out = tmp_path / "pope"
    rc = main(["eval", "--model", str(checkpoint), "--suite", "pope-shapes", "--n", "2", "--out", str(out),
               "--intervention", "var", "--seed", "5", "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["intervention"].startswith("VAR(") and "tau=4.0" in results["intervention"]  # 0.5*sqrt(64)
    assert results["seed"] == 5 and set(results["pope"]["splits"]) == {"random", "popular", "adversarial"}
    with Image.open(out / "pope_yes_ratio.png") as im:
        assert im.format == "PNG"


def test_eval_runs_the_precision_it_is_given_and_records_it(checkpoint, tmp_path):
    runs = {}
    for name, flags in (("plain", []), ("int8", ["--dtype", "bfloat16", "--quantize", "int8"])):
        out = tmp_path / name
        assert main(["eval", "--model", str(checkpoint), "--suite", "pope-shapes", "--n", "2", "--out", str(out),
                     "--no-progress", *flags]) == 0
        runs[name] = json.loads((out / "results.json").read_text())
    assert (runs["plain"]["dtype"], runs["plain"]["quantize"]) == ("as stored", "none")
    assert (runs["int8"]["dtype"], runs["int8"]["quantize"]) == ("bfloat16", "int8")
    assert runs["int8"]["pope"]["splits"].keys() == runs["plain"]["pope"]["splits"].keys()


def test_eval_errors_are_typed(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--suite", "shapes", "--out", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_make_intervention_defaults_without_a_calibration(checkpoint):
    from taskmllm.router.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(checkpoint)
    assert pipe.calibration == {}
    assert isinstance(make_intervention("vhr", pipe), VHR) and make_intervention(None, pipe) is None
    assert make_intervention("none", pipe) is None and make_intervention("zerotuning", pipe).gamma == 1.0
    var = make_intervention("var", pipe)
    assert isinstance(var, VAR) and var.mode == "official" and var.tau == 4.0, "tau resolved: 0.5 * sqrt(64)"
    assert var.p == 0.4, "official mode's default: move 40% (no explicit p=0.6 any more)"
    assert make_intervention("var", pipe, tau=3.0).tau == 3.0 and make_intervention("vhr", pipe, alpha=1.5).alpha == 1.5
    with pytest.raises(ConfigError, match="unknown intervention"):
        make_intervention("dola", pipe)
    with pytest.raises(ConfigError, match="cannot be reached"):
        make_intervention("var", pipe, tau=8.0)


def test_eval_options_and_outputs_are_checked_before_the_model_loads(tmp_path, tiny_checkpoint):
    from taskmllm.eval.benchmarks import EvalOptions, evaluate

    with pytest.raises(ConfigError, match=r"EvalOptions.n must be an integer >= 1, got 0"):
        EvalOptions(n=0)
    with pytest.raises(ConfigError, match=r"EvalOptions.batch_size must be an integer >= 1, got -2"):
        EvalOptions(batch_size=-2)
    with pytest.raises(ConfigError, match=r"EvalOptions.seed must be an integer >= 0, got -1"):
        EvalOptions(seed=-1)
    from taskmllm.data.shapesworld import ShapesWorld

    with pytest.raises(ConfigError, match=r"the world's seed must be an integer >= 0, got -1"):
        ShapesWorld(seed=-1)
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"eval --out .*report.json is an existing file; give a directory"):
        evaluate(tiny_checkpoint, "shapes", tmp_path / "report.json")
    with pytest.raises(ConfigError, match=r"max_new_tokens must be an integer >= 1, got 0"):
        evaluate(tiny_checkpoint, "shapes", tmp_path / "out", max_new_tokens=0)
    assert not (tmp_path / "out").exists()


def test_eval_n_is_the_number_asked_for_not_a_default():
    """``n=1`` runs one question per task; the suite's default 200 applies only to ``n=None``."""
    from taskmllm.eval.benchmarks import EvalOptions, _n

    assert _n(EvalOptions(n=1)) == 1 and _n(EvalOptions()) == 200
