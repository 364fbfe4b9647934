"""The demo batches concurrent requests: requests with the same settings share one Pipeline call (grouped by
:func:`batch_key`, at most ``max_batch_size``), each keeps its own answer, error and chat history, and every answer
is the one the request gets alone."""

from __future__ import annotations

import threading
import time

import pytest

from taskmllm.demo.batching import RequestBatcher, batch_key
from taskmllm.demo.examples import example_file
from taskmllm.errors import ConfigError, InputError, PromptTooLongError
from taskmllm.predict import GenerationSettings
from tests.demo.conftest import (CHAT, CHAT_PICTURE, DET, SEG, TEXT, TRACK, assert_same_answer, free_port, oracle,
                                 visual_of)


def _submit_all(batcher, jobs):
    """Submit ``(key, item)`` jobs from one thread each, in order (each queued before the next starts); the
    outcome of each (its result or its exception), in order."""
    outcomes = [None] * len(jobs)
    threads = []

    def run(i, key, item):
        try:
            outcomes[i] = batcher.submit(key, item)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcomes[i] = exc

    for i, (key, item) in enumerate(jobs):
        queued = len(batcher._queue)
        threads.append(threading.Thread(target=run, args=(i, key, item)))
        threads[-1].start()
        deadline = time.monotonic() + 2  # a request taken off the queue at once may be missed here
        while len(batcher._queue) == queued and threads[-1].is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
    return threads, outcomes


def test_requests_are_grouped_by_key_oldest_first_at_most_max_batch_size():
    groups, started, release = [], threading.Event(), threading.Event()

    def run_batch(items):
        groups.append(list(items))
        started.set()
        release.wait(10)  # the first group holds the model while the others queue
        return [f"answer {item}" for item in items]

    batcher = RequestBatcher(run_batch, max_batch_size=2, max_wait_s=0)
    first, outcome = _submit_all(batcher, [("a", "a1")])
    assert started.wait(10)
    threads, outcomes = _submit_all(batcher, [("a", "a2"), ("b", "b1"), ("a", "a3"), ("b", "b2"), ("a", "a4")])
    release.set()
    for t in first + threads:
        t.join(10)
    assert groups == [["a1"], ["a2", "a3"], ["b1", "b2"], ["a4"]]
    assert outcome + outcomes == [f"answer {x}" for x in ("a1", "a2", "b1", "a3", "b2", "a4")]


def test_an_error_reaches_only_its_own_request():
    started, release = threading.Event(), threading.Event()

    def run_batch(items):
        started.set()
        release.wait(10)
        if "crash" in items:
            raise RuntimeError("the batch failed")
        return [InputError(f"bad {item}") if item.startswith("bad") else item.upper() for item in items]

    batcher = RequestBatcher(run_batch, max_batch_size=4, max_wait_s=0)
    first, _ = _submit_all(batcher, [("k", "warm")])
    assert started.wait(10)
    threads, outcomes = _submit_all(batcher, [("k", "ok"), ("k", "bad one"), ("k", "fine")])
    release.set()
    for t in first + threads:
        t.join(10)
    assert outcomes[0] == "OK" and outcomes[2] == "FINE"
    assert isinstance(outcomes[1], InputError) and str(outcomes[1]) == "bad bad one"
    threads, outcomes = _submit_all(batcher, [("k", "crash")])
    threads[0].join(10)
    assert isinstance(outcomes[0], RuntimeError), "an exception of the batch run reaches its requests"
    assert batcher.submit("k", "again") == "AGAIN", "and the batcher keeps serving"


def test_a_request_at_an_idle_model_waits_for_others_to_join():
    groups = []
    batcher = RequestBatcher(lambda items: groups.append(list(items)) or list(items), max_batch_size=2,
                             max_wait_s=5.0)
    start = time.monotonic()
    threads, outcomes = _submit_all(batcher, [("k", 1), ("k", 2)])
    for t in threads:
        t.join(10)
    assert groups == [[1, 2]] and outcomes == [1, 2]
    assert time.monotonic() - start < 4, "a full batch runs at once"
    alone = RequestBatcher(lambda items: list(items), max_batch_size=4, max_wait_s=0.2)
    start = time.monotonic()
    assert alone.submit("k", 3) == 3 and 0.15 < time.monotonic() - start < 3


