"""The served demo driven with gradio_client as a person's script would: answers equal the Pipeline's own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taskmllm.demo.examples import example_file
from tests.demo.conftest import DET, SEG, TEXT, TRACK, assert_same_answer, oracle

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


def ask(client, name=None, instruction="", video=False, **settings):
    """One /answer call: a bundled file as the image (or the video) -> (chat, overlay, record, raw, latency,
    attention picture)."""
    file = None if name is None else handle_file(str(example_file(name)))
    return client.predict(image=None if video else file, video=[file] if video and file else None,
                          instruction=instruction, api_name="/answer", **settings)


def test_image_task_segmentation_matches_pipeline(client, demo_pipeline):
    chat, overlay, record, raw, latency, looked = ask(client, SEG[0], SEG[1])
    want = oracle(demo_pipeline, SEG[0], SEG[1])
    assert_same_answer(record, want)
    assert [c["task"] for c in record["calls"]] == ["seg"]
    assert record["calls"][0]["phrase"] == "the bottommost blue object"
    picture = Image.open(example_file(SEG[0]))
    assert record["calls"][0]["mask_rle"]["size"] == [picture.height, picture.width]
    assert raw == want["raw_text"] and "<seg>" in raw and "<seg>" not in record["text"]
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"][0]["text"] == want["text"]
    assert Image.open(overlay).size == picture.size
    assert latency.startswith("**Latency") and "generate" in latency
    assert looked is None and record["attention"] is None, "no attention picture unless asked"


def test_video_task_tracking_matches_pipeline(client, demo_pipeline):
    _, overlay, record, raw, _, _ = ask(client, TRACK[0], TRACK[1], video=True)
    assert_same_answer(record, oracle(demo_pipeline, TRACK[0], TRACK[1]))
    assert [c["task"] for c in record["calls"]] == ["track"]
    assert np.asarray(record["calls"][0]["boxes"]).shape == (8, 4) and len(record["calls"][0]["visibility"]) == 8
    gif = Image.open(overlay)
    assert gif.format == "GIF" and gif.n_frames == 8


def test_text_only_question_matches_pipeline(client, demo_pipeline):
    chat, overlay, record, _, _, _ = ask(client, None, TEXT[1])
    assert_same_answer(record, oracle(demo_pipeline, None, TEXT[1]))
    assert record["text"] == "A round shape." and record["calls"] == [] and overlay is None


def test_detection_and_vhr_setting_reach_the_pipeline(client, demo_pipeline):
    from taskmllm.model.interventions import VHR

    _, _, record, _, _, _ = ask(client, DET[0], DET[1], intervention="vhr", vhr_alpha=3.0)
    assert_same_answer(record, oracle(demo_pipeline, DET[0], DET[1], intervention=VHR(alpha=3.0)))
    assert record["intervention"].startswith("VHR(alpha=3.0")
    boxes = np.asarray(record["calls"][0]["boxes"])
    w, h = Image.open(example_file(DET[0])).size
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and (boxes[:, [0, 2]] <= w + 1e-6).all()  # pixels, not 0-999
    assert (boxes[:, [1, 3]] <= h + 1e-6).all() and len(record["calls"][0]["scores"]) == len(boxes)


def test_var_setting_reaches_the_pipeline(client, demo_pipeline):
    from taskmllm.model.interventions import VAR

    _, _, record, _, _, _ = ask(client, SEG[0], SEG[1], intervention="var", var_p=0.8, var_rho=0.4, var_tau=3.5)
    assert_same_answer(record, oracle(demo_pipeline, SEG[0], SEG[1], intervention=VAR(p=0.8, rho=0.4, tau=3.5)))
    assert record["intervention"].startswith("VAR(p=0.8, rho=0.4, tau=3.5")


def test_attention_overlay_with_and_without_the_intervention(client, demo_pipeline):
    from taskmllm.model.interventions import VHR
    from taskmllm.model.interventions.attention_map import attention_maps
    from tests.demo.conftest import visual_of

    _, _, record, raw, _, looked = ask(client, SEG[0], SEG[1], intervention="vhr", vhr_alpha=3.0, attention=True)
    assert record["intervention_settings"] == "defaults", "the test checkpoint carries no calibration"
    summary = record["attention"]
    assert summary["heads"] == "selected"
    without, with_ = summary["panels"]
    assert with_["answer"] == raw and without["answer"] == oracle(demo_pipeline, SEG[0], SEG[1])["raw_text"]
    mllm = demo_pipeline.model.mllm
    batch = demo_pipeline.processor([SEG[1]], [visual_of(SEG[0])])
    mine = attention_maps(mllm, batch, VHR(alpha=3.0), heads="selected", max_new_tokens=64)
    plain = attention_maps(mllm, batch, None, heads=mine.heads, max_new_tokens=64)
    assert with_["image_attention"] == pytest.approx(float(mine.maps[0].sum()), abs=1e-4)
    assert without["image_attention"] == pytest.approx(float(plain.maps[0].sum()), abs=1e-4)
    w, h = Image.open(example_file(SEG[0])).size
    k = max(1.0, 256 / min(w, h))
    assert Image.open(looked).size == (2 * round(w * k), round(h * k) + 30)
    _, _, record, _, _, looked = ask(client, None, TEXT[1], attention=True)
    assert looked is None and record["attention"] is None, "a text-only answer looked at no picture"


def test_zerotuning_and_calibrated_settings_reach_the_pipeline(demo_pipeline):
    """The handler (the page's callback) with a pipeline carrying calibrated settings: an untouched control runs
    the calibrated intervention, a moved one replaces that setting only."""
    from taskmllm.demo.handler import DemoHandler
    from taskmllm.model.interventions import VAR, ZeroTuning
    from taskmllm.router.pipeline import Pipeline
    from tests.demo.conftest import visual_of

    calibrated = Pipeline(demo_pipeline.model, {"zerotuning": {"gamma": 3.0, "heads": [[0, 0], [1, 3]]},
                                                "var": {"p": 0.3, "rho": 0.6, "mode": "paper"}})
    handler = DemoHandler(calibrated)
    start = handler.initial_settings()
    assert (start["zt_gamma"], start["var_p"], start["var_rho"]) == (3.0, 0.3, 0.6)
    assert start["var_tau"] == 4.0 and start["vhr_alpha"] == 2.0, "VAR's per-model tau; VHR uncalibrated: defaults"
    zt = ZeroTuning(gamma=3.0, heads=[(0, 0), (1, 3)])
    _, _, record, raw, _, _, _ = handler.answer(str(example_file(SEG[0])), None, SEG[1], [], "zerotuning",
                                                zt_gamma=start["zt_gamma"])
    assert record["intervention"] == repr(zt) and record["intervention_settings"] == "calibrated"
    assert raw == demo_pipeline(visual_of(SEG[0]), SEG[1], intervention=zt).raw_text
    _, _, record, _, _, _, _ = handler.answer(str(example_file(SEG[0])), None, SEG[1], [], "var", var_p=0.5)
    assert record["intervention"] == repr(VAR(p=0.5, rho=0.6, tau=4.0, mode="paper"))


def test_server_limits_uploads_and_binds_localhost(client, demo_url):
    assert demo_url.startswith("http://127.0.0.1:")
    assert client.config["max_file_size"] == 20 * 2**20  # DemoOptions' default; gradio refuses larger uploads


def test_chat_history_grows_within_a_session(demo_url):
    from gradio_client import Client

    client = Client(demo_url, verbose=False)  # its own session
    ask(client, None, TEXT[1])
    chat, *_ = ask(client, SEG[0], SEG[1])
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert chat[0]["content"][0]["text"] == TEXT[1] and chat[2]["content"][0]["text"] == SEG[1] + " [image]"


def _corrupt(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    return path


def _one_pixel(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    return path


def _bomb(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 megapixels in about 48 KB: a decompression bomb
    return path


def _zero_frames(tmp_path):
    import av

    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as container:  # a valid mp4 container that never received a frame
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    assert path.stat().st_size > 0
    return path


@pytest.mark.parametrize("case, slot, instruction, message", [
    ("corrupt image", "image", "Describe it.", r"cannot decode image file photo\.png: it is not a readable image"),
    ("corrupt video", "video", "Describe it.", r"cannot decode video file photo\.png"),
    ("1x1 image", "image", "Describe it.", r"dot\.png is 1x1 pixels; images must be at least 8 pixels"),
    ("0-frame video", "video", "Describe it.", r"empty\.mp4 has zero frames"),
    ("empty instruction", None, "   ", r"the instruction is empty"),
    ("decompression bomb", "image", "Describe it.", r"image bomb\.png has more than 179 megapixels \(a decompression "
                                                   r"bomb\?\); the limit is 64 megapixels"),
    ("bomb as a video frame", "video", "Describe it.", r"video bomb\.png has more than 179 megapixels"),
])
def test_bad_input_gives_a_readable_error_and_the_server_keeps_answering(client, demo_pipeline, tmp_path, case,
                                                                         slot, instruction, message):
    make = {"corrupt image": _corrupt, "corrupt video": _corrupt, "1x1 image": _one_pixel,
            "0-frame video": _zero_frames, "empty instruction": None, "decompression bomb": _bomb,
            "bomb as a video frame": _bomb}[case]
    file = handle_file(str(make(tmp_path))) if make else None
    with pytest.raises(AppError, match=message):
        client.predict(image=file if slot == "image" else None, video=[file] if slot == "video" else None,
                       instruction=instruction, api_name="/answer")
    _, _, record, _, _, _ = ask(client, None, TEXT[1])  # the next request is served normally
    assert record["text"] == "A round shape."


@pytest.mark.parametrize("settings, message", [
    ({"max_new_tokens": "many"}, r"max new tokens must be a number, got 'many'"),
    ({"max_new_tokens": 2.5}, r"max new tokens must be a finite integer, got 2.5"),
    ({"temperature": None, "do_sample": True}, r"temperature must be a number, got None"),
    ({"top_p": 0.0, "do_sample": True}, r"top_p must be a finite number in \(0, 1\], got 0.0"),
    ({"instruction": 5}, r"the instruction must be a string, got int 5"),
])
def test_bad_api_settings_are_named_and_the_server_keeps_answering(client, settings, message):
    """A script calling the API may send anything: the page's own sliders cannot, so the handler checks it."""
    call = {"image": None, "video": None, "instruction": TEXT[1], **settings}
    with pytest.raises(AppError, match=message):
        client.predict(api_name="/answer", **call)
    _, _, record, _, _, _ = ask(client, None, TEXT[1])
    assert record["text"] == "A round shape."


def test_eight_concurrent_requests_all_complete_correctly(demo_url, demo_pipeline):
    from gradio_client import Client

    requests = [SEG, DET, TRACK, TEXT] * 2
    jobs = []
    for name, instruction, _ in requests:  # eight users: each session has its own chat (history)
        client = Client(demo_url, verbose=False)
        file = None if name is None else handle_file(str(example_file(name)))
        video = name is not None and name.endswith(".gif")
        jobs.append(client.submit(image=None if video else file, video=[file] if video else None,
                                  instruction=instruction, api_name="/answer"))
    results = [job.result(timeout=120) for job in jobs]
    wants = {name: oracle(demo_pipeline, name, instruction) for name, instruction, _ in requests[:4]}
    for (name, _, _), (_, _, record, _, _, _) in zip(requests, results):
        assert_same_answer(record, wants[name])
