"""Text replay: the base model's own answers as a text-only ``llava`` source (taskmllm.data.replay)."""

from __future__ import annotations

import json

import torch

import pytest

from taskmllm.data.formats import load_llava
from taskmllm.data.replay import load_prompts, replay_conversations, whole_sentences, write_replay
from taskmllm.errors import ConfigError
from taskmllm.training.config import load_config


@pytest.fixture(scope="module")
def pipe():
    from taskmllm.router.pipeline import Pipeline

    return Pipeline.from_pretrained("tiny")


def test_entries_hold_the_pipelines_own_greedy_answers_turn_by_turn(pipe):
    """Each answer is what ``Pipeline.chat`` says to that conversation so far (the oracle), batched or not."""
    convs = [["Describe the picture."], ["What is in the image?", "And what color is it?"], ["Hello."]]
    entries = replay_conversations(pipe, convs, max_new_tokens=12, batch_size=2, progress=False)
    by_first = {e["conversations"][0]["value"]: e["conversations"] for e in entries}
    assert len(entries) >= 1
    for turns in by_first.values():
        history = []
        for k in range(0, len(turns), 2):
            assert [turns[k]["from"], turns[k + 1]["from"]] == ["human", "gpt"]
            history.append(("user", turns[k]["value"]))
            expected = pipe.chat(None, history, max_new_tokens=12)
            assert not expected.calls and turns[k + 1]["value"] == whole_sentences(expected.raw_text)
            history.append(("assistant", turns[k + 1]["value"]))
    left_out = [c for c in convs if c[0] not in by_first]
    for c in left_out:  # only a conversation with an expert call or an empty answer is left out
        answers = [pipe.chat(None, [("user", c[0])], max_new_tokens=12)]
        assert answers[0].calls or whole_sentences(answers[0].raw_text) is None


def test_written_file_loads_as_text_only_llava_samples(pipe, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"single": ["Hello.", "What is this?"], "chats": [["Hi.", "Who are you?"]]}))
    n = write_replay(pipe, prompts, tmp_path / "out" / "replay.json", max_new_tokens=8, progress=False)
    samples = load_llava(tmp_path / "out" / "replay.json").samples
    assert len(samples) == n
    assert all(s.image_path is None and s.frame_paths is None for s in samples)
    assert not (tmp_path / "out" / "replay.json.tmp").exists()


@pytest.mark.parametrize(("text", "kept"), [("Hi there. And then", "Hi there."), ("no end", None), ("Fine!", "Fine!"),
                                           ('He said "go." Then', 'He said "go."'), ("Is 3 < 4? Yes", "Is 3 < 4?")])
def test_an_answer_is_kept_to_its_last_whole_sentence(text, kept):
    assert whole_sentences(text) == kept


@pytest.mark.parametrize("content", ['{"single": []}', "[1, 2]", '{"single": ["ok", ""]}', '{"chats": [[]]}', "{"])
def test_bad_prompt_files_are_named(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="prompts"):
        load_prompts(path)


def test_bundled_prompts_leave_out_the_smol_tests_questions():
    from taskmllm.cli import REPLAY_PROMPTS
    from tests.smol.test_chat import FRUITS, TURNS
    from tests.smol.test_shipped import FACTS

    texts = {t.lower() for conv in load_prompts(REPLAY_PROMPTS) for t in conv}
    assert len(texts) > 100
    assert not texts & {q.lower() for q, _ in FACTS}
    assert not texts & {t.format(fruit=f).lower() for t in TURNS for f in FRUITS}
    assert not texts & {t.lower() for t in TURNS if "{" not in t}


def test_a_stage_finds_a_data_file_beside_its_yaml(tmp_path):
    (tmp_path / "replay.json").write_text("[]")
    (tmp_path / "stage.yaml").write_text(
        "stage: {name: s, trainable: {projector: full}}\nmodel: {init: tiny}\n"
        "data: {sources: {text: {kind: llava, path: replay.json}, far: {kind: llava, path: /abs/x.json}}}\n")
    cfg = load_config(tmp_path / "stage.yaml")
    specs = cfg.data.specs()
    assert specs["text"].path == str(tmp_path / "replay.json")
    assert specs["far"].path == "/abs/x.json"


def test_a_stage_trains_on_shapes_and_text_replay_together(tmp_path):
    """Batches that mix text-only replay conversations with grounded images run the LM and auxiliary losses (the
    text samples have no visual tokens, so the alignment losses skip them); the metrics log finite losses."""
    from taskmllm.training.train import train
    from tests.training.helpers import RECIPE, overrides

    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps([{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Count to {i}."},
                                                                     {"from": "gpt", "value": "One, two."}]}
                                  for i in range(4)]))
    cfg = load_config(RECIPE / "pretrain.yaml", overrides(
        tmp_path / "run", "--max_steps=3", "--data.batch_size=4",
        f"--data.sources.text={{kind: llava, path: {replay}, weight: 1.0}}"))
    out = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["lm"] == row["lm"] and row["lm"] > 0 for row in rows)
    assert (out / "model.safetensors").is_file() or any(out.iterdir())