def test_batch_key_groups_same_settings_and_intervention_only():
    greedy, shorter = GenerationSettings(), GenerationSettings(max_new_tokens=8)
    vhr, other = object(), object()
    assert batch_key(None, greedy) == batch_key(None, GenerationSettings())
    assert batch_key(vhr, greedy) == batch_key(vhr, GenerationSettings())
    assert batch_key(None, greedy) != batch_key(None, shorter)
    assert batch_key(None, greedy) != batch_key(vhr, greedy) and batch_key(vhr, greedy) != batch_key(other, greedy)
    assert batch_key(None, GenerationSettings(repetition_penalty=1.2)) != batch_key(None, greedy)
    sampled = GenerationSettings(do_sample=True, seed=3)
    assert batch_key(None, sampled) != batch_key(None, sampled), "a sampled request is never merged"


@pytest.mark.parametrize("size, wait", [(0, 0.0), (2, -1.0), (True, 0.0)])
def test_bad_batch_options_are_config_errors(size, wait):
    with pytest.raises(ConfigError):
        RequestBatcher(lambda items: items, max_batch_size=size, max_wait_s=wait)


def _answer_together(handler, calls):
    """``handler.answer(*args, **kwargs)`` for each call, from one thread each, started together."""
    results = [None] * len(calls)

    def run(i, args, kwargs):
        results[i] = handler.answer(*args, **kwargs)

    threads = [threading.Thread(target=run, args=(i, *call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_the_handler_batches_same_settings_and_falls_back_to_single_calls(demo_pipeline):
    """Through the page's callback: same settings -> one call of two; a request with another setting runs alone;
    when the batched call fails (a conversation too long for the model), each request runs alone with its own
    answer (the too-long one drops its oldest turn, as it does alone)."""
    from taskmllm.demo.handler import DemoHandler, DemoOptions, _visual_key

    handler = DemoHandler(demo_pipeline, DemoOptions(concurrency_limit=4, max_batch_size=4, batch_wait_s=3.0))
    seg = str(example_file(SEG[0]))
    got = _answer_together(handler, [((seg, None, SEG[1], []), {}), ((None, None, TEXT[1], []), {}),
                                     ((seg, None, SEG[1], []), {"max_new_tokens": 5})])
    assert [r[2]["batch_size"] for r in got] == [2, 2, 1]
    assert_same_answer(got[0][2], oracle(demo_pipeline, SEG[0], SEG[1]))
    assert_same_answer(got[1][2], oracle(demo_pipeline, None, TEXT[1]))
    assert_same_answer(got[2][2], oracle(demo_pipeline, SEG[0], SEG[1], max_new_tokens=5))
    long = "Describe every shape in the picture, one by one, with its colour and place. " * 25
    history = [{"role": "user", "content": long, "prompt": long, "visual": _visual_key(seg, None)},
               {"role": "assistant", "content": "Noted.", "raw": "Noted."}]
    with pytest.raises(PromptTooLongError):
        demo_pipeline.chat(visual_of(SEG[0]), [("user", long), ("assistant", "Noted."), ("user", SEG[1])])
    got = _answer_together(handler, [((seg, None, SEG[1], history), {}), ((None, None, TEXT[1], []), {})])
    assert [r[2]["batch_size"] for r in got] == [1, 1], "the batch failed: each request alone"
    assert_same_answer(got[0][2], oracle(demo_pipeline, SEG[0], SEG[1]))
    assert_same_answer(got[1][2], oracle(demo_pipeline, None, TEXT[1]))


def test_the_compile_option_decodes_through_the_compiled_step_with_the_same_answers(demo_pipeline):
    """``DemoOptions(compile=True)``: a request without an intervention (alone and in a batch of two) is decoded by
    the model's compiled step and answers as the Pipeline does; one with an intervention runs the default decoder
    (a compiled call with an intervention would be refused)."""
    from taskmllm.demo.handler import DemoHandler, DemoOptions

    handler = DemoHandler(demo_pipeline, DemoOptions(concurrency_limit=2, max_batch_size=2, batch_wait_s=3.0,
                                                     compile=True))
    steps = demo_pipeline.model.mllm.decode_steps._steps
    steps.clear()
    seg = str(example_file(SEG[0]))
    got = _answer_together(handler, [((seg, None, SEG[1], []), {}), ((None, None, TEXT[1], []), {})])
    assert [r[2]["batch_size"] for r in got] == [2, 2] and len(steps) == 1
    assert_same_answer(got[0][2], oracle(demo_pipeline, SEG[0], SEG[1]))
    assert_same_answer(got[1][2], oracle(demo_pipeline, None, TEXT[1]))
    alone = handler.answer(None, None, TEXT[1], [], intervention="vhr")
    assert_same_answer(alone[2], oracle(demo_pipeline, None, TEXT[1], intervention=demo_pipeline.intervention("vhr")))


@pytest.fixture(scope="module")
def batching_url(demo_pipeline):
    """The demo with batches of 2 and a long wait at an idle model: two requests sent together share a call."""
    from taskmllm.demo.app import build_demo, launch
    from taskmllm.demo.handler import DemoOptions

    demo = build_demo(demo_pipeline, DemoOptions(concurrency_limit=4, max_batch_size=2, batch_wait_s=3.0))
    url = launch(demo, host="127.0.0.1", port=free_port(), block=False)
    yield url
    demo.close()


def _together(requests):
    """Each ``(client, kwargs)`` submitted to /answer at once; their outputs in order."""
    jobs = [client.submit(api_name="/answer", **kwargs) for client, kwargs in requests]
    return [job.result(timeout=120) for job in jobs]


def test_two_concurrent_users_get_the_answers_they_get_alone(batching_url, demo_pipeline):
    pytest.importorskip("gradio_client")
    from gradio_client import Client, handle_file

    def request(name, instruction, **settings):
        file = None if name is None else handle_file(str(example_file(name)))
        video = name is not None and name.endswith(".gif")
        return {"image": None if video else file, "video": [file] if video else None, "instruction": instruction,
                **settings}

    alice, bob = Client(batching_url, verbose=False), Client(batching_url, verbose=False)
    for a, b in [(SEG, TEXT), (TRACK, DET)]:
        outputs = _together([(alice, request(a[0], a[1])), (bob, request(b[0], b[1]))])
        for (name, instruction, _), (_, _, record, _, _, _) in zip((a, b), outputs):
            assert record["batch_size"] == 2, "one batched call"
            assert_same_answer(record, oracle(demo_pipeline, name, instruction))
    # other settings: not merged, and each still its own answer
    outputs = _together([(alice, request(SEG[0], SEG[1])), (bob, request(DET[0], DET[1], max_new_tokens=4))])
    assert [o[2]["batch_size"] for o in outputs] == [1, 1]
    assert_same_answer(outputs[0][2], oracle(demo_pipeline, SEG[0], SEG[1]))
    assert_same_answer(outputs[1][2], oracle(demo_pipeline, DET[0], DET[1], max_new_tokens=4))


def test_batched_chats_keep_each_sessions_history(batching_url):
    """Two sessions chat about the same picture at once, turn by turn in shared calls: each third answer names its
    own session's first turn (Gradio's batch=True would give both the first session's history)."""
    from gradio_client import Client, handle_file

    sessions = {color: Client(batching_url, verbose=False) for color in ("red", "blue")}
    picture = handle_file(str(example_file(CHAT_PICTURE)))
    for turn in range(3):
        outputs = _together([(client, {"image": picture, "video": None, "instruction": CHAT[color][turn][0]})
                             for color, client in sessions.items()])
        for color, (chat, _, record, _, _, _) in zip(sessions, outputs):
            assert record["batch_size"] == 2
            assert record["text"] == CHAT[color][turn][1], (color, turn)
            assert len(chat) == 2 * (turn + 1)


def test_demo_cli_batching_options(demo_checkpoint, monkeypatch):
    import taskmllm.demo.app as app
    from taskmllm.cli import build_parser, main

    args = build_parser().parse_args(["demo"])
    assert (args.concurrency, args.max_batch_size, args.batch_wait_ms) == (8, 8, 10)
    seen = {}
    monkeypatch.setattr(app, "launch", lambda demo, host, port, options: seen.setdefault("options", options))
    assert main(["demo", "--model", str(demo_checkpoint), "--max-batch-size", "3", "--batch-wait-ms", "25"]) == 0
    options = seen["options"]
    assert (options.max_batch_size, options.batch_wait_s, options.concurrency_limit) == (3, 0.025, 8)
    assert not options.compile
    seen.clear()
    assert main(["demo", "--model", str(demo_checkpoint), "--compile"]) == 0
    assert seen["options"].compile is True

