"""``taskmllm calibrate`` end to end on a random tiny checkpoint (small n): the val suite against the ``pope-shapes``
/ ``chair-shapes`` suites run on the val split (the oracle), the objective and the choice recomputed by hand from the
stored table, ``interventions.json`` merged, the model card's section, the shipped-name destination, and official
VAR's visual-sink check on a model with planted sinks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from taskmllm.cli import main
from taskmllm.data.shapesworld import WorldConfig
from taskmllm.errors import ConfigError, StaleCalibrationWarning
from taskmllm.eval.calibration_run import CalibrationOptions, ValSuite, answer_prefix_batch
from taskmllm.eval.suites import DEFAULT_EVAL_SEED, pipeline_answerer, run_chair_shapes, run_pope_shapes
from taskmllm.model.interventions import VAR, VHR, ZeroTuning
from taskmllm.model.interventions.calibrated import FILENAME, load_calibration, save_calibration
from taskmllm.model.io import sha256_file
from taskmllm.model.mllm import TaskMLLM
from taskmllm.router.joint import JointModel
from taskmllm.router.pipeline import Pipeline
from taskmllm.training.card import INTERVENTIONS_HEADING
from tests.conftest import tiny_config

N = 2
GRIDS = {"vhr": ["--alphas", "1.5", "2.0"], "var": ["--ps", "0.4", "--rhos", "0.5"],
         "zerotuning": ["--gammas", "0.5", "2.0"]}
IDENTITY = {"vhr": VHR(alpha=1.0).settings(), "var": VAR(p=0.0).settings(), "zerotuning": ZeroTuning().settings()}


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cal") / "model"
    JointModel.build(TaskMLLM(tiny_config(tokenizer), tokenizer)).save_pretrained(path)
    (path / "MODEL_CARD.md").write_text("# test card\n\n## Metrics\n\nnone\n")
    return path


@pytest.fixture(scope="module")
def calibrated(checkpoint):
    """The checkpoint after calibrating VHR, VAR and ZeroTuning with the CLI (each merged into one file)."""
    for name, grid in GRIDS.items():
        assert main(["calibrate", "--model", str(checkpoint), "--intervention", name, "--n", str(N),
                     "--no-progress", *grid]) == 0
    return checkpoint


def _oracle_metrics(checkpoint) -> dict[str, float]:
    """The plain model on the val split, through the public suites (not the calibration's own code)."""
    pipe = Pipeline.from_pretrained(checkpoint)
    world = WorldConfig(num_frames=min(WorldConfig().num_frames, pipe.model.mllm.config.max_frames))
    pope = run_pope_shapes(pipeline_answerer(pipe, 8), N, DEFAULT_EVAL_SEED, world, progress=False,
                           split="val").results["pope"]
    chair = run_chair_shapes(pipeline_answerer(pipe, 64), N, DEFAULT_EVAL_SEED, world, progress=False,
                             split="val").results["chair"]
    return {"pope_accuracy": pope["mean_accuracy"], "pope_adversarial_accuracy":
            pope["splits"]["adversarial"]["accuracy"], "chair_s": chair["chair_s"], "recall": chair["recall"]}


def _chosen_by_hand(record: dict, identity: dict) -> dict:
    """The objective's rule applied to the stored table: the best feasible score that beats the plain model's by
    0.01 (ties to the earlier candidate), else the identity."""
    base = record["baseline"]
    base_score = base["pope_accuracy"] - base["chair_s"]
    assert record["baseline_score"] == pytest.approx(base_score)
    best, best_score = None, base_score
    for row in record["table"]:
        m = row["metrics"]
        assert row["score"] == pytest.approx(m["pope_accuracy"] - m["chair_s"])
        assert row["feasible"] == (base["recall"] - m["recall"] <= 0.02 + 1e-12)
        better = row["score"] > best_score if best is not None else row["score"] >= base_score + 0.01
        if row["feasible"] and better:
            best, best_score = row["settings"], row["score"]
    return identity if best is None else best


def test_calibrate_writes_every_intervention_with_the_objective_s_choice(calibrated):
    raw = load_calibration(calibrated, raw=True)
    assert sorted(raw) == ["var", "vhr", "zerotuning"], "three runs merged into one file"
    oracle = _oracle_metrics(calibrated)
    for name, entry in raw.items():
        record = entry["calibration"]
        assert record["split"] == "val" and record["n_images"] == N and record["seed"] == DEFAULT_EVAL_SEED
        for key, value in oracle.items():
            assert record["baseline"][key] == pytest.approx(value), f"{name}: plain {key} = the val suites'"
        assert entry["settings"] == _chosen_by_hand(record, IDENTITY[name])
        assert record["candidates"] == len(record["table"])
        assert entry["weights"] == {"model.safetensors": sha256_file(calibrated / "model.safetensors")}
    vhr_rows = raw["vhr"]["calibration"]["table"]
    assert [(r["settings"]["alpha"], r["settings"]["layers"]) for r in vhr_rows] == [(1.5, [1]), (2.0, [1])], \
        "2 layers: every named layer set is [1], deduplicated"
    profile = raw["zerotuning"]["calibration"]["profile"]
    heads = [tuple(h) for h in profile["up"] + profile["down"]]
    assert len(heads) + profile["neutral"] == 8 and len(set(heads)) == len(heads)
    for row in raw["zerotuning"]["calibration"]["table"]:
        side = profile["up"] if row["settings"]["gamma"] > 1 else profile["down"]
        assert row["settings"]["heads"] == side, "up-effective heads get gamma > 1, down-effective gamma < 1"


def test_pipeline_uses_the_calibrated_settings(calibrated, rgb_image):
    pipe = Pipeline.from_pretrained(calibrated)
    stored = load_calibration(calibrated)
    assert pipe.calibration == stored and pipe.intervention_source("vhr") == "calibrated"
    vhr = pipe.intervention("vhr")
    assert vhr.settings() == stored["vhr"]
    by_name = pipe(rgb_image, "Is there a red circle?", max_new_tokens=6, intervention="vhr")
    by_object = pipe(rgb_image, "Is there a red circle?", max_new_tokens=6, intervention=VHR(**stored["vhr"]))
    assert by_name.raw_text == by_object.raw_text
    assert pipe.intervention("vhr", alpha=3.0).settings() == {**stored["vhr"], "alpha": 3.0}, "one setting replaced"


def test_eval_runs_the_calibrated_settings(calibrated, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(calibrated), "--suite", "pope-shapes", "--n", "1", "--intervention", "vhr",
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["intervention_settings"] == "calibrated"
    assert results["intervention"] == repr(VHR(**load_calibration(calibrated)["vhr"]))


def test_calibrate_updates_the_model_card_in_place(calibrated):
    card = (calibrated / "MODEL_CARD.md").read_text()
    assert card.startswith("# test card") and "## Metrics" in card
    assert card.count(INTERVENTIONS_HEADING) == 1, "three calibrations, one section"
    section = card[card.index(INTERVENTIONS_HEADING):]
    for name, settings in load_calibration(calibrated).items():
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        for key, value in settings.items():
            if value is not None and key != "heads":
                assert f"{key}={value}" in row


def test_bad_options_fail_before_the_model_loads(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert main(["calibrate", "--model", missing, "--intervention", "vhr", "--alphas", "0"]) == 2
    assert "VHR alpha" in capsys.readouterr().err
    assert main(["calibrate", "--model", missing, "--intervention", "var", "--ps", "1.5"]) == 2
    assert "VAR p" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not 'test'"):
        CalibrationOptions(split="test")
    with pytest.raises(ConfigError, match="unknown layer sets"):
        CalibrationOptions(layer_sets=("everything",))
    with pytest.raises(ConfigError, match="unknown head profile"):
        CalibrationOptions(profile="sampled")
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", missing, "--intervention", "vcd"])


def test_gradient_profile_from_the_cli(checkpoint, tmp_path):
    """``--profile gradient --profile-n 1``: the head kinds are those of the first-order profile on the first
    scene's POPE questions (the library function on the same batch), and the grid is built from them."""
    from taskmllm.eval.calibration_run import ValSuite
    from taskmllm.model.interventions import gradient_profile

    out = tmp_path / "grad"
    assert main(["calibrate", "--model", str(checkpoint), "--intervention", "zerotuning", "--n", str(N),
                 "--profile", "gradient", "--profile-n", "1", "--gammas", "0.5", "2.0", "--no-progress",
                 "--out", str(out)]) == 0
    record = load_calibration(out, raw=True)["zerotuning"]["calibration"]
    profile = record["profile"]
    pipe = Pipeline.from_pretrained(checkpoint)
    batch, candidates, labels = ValSuite(pipe, CalibrationOptions(n=N, progress=False)).yes_no_batch(1)
    want = gradient_profile(pipe.model.mllm, batch, candidates, labels)
    assert profile["method"] == "gradient" and profile["questions"] == len(labels) < record["pope_questions"]
    assert [tuple(h) for h in profile["up"]] == want.heads("up")
    assert [tuple(h) for h in profile["down"]] == want.heads("down")
    assert profile["base"] == pytest.approx(want.base, rel=1e-5)


def test_the_card_shows_a_long_head_list_by_its_size(tmp_path):
    from taskmllm.training.card import update_card_interventions

    (tmp_path / "MODEL_CARD.md").write_text("# card\n")
    heads = [[layer, head] for layer in (2, 5, 7) for head in range(3)]
    save_calibration(tmp_path, {"zerotuning": {"gamma": 1.25, "heads": heads}, "vhr": {"alpha": 1.5, "layers": [1]}},
                     {"zerotuning": {"profile": {"method": "gradient", "questions": 106}}})
    update_card_interventions(tmp_path)
    rows = {line.split(" | ")[0]: line for line in (tmp_path / "MODEL_CARD.md").read_text().splitlines()
            if line.startswith("| zerotuning") or line.startswith("| vhr")}
    assert "heads=9 heads in 3 layers (2–7; all in interventions.json) (gradient head profile on 106 questions)" \
        in rows["| zerotuning"]
    assert "layers=[1]" in rows["| vhr"]


def test_settings_calibrated_on_other_weights_are_not_used(calibrated, tmp_path):
    """Another model's ``interventions.json`` copied beside retrained weights: the Pipeline warns, names the
    changed file, and runs each intervention with its defaults."""
    retrained = tmp_path / "retrained"
    model = JointModel.from_pretrained(calibrated)
    with torch.no_grad():
        model.mllm.llm.get_input_embeddings().weight[0] += 1.0
    model.save_pretrained(retrained)
    shutil.copy(calibrated / FILENAME, retrained / FILENAME)
    with pytest.warns(StaleCalibrationWarning, match=r"'vhr' settings were calibrated on other weights "
                                                     r"\(model.safetensors changed\)"):
        pipe = Pipeline.from_pretrained(retrained)
    assert pipe.calibration == {} and pipe.intervention_source("vhr") == "defaults"
    assert sorted(load_calibration(retrained)) == ["var", "vhr", "zerotuning"], "without weights: no check"
    assert Pipeline.from_pretrained(calibrated).calibration == load_calibration(calibrated), "same weights: used"


def test_a_shipped_name_is_calibrated_into_the_user_directory(checkpoint, tmp_path, monkeypatch):
    from taskmllm.zoo import SHIPPED, user_calibration_dir

    package = tmp_path / "package"
    shutil.copytree(checkpoint, package)
    for f in package.glob(FILENAME):
        f.unlink()
    save_calibration(package, {"vhr": {"alpha": 1.25}, "zerotuning": {"gamma": 2.0, "heads": [[0, 1]]}})
    packaged = (package / FILENAME).read_bytes()
    monkeypatch.setitem(SHIPPED, "tiny", package)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert main(["calibrate", "--model", "tiny", "--intervention", "vhr", "--n", "1", "--alphas", "2.0",
                 "--no-progress"]) == 0
    assert (package / FILENAME).read_bytes() == packaged, "the package directory is not written"
    user = user_calibration_dir("tiny")
    assert user == tmp_path / "config" / "taskmllm" / "calibration" / "tiny"
    mine = load_calibration(user)
    assert list(mine) == ["vhr"]
    pipe = Pipeline.from_pretrained("tiny")
    assert pipe.calibration["vhr"] == mine["vhr"], "the user's calibration replaces the packaged one"
    assert pipe.calibration["zerotuning"] == load_calibration(package)["zerotuning"], "the packaged one stays"


def test_answer_prefix_batch_ends_before_the_first_differing_token(checkpoint):
    pipe = Pipeline.from_pretrained(checkpoint)
    tok = pipe.processor.tokenizer
    batch, (yes, no) = answer_prefix_batch(pipe, ["Is there a star?", "Is there a red circle here?"], [None, None],
                                           ("Yes.", "No."))
    for b, prompt in enumerate(["Is there a star?", "Is there a red circle here?"]):
        full = pipe.processor([prompt], [None], answers=["Yes."]).input_ids[0].tolist()
        real = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        assert full[:len(real)] == real and full[len(real)] == yes, "the prompt + shared prefix, then 'Yes'"
    assert "Yes".startswith(tok.decode([yes]).strip()) and "No".startswith(tok.decode([no]).strip())


def test_official_var_candidates_are_checked_for_visual_sinks(tokenizer):
    from tests.model.intervention_models import plant_image_sinks, plant_sink, varied_model

    mllm = varied_model(tokenizer, attn="eager")
    plant_sink(mllm, tokenizer.bos_token_id, 11, value=1000.0)
    pipe = Pipeline(JointModel.build(mllm))
    suite = ValSuite(pipe, CalibrationOptions(n=1))
    bos_only = suite.visual_sinks(VAR())
    assert bos_only["sink_dims"] == [11] and bos_only["layers"] == [], "a first-token sink is no visual sink"
    assert suite(VAR(p=0.6)) == suite(None), "no visual sink on any prompt: official VAR is scored as the plain model"
    assert suite._run(VAR(p=0.6)) == suite(None), "... which is what running it gives"
    handle = plant_image_sinks(mllm, 11, [2, 5])
    try:
        planted = ValSuite(pipe, CalibrationOptions(n=1)).visual_sinks(VAR())
    finally:
        handle.remove()
    assert planted["sink_dims"] == [11] and planted["layers"] == [2, 3], "official mode's layers 2..N-1"
    assert planted["prompts_with_visual_sink"] == planted["prompts"] > 0
