"""The recipe runner's plan and the model card's headline numbers (no training: hand-built inputs)."""

import pytest

from taskmllm.errors import ConfigError
from taskmllm.training.card import headline
from taskmllm.training.recipe_run import load_plan


def test_tiny_plan_names_existing_stage_files():
    plan = load_plan("tiny")
    assert plan.stages == ["pretrain", "assign", "heads", "joint"]
    assert "shapes" in plan.eval_suites


def test_unknown_recipe_and_bad_plan_are_typed_errors(tmp_path):
    with pytest.raises(ConfigError, match="known recipes"):
        load_plan(str(tmp_path / "nope"))
    (tmp_path / "recipe.yaml").write_text("stages: [a]\nsteps: 3\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_plan(str(tmp_path))
    (tmp_path / "recipe.yaml").write_text("stages: [a]\n")
    with pytest.raises(ConfigError, match="missing"):
        load_plan(str(tmp_path))


def test_headline_weights_routing_by_questions_and_averages_vqa():
    summary = {"exist": {"n": 100, "routing": 1.0, "score": 0.9}, "color": {"n": 100, "routing": 1.0, "score": 0.6},
               "count": {"n": 100, "routing": 1.0, "score": 0.75}, "seg": {"n": 100, "routing": 0.5, "score": 0.4}}
    pope = {"pope": {"splits": {"random": {"f1": 0.8}}}}
    tasks = {"seg": {"ciou": 0.4, "giou": 0.35}}  # the floors name gIoU and AP50, not the summary's cIoU / AP
    got = headline({"summary": summary, "tasks": tasks}, pope)
    assert got["routing"] == pytest.approx(3.5 / 4)  # (1 + 1 + 1 + 0.5) / 4 questions-weighted
    assert got["vqa"] == pytest.approx((0.9 + 0.6 + 0.75) / 3)
    assert got["seg"] == 0.35 and got["pope_f1"] == 0.8 and got["det"] is None
    summary["det"] = {"n": 10, "routing": 1.0, "metric": "AP", "score": 0.2}
    assert headline({"summary": summary, "tasks": tasks | {"det": {"AP": 0.2, "AP50": 0.45}}}, None)["det"] == 0.45
    assert got["false_call_rate"] is None  # a result from before the rate existed
    assert headline({"summary": summary, "routing": {"false_call_rate": 0.03}}, None)["false_call_rate"] == 0.03


def test_smol_plan_ships_an_adapter_and_compares_with_tiny(tmp_path):
    plan = load_plan("smol")
    assert plan.stages == ["align", "see", "heads", "joint", "experts"] and plan.ship == "adapter" and plan.compare == ["tiny"]
    (tmp_path / "a.yaml").write_text("{}")
    (tmp_path / "recipe.yaml").write_text("stages: [a]\nship: zip\n")
    with pytest.raises(ConfigError, match="ship must be"):
        load_plan(str(tmp_path))
    (tmp_path / "recipe.yaml").write_text("stages: [a]\neval: {suits: [shapes]}\n")
    with pytest.raises(ConfigError, match="unknown eval keys"):
        load_plan(str(tmp_path))


def test_card_shows_a_compared_model_beside_this_one(tmp_path):
    import json

    from taskmllm.training.card import _compared, _metrics_section

    def results(score: float) -> dict:
        return {"seed": 5, "n_per_task": 10, "summary": {"seg": {"n": 10, "routing": 1.0, "metric": "cIoU",
                                                                "score": score}},
                "tasks": {"seg": {"ciou": score, "giou": score + 0.01}}}

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "shapes.json").write_text(json.dumps(results(0.5)))
    (tmp_path / "other" / "eval").mkdir(parents=True)  # a shipped model's directory holds eval/<suite>.json
    (tmp_path / "other" / "eval" / "shapes.json").write_text(json.dumps(results(0.2)))
    lines = _metrics_section({"shapes": {"json": str(tmp_path / "run" / "shapes.json")}},
                             _compared([str(tmp_path / "other")]))
    assert "| referring segmentation gIoU | 0.510 | 0.210 | ≥ 0.55 |" in lines
    assert "| seg | 10 | 1.000 | cIoU | 0.500 | 0.200 |" in lines
    assert lines[2].endswith(f"beside the shipped `{tmp_path / 'other'}` (same command):")
    other = results(0.2) | {"n_per_task": 100}  # evaluated at another n: the card says so
    (tmp_path / "other" / "eval" / "shapes.json").write_text(json.dumps(other))
    lines = _metrics_section({"shapes": {"json": str(tmp_path / "run" / "shapes.json")}},
                             _compared([str(tmp_path / "other")]))
    assert lines[2].endswith(f"beside the shipped `{tmp_path / 'other'}` (same command at `--n 100`):")