def test_a_batch_of_text_only_samples_gives_the_auxiliary_losses_nothing(tmp_path):
    """A micro-batch drawn wholly from the text source has no visual token: every auxiliary loss of the stage is
    an exact zero (on the graph) while the LM loss trains, and beside image samples it does not dilute their
    average (the regression behind CI's smol stage errors)."""
    from taskmllm.data.shapesworld import WorldConfig, shapesworld_dataset
    from taskmllm.data.sample import Sample
    from taskmllm.training.aux import build_aux
    from taskmllm.training.train import aux_context, build_joint
    from taskmllm.training.trainee import LossSettings, Trainee, forward_loss
    from tests.training.helpers import RECIPE, overrides

    cfg = load_config(RECIPE / "pretrain.yaml", overrides(tmp_path, "--stage.aux.words={labels: [category]}"))
    joint = build_joint(cfg)
    aux = build_aux(cfg.stage.aux, aux_context(joint, cfg.data.specs()))
    assert set(aux) >= {"focus", "attr", "words"}
    trainee = Trainee(joint, aux, LossSettings(lm_weight=cfg.stage.lm_weight))
    text = [Sample(id="t0", source="llava", task="text", turns=[("Count to three.", "One, two, three.")]),
            Sample(id="t1", source="llava", task="text", turns=[("Say hi.", "Hi.")])]
    loss, parts = forward_loss(trainee, text, torch.device("cpu"))
    assert all(float(parts[name]) == 0.0 for name in aux)
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    torch.manual_seed(0)
    images = list(shapesworld_dataset({"color": 1.0}, 2, seed=0, config=WorldConfig(image_size=48)))
    _, alone = forward_loss(trainee, images, torch.device("cpu"))
    _, mixed = forward_loss(trainee, images + text, torch.device("cpu"))
    for name in aux:
        assert float(mixed[name]) == pytest.approx(float(alone[name]), rel=1e-4)


def _trainee_and_samples(tmp_path):
    """The tiny recipe's pretrain trainee, and two ShapesWorld images beside two text-only replay conversations
    (one long answer: what padded every image row of a micro-batch before the text had its own group)."""
    from taskmllm.data.sample import Sample
    from taskmllm.data.shapesworld import WorldConfig, shapesworld_dataset
    from taskmllm.training.aux import build_aux
    from taskmllm.training.train import aux_context, build_joint
    from taskmllm.training.trainee import LossSettings, Trainee
    from tests.training.helpers import RECIPE, overrides

    cfg = load_config(RECIPE / "pretrain.yaml", overrides(tmp_path, "--stage.aux.words={labels: [category]}"))
    joint = build_joint(cfg).eval()  # no dropout: the two layouts must compute the same function
    trainee = Trainee(joint, build_aux(cfg.stage.aux, aux_context(joint, cfg.data.specs())),
                      LossSettings(lm_weight=cfg.stage.lm_weight))
    long = " ".join(["one, two, three, four, five, six, seven, eight, nine, ten."] * 6)
    text = [Sample(id="t0", source="llava", task="text", turns=[("Count to ten, six times.", long)]),
            Sample(id="t1", source="llava", task="text", turns=[("Say hi.", "Hi.")])]
    images = list(shapesworld_dataset({"color": 1.0, "count": 1.0}, 2, seed=0, config=WorldConfig(image_size=48)))
    return trainee, [images[0], text[0], images[1], text[1]]


def test_text_only_samples_get_their_own_group_and_the_loss_of_one_forward(tmp_path):
    """Collate groups a micro-batch's images, text-only samples and videos apart (the images no longer pad to a
    long text answer), and the trainee's loss and parts equal those of one padded forward of everything (the
    oracle: ``Collate(split=False)``); merged back for multi-rank DeepSpeed, the same again."""
    from taskmllm.training.data_loader import Collate

    trainee, samples = _trainee_and_samples(tmp_path)
    processor = trainee.joint.mllm.processor
    items = list(enumerate(samples))
    split, whole = Collate(processor)(items), Collate(processor, split=False)(items)
    assert [[s.id for s in g.samples] for g in split.groups] == [[samples[0].id, samples[2].id], ["t0", "t1"]]
    image_len, text_len = (g.batch.input_ids.shape[1] for g in split.groups)
    assert image_len < text_len == whole.groups[0].batch.input_ids.shape[1]
    assert split.groups[1].batch.pixel_values is None
    merged = Collate(processor).text_with_visuals(split)
    assert len(merged.groups) == 1 and merged.indices == split.indices
    assert sorted(s.id for s in merged.groups[0].samples) == sorted(s.id for s in samples)
    with torch.no_grad():
        loss, parts = trainee(whole)
        for micro in (split, merged):
            other, other_parts = trainee(micro)
            assert float(other) == pytest.approx(float(loss), rel=1e-5)
            assert set(other_parts) == set(parts)
            for name in parts:
                assert float(other_parts[name]) == pytest.approx(float(parts[name]), rel=1e-5, abs=1e-7)


def test_text_with_visuals_leaves_a_micro_batch_without_text_or_without_pixels_alone(tmp_path):
    from taskmllm.training.data_loader import Collate

    trainee, samples = _trainee_and_samples(tmp_path)
    collate = Collate(trainee.joint.mllm.processor)
    images, text = collate([(0, samples[0]), (2, samples[2])]), collate([(1, samples[1]), (3, samples[3])])
    assert collate.text_with_visuals(images) is images and collate.text_with_visuals(text) is text
