"""Several requests at once: ``predict`` with lists and ``taskmllm predict --requests FILE.jsonl`` run one batched
Pipeline call per batch, and every answer is the one the request gets alone (the Pipeline called once per request,
on pictures decoded with Pillow alone)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taskmllm.cli import main
from taskmllm.demo.examples import example_file
from taskmllm.errors import ConfigError, ImageError, InputError
from taskmllm.predict import predict
from taskmllm.predict_requests import predict_requests, read_requests
from taskmllm.router.pipeline import Pipeline
from tests.demo.conftest import DET, SEG, TEXT, TRACK, visual_of

REQUESTS = [SEG, DET, TRACK, TEXT, DET]  # images, a video, text only; DET twice


@pytest.fixture
def pipeline_calls(monkeypatch):
    """The prompts of every ``Pipeline.__call__`` made during the test, one list per call."""
    calls = []
    call = Pipeline.__call__

    def spy(self, visual, prompt, /, *args, **kwargs):
        calls.append([prompt] if isinstance(prompt, str) else list(prompt))
        return call(self, visual, prompt, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    return calls


def assert_same(got, want) -> None:
    """A batched request's result against the request's own Pipeline call: texts and tasks exact, boxes and scores
    to 1e-4, masks equal."""
    assert (got.text, got.raw_text) == (want.text, want.raw_text)
    assert [(c.task, c.phrase) for c in got.calls] == [(c.task, c.phrase) for c in want.calls]
    for mine, theirs in zip(got.calls, want.calls):
        for field in ("boxes", "scores", "mask"):
            a, b = getattr(mine, field), getattr(theirs, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.shape == b.shape and np.allclose(a, b, atol=1e-4, rtol=0), field


def assert_same_record(record: dict, want) -> None:
    """:func:`assert_same` on a JSON record (boxes rounded to 0.01 px, scores to 1e-4 in the file)."""
    assert (record["text"], record["raw_text"]) == (want.text, want.raw_text)
    assert [(c["task"], c["phrase"]) for c in record["calls"]] == [(c.task, c.phrase) for c in want.calls]
    for got, call in zip(record["calls"], want.calls):
        if call.boxes is not None:
            assert np.allclose(got["boxes"], call.boxes, atol=0.005 + 1e-4, rtol=0)


def _where(name):
    """``(image, video)`` of a request: a bundled picture as the image or (a GIF) as the video, or neither."""
    if name is None:
        return None, None
    return (None, example_file(name)) if name.endswith(".gif") else (example_file(name), None)


def test_predict_lists_run_one_batched_call_with_the_answers_of_single_calls(demo_pipeline, tmp_path,
                                                                             pipeline_calls):
    images, videos = zip(*(_where(name) for name, _, _ in REQUESTS))
    outs = [tmp_path / f"r{i}.{'gif' if video else 'png'}" for i, video in enumerate(videos)]
    jsons = [tmp_path / f"r{i}.json" for i in range(len(REQUESTS))]
    preds = predict(demo_pipeline, [instruction for _, instruction, _ in REQUESTS], image=list(images),
                    video=list(videos), out=outs, json_path=jsons)
    assert pipeline_calls == [[instruction for _, instruction, _ in REQUESTS]], "one batched call"
    assert len(preds) == len(REQUESTS)
    for (name, instruction, _), pred, out, json_file in zip(REQUESTS, preds, outs, jsons):
        want = demo_pipeline(visual_of(name), instruction)
        assert_same(pred.result, want)
        assert_same_record(pred.record, want)
        assert json.loads(json_file.read_text()) == pred.record and pred.json_path == json_file
        assert pred.record["instruction"] == instruction
        if name is None:
            assert pred.overlay_path is None and not out.exists()
        else:
            assert pred.overlay_path == out and pred.record["overlay"] == str(out)
            with Image.open(out) as overlay:
                assert overlay.size == Image.open(example_file(name)).size
    assert [c["task"] for p in preds for c in p.record["calls"]] == ["seg", "det", "track", "det"]


def test_predict_lists_with_an_intervention_match_single_calls(demo_pipeline, pipeline_calls):
    from taskmllm.model.interventions import VHR

    requests = [SEG, TEXT, TRACK]
    images, videos = zip(*(_where(name) for name, _, _ in requests))
    preds = predict(demo_pipeline, [instruction for _, instruction, _ in requests], image=list(images),
                    video=list(videos), intervention="vhr")
    assert len(pipeline_calls) == 1
    for (name, instruction, _), pred in zip(requests, preds):
        assert_same(pred.result, demo_pipeline(visual_of(name), instruction, intervention=VHR()))
        assert pred.record["intervention"].startswith("VHR(")


def test_predict_list_arguments_are_checked(demo_pipeline, tmp_path, pipeline_calls):
    with pytest.raises(InputError, match=r"2 instructions need image as None or a list of 2"):
        predict(demo_pipeline, ["Hi.", "Ho."], image=example_file(SEG[0]))
    with pytest.raises(InputError, match=r"request 2: the instruction is empty"):
        predict(demo_pipeline, ["Hi.", "  "])
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ImageError, match=r"request 3: .*dot\.png is 1x1 pixels"):
        predict(demo_pipeline, ["Hi.", "Ho.", "Hu."], image=[None, None, tmp_path / "dot.png"])
    with pytest.raises(InputError, match=r"request 1: --attention needs an image or a video"):
        predict(demo_pipeline, ["Hi.", "Ho."], attention=[tmp_path / "a.png", None])
    with pytest.raises(InputError, match=r"non-empty list"):
        predict(demo_pipeline, [])
    assert pipeline_calls == [], "every request is checked before any compute"


def _requests_file(tmp_path, lines) -> Path:
    """The bundled pictures copied under ``tmp_path/pics`` and a requests file beside them."""
    pics = tmp_path / "pics"
    pics.mkdir(exist_ok=True)
    for name in (SEG[0], DET[0], TRACK[0]):
        shutil.copy(example_file(name), pics / name)
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_requests_file_from_the_cli_writes_an_overlay_and_a_record_per_request(demo_checkpoint, demo_pipeline,
                                                                                tmp_path, capsys, pipeline_calls):
    lines = [{"image": f"pics/{SEG[0]}", "prompt": SEG[1]}, "",  # a blank line is skipped
             {"video": f"pics/{TRACK[0]}", "prompt": TRACK[1], "id": "track"},
             {"prompt": TEXT[1]}, {"image": str(tmp_path / "pics" / DET[0]), "prompt": DET[1]}]  # an absolute path
    path = _requests_file(tmp_path, lines)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(demo_checkpoint), "--requests", str(path), "--out-dir", str(out),
                 "--batch-size", "3"]) == 0
    assert [len(c) for c in pipeline_calls] == [3, 1], "batches of --batch-size, in file order"
    printed = capsys.readouterr()
    wants = [(SEG, "0001", "png"), (TRACK, "track", "gif"), (TEXT, "0004", None), (DET, "0005", "png")]
    assert printed.out.splitlines() == [f"{name}: {demo_pipeline(visual_of(r[0]), r[1]).text}"
                                        for r, name, _ in wants]
    assert "wrote 4 JSON records" in printed.err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{name}.json" for _, name, _ in wants] + [f"{name}.{fmt}" for _, name, fmt in wants if fmt])
    for (request, name, fmt), line in zip(wants, [1, 3, 4, 5]):
        record = json.loads((out / f"{name}.json").read_text())
        assert (record["id"], record["line"], record["instruction"]) == (name, line, request[1])
        assert_same_record(record, demo_pipeline(visual_of(request[0]), request[1]))
        assert record["overlay"] == (None if fmt is None else str(out / f"{name}.{fmt}"))
    with Image.open(out / "track.gif") as gif:
        assert gif.n_frames == 8


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2: not valid JSON"),
    ('["a list"]', r"line 2: must be a JSON object with a 'prompt', got list"),
    ({"image": "pics/shapes-seg.png"}, r"line 2: 'prompt' must be a string"),
    ({"prompt": "Hi.", "question": "?"}, r"line 2: unknown key\(s\) 'question'; the keys are prompt, image, video, id"),
    ({"prompt": "Hi.", "image": "pics/shapes-seg.png", "video": "pics/shapes-track.gif"}, r"line 2: .*not both"),
    ({"prompt": "Hi.", "image": "pics/absent.png"}, r"line 2: the image pics/absent\.png does not exist"),
    ({"prompt": "Hi.", "video": []}, r"line 2: 'video' is an empty list"),
    ({"prompt": "Hi.", "image": 3}, r"line 2: the image must be a path string"),
    ({"prompt": "Hi.", "id": "../escape"}, r"line 2: 'id' must be a file name"),
    ({"prompt": "Hi.", "id": "first"}, r"line 2: id 'first' is already used by line 1"),
])
def test_bad_lines_are_input_errors_naming_the_line(tmp_path, line, message):
    path = _requests_file(tmp_path, [{"prompt": "Hi.", "id": "first"}, line])
    with pytest.raises(InputError, match=r"requests\.jsonl " + message):
        read_requests(path)


def test_requests_file_errors_from_the_cli(demo_checkpoint, demo_pipeline, tmp_path, capsys, pipeline_calls):
    path = _requests_file(tmp_path, [{"prompt": "Hi."}, {"prompt": "Hi.", "image": "pics/absent.png"}])
    assert main(["predict", "--model", str(demo_checkpoint), "--requests", str(path)]) == 2
    err = capsys.readouterr().err
    assert "requests.jsonl line 2: the image pics/absent.png does not exist" in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match=r"empty\.jsonl has no requests"):
        read_requests(empty)
    Image.new("RGB", (1, 1)).save(tmp_path / "pics" / "dot.png")  # decodable only when its batch runs
    bad = _requests_file(tmp_path, [{"prompt": TEXT[1]}, {"prompt": "Hi.", "image": "pics/dot.png"}])
    answers = predict_requests(demo_pipeline, bad, tmp_path / "out", batch_size=1)
    assert next(answers)[1].result.text == "A round shape."
    with pytest.raises(ImageError, match=r"requests\.jsonl line 2: .*dot\.png is 1x1 pixels"):
        next(answers)
    assert (tmp_path / "out" / "0001.json").exists(), "the batches before a bad picture are written"
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        predict_requests(demo_pipeline, bad, batch_size=0)
    for argv, message in [([str(path), "Hi."], "drop an instruction"),
                          ([str(path), "--image", "x.png", "--out", "o.png"], "drop --image, --out"),
                          ]:
        assert main(["predict", "--model", str(demo_checkpoint), "--requests", *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["predict", "--model", str(demo_checkpoint), "Hi.", "--out-dir", str(tmp_path)]) == 2
    assert "--out-dir and --batch-size go with --requests" in capsys.readouterr().err
    assert main(["predict", "--model", str(demo_checkpoint)]) == 2
    assert "give an instruction" in capsys.readouterr().err
    assert pipeline_calls == [[TEXT[1]]]