def test_card_shows_the_image_reliance_table(tmp_path):
    import json

    from taskmllm.training.card import _metrics_section

    shapes = {"seed": 5, "n_per_task": 10, "summary": {}, "tasks": {}}
    reliance = {"exist": {"own_nll": 0.7, "other_nll": 0.7, "gap": 0.0, "n": 64},
                "caption": {"own_nll": 19.9, "other_nll": 27.3, "gap": 7.4, "n": 64}}
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    (tmp_path / "image_reliance.json").write_text(json.dumps(reliance))
    lines = _metrics_section({"shapes": {"json": str(tmp_path / "shapes.json")},
                              "image_reliance": {"json": str(tmp_path / "image_reliance.json")}})
    assert "| exist | 64 | 0.700 | 0.700 | 0.000 |" in lines
    assert "| caption | 64 | 19.900 | 27.300 | 7.400 |" in lines


def test_card_says_how_its_answers_were_decoded():
    """The decoding line reads the report's metadata: the defaults (both processors off) or what the eval used."""
    from taskmllm.training.card import decoding_line

    plain = decoding_line({"seed": 5})
    assert "greedy, `repetition_penalty` 1 (off), `no_repeat_ngram_size` 0 (off)" in plain
    tuned = decoding_line({"repetition_penalty": 1.2, "no_repeat_ngram_size": 4})
    assert "`repetition_penalty` 1.2, `no_repeat_ngram_size` 4 (" in tuned and "(off)" not in tuned


def test_recipe_targets_become_the_cards_bounds(tmp_path):
    import json

    from taskmllm.training.card import _metrics_section

    plan = load_plan("smol")  # issue #27's floors
    assert plan.bounds["pope_acc"] == (0.85, None) and plan.bounds["pope_yes_ratio"] == (0.40, 0.60)
    assert plan.bounds["false_call_rate"] == (None, 0.02) and "pope_f1" not in plan.bounds
    shapes = {"seed": 5, "n_per_task": 10, "summary": {}, "tasks": {"seg": {"giou": 0.3}}}
    pope = {"pope": {"splits": {"random": {"f1": 0.7, "accuracy": 0.77, "yes_ratio": 0.46}}}}
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    (tmp_path / "pope.json").write_text(json.dumps(pope))
    lines = _metrics_section({"shapes": {"json": str(tmp_path / "shapes.json")},
                              "pope-shapes": {"json": str(tmp_path / "pope.json")}}, None, plan.bounds)
    assert "| POPE-random accuracy | 0.770 | ≥ 0.85 |" in lines
    assert "|   POPE-random yes-ratio | 0.460 | 0.40–0.60 |" in lines
    assert "| referring segmentation gIoU | 0.300 | ≥ 0.50 |" in lines
    assert "| POPE-random F1 | 0.700 |  |" in lines  # measured, no target in this recipe
    (tmp_path / "a.yaml").write_text("{}")
    for bad, match in [("{pope_acc: [0.1]}", "must be a number"), ("{pope: 0.8}", "unknown eval.targets"),
                       ("{seg: [null, null]}", "must be a number"), ("{seg: yes}", "must be a number")]:
        (tmp_path / "recipe.yaml").write_text(f"stages: [a]\neval: {{targets: {bad}}}\n")
        with pytest.raises(ConfigError, match=match):
            load_plan(str(tmp_path))


def test_every_stage_file_of_every_recipe_loads(tmp_path):
    """Every stage YAML loads, also one outside its recipe's ``stages``; smol's ``experts`` trains the experts only,
    restarting det's center head as a ``match`` head."""
    from pathlib import Path

    import taskmllm.training.recipes as recipes
    from taskmllm.training.config import load_config

    root = Path(recipes.__path__[0])
    files = [f for f in sorted(root.glob("*/*.yaml")) if not f.name.startswith("_") and f.name != "recipe.yaml"]
    assert any(f.name == "experts.yaml" for f in files)
    for f in files:
        cfg = load_config(f, [f"--out_dir={tmp_path / f.parent.name / f.stem}"])
        assert cfg.max_steps > 0, f
    experts = load_config(root / "smol" / "experts.yaml", [f"--out_dir={tmp_path / 'e'}"])
    assert {k for k, m in experts.stage.trainable.items() if m != "frozen"} == {"experts"}
    assert experts.stage.lm_weight == 0.0
    assert experts.model.fresh == ["det.center_head", "seg"] and experts.model.experts["det"]["score_head"] == "match"
    assert experts.stage.cached_calls > 0  # the frozen MLLM's calls cached once


