"""``taskmllm predict`` and ``taskmllm demo`` from the command line, checked against the Pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from taskmllm.cli import build_parser, main
from taskmllm.demo.examples import example_file, examples
from tests.demo.conftest import DET, SEG, TRACK, visual_of


def test_predict_image_writes_overlay_png_and_json_with_rle_masks(demo_checkpoint, demo_pipeline, tmp_path, capsys):
    from pycocotools import mask as mask_utils

    out = tmp_path / "out" / "overlay.png"
    rc = main(["predict", "--model", str(demo_checkpoint), "--image", str(example_file(SEG[0])), SEG[1],
               "--out", str(out)])
    assert rc == 0
    want = demo_pipeline(visual_of(SEG[0]), SEG[1])
    assert capsys.readouterr().out.strip() == want.text
    picture = Image.open(example_file(SEG[0]))
    overlay = Image.open(out)
    assert overlay.format == "PNG" and overlay.size == picture.size
    assert np.array_equal(np.asarray(overlay.convert("RGB")), np.asarray(want.draw()))
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["raw_text"] == want.raw_text and record["overlay"] == str(out)
    rle = record["calls"][0]["mask_rle"]
    mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    assert mask.shape == (picture.height, picture.width) and np.array_equal(mask, want.calls[0].mask)


def test_predict_json_on_stdout_has_boxes_in_pixels(demo_checkpoint, demo_pipeline, tmp_path, capsys):
    rc = main(["predict", "--model", str(demo_checkpoint), "--image", str(example_file(DET[0])), DET[1], "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    want = demo_pipeline(visual_of(DET[0]), DET[1])
    assert record["text"] == want.text and [c["task"] for c in record["calls"]] == ["det"]
    assert np.allclose(record["calls"][0]["boxes"], np.round(want.calls[0].boxes, 2))
    w, h = Image.open(example_file(DET[0])).size
    boxes = np.asarray(record["calls"][0]["boxes"])
    assert (boxes >= -1e-6).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()


def test_predict_video_writes_an_annotated_gif(demo_checkpoint, tmp_path):
    out = tmp_path / "track.gif"
    rc = main(["predict", "--model", str(demo_checkpoint), "--video", str(example_file(TRACK[0])), TRACK[1],
               "--out", str(out), "--intervention", "vhr"])
    assert rc == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 8
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["intervention"].startswith("VHR(") and np.asarray(record["calls"][0]["boxes"]).shape == (8, 4)


def test_predict_errors_are_readable(demo_checkpoint, tmp_path, capsys):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    assert main(["predict", "--model", str(demo_checkpoint), "--image", str(tmp_path / "dot.png"), "Hi."]) == 2
    assert "dot.png is 1x1 pixels" in capsys.readouterr().err
    assert main(["predict", "--model", str(demo_checkpoint), "--image", str(example_file(SEG[0])), " "]) == 2
    assert "the instruction is empty" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "nowhere"), "Hi."]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_demo_cli_defaults_and_missing_model(tmp_path, capsys):
    args = build_parser().parse_args(["demo"])
    assert (args.model, args.host, args.port) == ("tiny", "127.0.0.1", 7860)
    assert main(["demo", "--model", str(tmp_path / "absent")]) == 2  # fails before any server starts
    assert "absent" in capsys.readouterr().err


def test_demo_cli_tiny_absent_is_a_clear_error(capsys, monkeypatch, tmp_path):
    from taskmllm.zoo import SHIPPED

    monkeypatch.setitem(SHIPPED, "tiny", tmp_path / "not-installed")  # an install without the shipped weights
    assert main(["demo", "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "the shipped model 'tiny' is not in this install" in err


def test_bundled_examples_exist_and_decode():
    from taskmllm.data.media import read_image, read_video

    items = examples()
    assert {e.kind for e in items} == {"image", "video"} and any(e.file.suffix == ".jpg" for e in items)
    for e in items:
        pixels = read_video(e.file, 8) if e.kind == "video" else [read_image(e.file)]
        assert len(pixels) >= 1 and e.instruction


def test_predict_attention_png_with_the_calibrated_intervention(demo_checkpoint, tmp_path, capsys):
    """``--intervention zerotuning`` on a model carrying a calibrated ZeroTuning runs exactly those settings, and
    ``--attention`` writes both maps, whose attention on the picture equals ``attention_maps`` over the same heads."""
    import shutil

    from taskmllm.model.interventions import ZeroTuning
    from taskmllm.model.interventions.attention_map import attention_maps
    from taskmllm.model.interventions.calibrated import save_calibration
    from taskmllm.router.pipeline import Pipeline

    model = tmp_path / "model"
    shutil.copytree(demo_checkpoint, model)
    settings = {"gamma": 4.0, "heads": [[0, 1], [1, 2]]}
    save_calibration(model, {"zerotuning": settings})
    png = tmp_path / "looked.png"
    assert main(["predict", "--model", str(model), "--image", str(example_file(SEG[0])), SEG[1], "--intervention",
                 "zerotuning", "--attention", str(png), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    zt = ZeroTuning(**settings)
    assert record["intervention_settings"] == "calibrated" and record["intervention"] == repr(zt)
    pipe = Pipeline.from_pretrained(model)
    want = pipe(visual_of(SEG[0]), SEG[1], intervention=zt)
    assert record["raw_text"] == want.raw_text
    looked = record["attention"]
    assert looked["path"] == str(png) and looked["heads"] == "selected"
    batch = pipe.processor([SEG[1]], [visual_of(SEG[0])])
    heads = {0: [1], 1: [2]}
    with_zt = attention_maps(pipe.model.mllm, batch, zt, heads=heads, max_new_tokens=64)
    plain = attention_maps(pipe.model.mllm, batch, None, heads=heads, max_new_tokens=64)
    without, with_ = looked["panels"]
    assert with_["image_attention"] == pytest.approx(float(with_zt.maps[0].sum()), abs=1e-4)
    assert without["image_attention"] == pytest.approx(float(plain.maps[0].sum()), abs=1e-4)
    assert with_["answer"] == want.raw_text and without["answer"] == pipe(visual_of(SEG[0]), SEG[1]).raw_text
    w, h = Image.open(example_file(SEG[0])).size
    k = max(1.0, 256 / min(w, h))
    assert Image.open(png).size == (2 * round(w * k), round(h * k) + 30), "two panels side by side"
    assert main(["predict", "--model", str(model), "What is a circle?", "--attention", str(png)]) == 2
    assert "needs an image or a video" in capsys.readouterr().err


def test_predict_and_demo_take_a_dtype_and_a_quantization(demo_checkpoint, capsys):
    import torch

    from taskmllm.router.pipeline import Pipeline

    args = ["--dtype", "bfloat16", "--quantize", "int8"]
    rc = main(["predict", "--model", str(demo_checkpoint), "--image", str(example_file(SEG[0])), SEG[1], *args])
    assert rc == 0
    want = Pipeline.from_pretrained(demo_checkpoint, dtype=torch.bfloat16, quantize="int8")(visual_of(SEG[0]), SEG[1])
    assert capsys.readouterr().out.strip() == want.text
    demo = build_parser().parse_args(["demo", *args])
    assert (demo.dtype, demo.quantize) == ("bfloat16", "int8")
    with pytest.raises(SystemExit) as exit_:  # argparse: one line naming the choices, exit 2
        main(["predict", "--quantize", "int3", "Hi."])
    assert exit_.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
