"""The Gradio demo: ``build_demo(pipeline) -> gr.Blocks`` and :func:`launch`.

    from taskmllm import Pipeline
    from taskmllm.demo.app import build_demo, launch
    launch(build_demo(Pipeline.from_pretrained("tiny")), host="127.0.0.1", port=7860)

The page: image or video input (a video file, an animated GIF or several frame images), an instruction box,
chat history, the overlay (masks in distinct colors labelled with their ``<ref>`` phrase, boxes with scores,
tracks as an annotated GIF), VHR/VAR/ZeroTuning with their main settings (starting at the model's calibrated
settings when it carries them), where the answer looked (its attention over the picture with and without the
intervention), generation settings, examples (ShapesWorld and real photos), latency, the structured answer (JSON)
and the raw transcript with task tokens. One API endpoint, ``/answer``, serves the page and ``gradio_client``
alike; concurrent requests with the same settings are answered by one batched Pipeline call
(``DemoOptions.max_batch_size``, :mod:`taskmllm.demo.batching`). No model logic lives here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import gradio as gr

from taskmllm.data.media import CONTAINER_SUFFIXES, IMAGE_SUFFIXES
from taskmllm.demo.examples import examples as bundled_examples
from taskmllm.demo.handler import DemoHandler, DemoOptions
from taskmllm.errors import ConfigError

if TYPE_CHECKING:
    from taskmllm.router.pipeline import Pipeline

INTRO = ("**taskmllm** answers about an image or a video; task tokens route to expert heads: `<seg>` masks, "
         "`<det>` boxes, `<track>` a box per frame. The chat keeps its history: each answer sees the earlier "
         "turns about the same picture (Clear starts a new chat).")
# small pictures (ShapesWorld is 128 px) are shown enlarged, pixels kept sharp
CSS = ("#overlay img, #input-image img { width: 100%; height: 100%; object-fit: contain; "
       "image-rendering: pixelated; }")


def build_demo(pipeline: "Pipeline", options: DemoOptions = DemoOptions()) -> gr.Blocks:
    """The demo page for ``pipeline`` (a :class:`~taskmllm.router.pipeline.Pipeline`), queued with
    ``options.concurrency_limit``. Start it with :func:`launch` (or ``gr.Blocks.launch``)."""
    if options.concurrency_limit < 1 or options.max_queue < 1:
        raise ConfigError(f"concurrency_limit and max_queue must be >= 1, got {options}")
    handler = DemoHandler(pipeline, options)
    hidden = handler.hidden_size
    tau_max = math.floor((math.sqrt(hidden) - 0.01) * 100) / 100
    start = handler.initial_settings()
    calibrated = sorted(pipeline.calibration)
    limits = options.limits
    # delete_cache: uploads and answers older than 2 h are removed hourly from Gradio's cache
    with gr.Blocks(title=options.title, analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
        gr.Markdown(f"# {options.title}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=260,
                                 elem_id="input-image")
                video = gr.File(label=f"Video — mp4/webm/mov/avi/mkv or GIF, or several frame images "
                                      f"(≤ {limits.max_video_seconds:g} s, sampled to {handler.num_frames} frames)",
                                file_count="multiple", file_types=[".gif", *CONTAINER_SUFFIXES, *IMAGE_SUFFIXES],
                                height=110, elem_id="input-video")
                instruction = gr.Textbox(label="Instruction", placeholder="Segment the red circle.", lines=2,
                                         elem_id="instruction")
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Hallucination reduction: VHR / VAR / ZeroTuning", open=False):
                    note = (f"calibrated for this model: {', '.join(calibrated)}" if calibrated
                            else "not calibrated for this model: defaults (`taskmllm calibrate`)")
                    intervention = gr.Radio(["none", "vhr", "var", "zerotuning"], value="none", label="Intervention",
                                            info=f"training-free attention interventions at inference; {note}")
                    vhr_alpha = gr.Slider(0.1, 4.0, value=start["vhr_alpha"], step=0.05, label="VHR alpha",
                                          info="factor on vision-aware heads (1 = off)")
                    var_p = gr.Slider(0.0, 1.0, value=start["var_p"], step=0.05, label="VAR p",
                                      info="fraction of sink attention moved to image tokens (0 = off)")
                    var_rho = gr.Slider(0.0, 1.0, value=start["var_rho"], step=0.05, label="VAR rho",
                                        info="image-centric head threshold")
                    var_tau = gr.Slider(1.0, tau_max, value=round(start["var_tau"], 2), step=0.01,
                                        label="VAR tau", info="massive-activation threshold of a sink token")
                    zt_gamma = gr.Slider(0.1, 4.0, value=start["zt_gamma"], step=0.05, label="ZeroTuning gamma",
                                         info="scale of the first token's attention in the chosen heads (1 = off)")
                    attention = gr.Checkbox(value=False, label="Show where the answer looked",
                                            info="its attention over the picture, with and without the intervention")
                with gr.Accordion("Generation", open=False):
                    max_new_tokens = gr.Slider(1, 256, value=64, step=1, label="Max new tokens")
                    do_sample = gr.Checkbox(value=False, label="Sample (greedy when off)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    repetition_penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Repetition penalty",
                                                   info="divides the scores of ids already seen (1 = off)")
                    no_repeat_ngram_size = gr.Slider(0, 8, value=0, step=1, label="No-repeat n-gram size",
                                                     info="no n-gram of this size twice (0 = off)")
                    score_threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Box score threshold",
                                                info="boxes scoring lower are not drawn")
            with gr.Column(scale=1):
                chat = gr.Chatbot(label="Chat", height=240, elem_id="chat")
                overlay = gr.Image(label="Overlay", type="filepath", interactive=False, height=300,
                                   elem_id="overlay")
                latency = gr.Markdown(elem_id="latency")
                looked = gr.Image(label="Where the answer looked (without | with the intervention)", type="filepath",
                                  interactive=False, height=260, elem_id="attention")
                answer_json = gr.JSON(label="Structured answer", elem_id="answer-json")
                with gr.Accordion("Raw transcript (with task tokens)", open=False):
                    raw = gr.Textbox(show_label=False, lines=3, interactive=False, elem_id="raw-transcript")
        history = gr.State([])
        rows = [[str(e.file) if e.kind == "image" else None, [str(e.file)] if e.kind == "video" else None,
                 e.instruction]
                for e in bundled_examples()]
        gr.Examples(rows, inputs=[image, video, instruction], label="Examples (ShapesWorld and photos)",
                    elem_id="examples")
        inputs = [image, video, instruction, history, intervention, vhr_alpha, var_p, var_rho, var_tau,
                  max_new_tokens, do_sample, temperature, top_p, seed, score_threshold, zt_gamma, attention,
                  repetition_penalty, no_repeat_ngram_size]
        outputs = [chat, overlay, answer_json, raw, latency, looked, history]
        # preprocess=False: uploads reach the handler as files, decoded (and rejected) by taskmllm itself
        submit.click(handler.answer, inputs, outputs, api_name="answer", preprocess=False,
                     concurrency_limit=options.concurrency_limit)
        instruction.submit(handler.answer, inputs, outputs, api_name=False, preprocess=False,
                           concurrency_limit=options.concurrency_limit)
        clear.click(lambda: ([], None, None, "", "", None, [], None, None, ""), None,
                    outputs + [image, video, instruction], api_name=False)
    demo.queue(max_size=options.max_queue, default_concurrency_limit=options.concurrency_limit)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: Optional[int] = 7860,
           options: DemoOptions = DemoOptions(), block: bool = True) -> str:
    """Serve ``demo`` on ``host:port`` (localhost by default; ``port`` None picks a free one) with the upload
    size limit of ``options``; returns the local URL. ``block=False`` returns while the server runs."""
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                            max_file_size=int(options.limits.max_file_mb * 2**20), show_error=False, quiet=not block,
                            share=False, ssr_mode=False, footer_links=["api"], css=CSS)
    return url