def test_card_reads_a_stages_loss_from_recipe_json_when_its_metrics_are_elsewhere(tmp_path):
    """A run directory assembled from an earlier run's stages (their metrics.jsonl not copied) keeps the losses
    recipe.json recorded; a stage with neither prints a dash; the curves still draw the stages that have rows."""
    import json

    from taskmllm.training.card import final_loss, last_loss, plot_learning_curves

    (tmp_path / "b").mkdir()
    rows = [{"step": s, "time_s": 60.0 * s, "loss_weighted": 4.0 / s, "lm": 2.0 / s} for s in (1, 2, 3)]
    (tmp_path / "b" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert last_loss(tmp_path / "b" / "metrics.jsonl") == pytest.approx(4.0 / 3)
    assert last_loss(tmp_path / "a" / "metrics.jsonl") is None
    assert final_loss(tmp_path / "b" / "metrics.jsonl", 9.0) == "1.333"  # the file wins over the record
    assert final_loss(tmp_path / "a" / "metrics.jsonl", 0.342) == "0.342"
    assert final_loss(tmp_path / "a" / "metrics.jsonl") == "–"
    log = {"stages": {"a": {"wall_s": 300.0, "final_loss": 0.342}}}
    assert plot_learning_curves(tmp_path, ["a", "b"], log) == tmp_path / "learning_curves.png"
    assert plot_learning_curves(tmp_path, ["a"], log) is None  # nothing to draw: no figure


def test_card_counts_a_call_cache_read_from_a_file(tmp_path):
    """A stage that read its call cache from an earlier identical run's file (``call_cache.json`` says
    ``loaded_from``): its row and the total say how long building that cache took, apart from the stage's own time."""
    import json

    from taskmllm.training.card import write_model_card
    from taskmllm.training.config import load_config
    from taskmllm.training.recipe_run import load_plan

    plan = load_plan("smol")
    configs = [load_config(plan.folder / f"{s}.yaml", [f"--out_dir={tmp_path / s}"]) for s in plan.stages]
    log = {"stages": {s: {"wall_s": 60.0, "final_loss": 1.0} for s in plan.stages}}
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / "call_cache.json").write_text(json.dumps({"seconds": 1800.0, "loaded_from": "x"}))
    text = write_model_card(tmp_path, plan, configs, log).read_text()
    assert "| 1.0 min (+ 30.0 min building its call cache, read from a file) | 1.000 |" in text
    assert f"Total training wall time: **{len(plan.stages):.1f} min** + 30.0 min of call caching done before" in text
    (tmp_path / "experts" / "call_cache.json").write_text(json.dumps({"seconds": 1800.0}))  # built in this run
    text = write_model_card(tmp_path, plan, configs, log).read_text()
    assert "building its call cache" not in text and f"**{len(plan.stages):.1f} min** on the machine" in text


def test_a_recipe_run_records_the_host_of_each_stage_and_the_card_names_it(tmp_path):
    """``recipe.json`` keeps, beside each stage's wall time, the CPU it ran on (oracle: /proc/cpuinfo's model name
    and torch's own capability and thread count) and the load at its start and end; the card names the machine."""
    import json

    import torch

    from taskmllm.training.host import cpu_name, host_label
    from taskmllm.training.recipe_run import run_recipe
    from tests.training.helpers import RECIPE, TINY

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("description: one stage of the tiny recipe\nstages: [joint]\n")
    (folder / "joint.yaml").write_text(f"inherit: {RECIPE / 'joint.yaml'}\nmax_steps: 1\nmodel: {{init: tiny}}\n")
    run_recipe(str(folder), tmp_path / "run", [o for o in TINY if not o.startswith("--model.init")], skip_eval=True)
    host = json.loads((tmp_path / "run" / "recipe.json").read_text())["stages"]["joint"]["host"]
    assert host["cpu"] == cpu_name() and host["cpus"] >= 1
    assert host["isa"] == torch.backends.cpu.get_cpu_capability() and host["threads"] == torch.get_num_threads()
    assert host["load_avg_1min"] >= 0 and host["load_avg_end"] >= 0
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert f"on {host_label(host)} (1-minute load average" in card


def test_the_card_names_each_machine_when_stages_ran_on_several(tmp_path):
    from taskmllm.training.host import cpu_name, hosts_text

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n")
    assert cpu_name(info) == "AMD EPYC 9R14"
    fast = {"cpu": "AMD EPYC 9R14", "isa": "AVX512", "cpus": 2, "threads": 2, "load_avg_1min": 2.04,
            "load_avg_end": 2.31}
    slow = {**fast, "cpu": "AMD EPYC 7R13", "isa": "AVX2", "load_avg_1min": 1.1}
    assert hosts_text([fast, fast]) == ("on AMD EPYC 9R14 (AVX512), 2 CPUs, 2 torch threads (1-minute load average "
                                        "2.0–2.3 at the stages' starts and ends)")
    assert hosts_text([fast, slow]).startswith("on 2 machines: AMD EPYC 9R14 (AVX512), 2 CPUs, 2 torch threads; "
                                               "AMD EPYC 7R13 (AVX2)")
    assert "and one not recorded" in hosts_text([fast, None])
    assert hosts_text([None, None]) == "on the machine that ran it"  # a recipe.json written before hosts were
