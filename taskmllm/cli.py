"""The ``taskmllm`` console script. Each subcommand parses its arguments and calls one library function.

``HF_HUB_OFFLINE=1`` is set here, before transformers is imported: nothing taskmllm runs downloads weights.

Errors never reach the terminal as a traceback: a bad flag or value, and every error of the project
(:class:`~taskmllm.errors.TaskMLLMError`) or of the file system, is one line on stderr and exit code 2; anything
else is one line naming the log file that holds its traceback, and exit code 1 (:func:`main`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from taskmllm.cli_args import (OneLineParser, check_host, check_outputs, device_name, finite_float, nonnegative_int, port_number,
                               positive_float, positive_int, run_command)
from taskmllm.cli_data import REPLAY_PROMPTS, add_data_commands  # noqa: F401 (REPLAY_PROMPTS: public)
from taskmllm.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _convert(args: argparse.Namespace) -> int:
    from taskmllm.model.llava import import_llava_hf

    check_outputs(folder=args.dst, what="convert: destination")
    model = import_llava_hf(args.src)  # a plain MLLM: a stage's `model.init: DST` adds task tokens and experts
    model.save_pretrained(args.dst)
    print(f"converted {args.src} -> {args.dst}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    check_outputs(folder=args.out, what="calibrate --out")
    from pathlib import Path

    from taskmllm.eval.calibration_run import CalibrationOptions, calibrate_model, summary_lines
    from taskmllm.model.interventions.calibrated import save_calibration, weights_fingerprint
    from taskmllm.router.pipeline import Pipeline
    from taskmllm.training.card import update_card_interventions
    from taskmllm.zoo import calibration_dir, resolve_checkpoint

    given = {"alphas": args.alphas, "ps": args.ps, "rhos": args.rhos, "taus": args.taus, "gammas": args.gammas}
    grids: dict = {k: tuple(v) for k, v in given.items() if v is not None}
    grids.update({k: v for k, v in (("seed", args.seed), ("profile_n", args.profile_n)) if v is not None})
    options = CalibrationOptions(n=args.n, split=args.split, batch_size=args.batch_size, var_mode=args.var_mode,
                                 profile=args.profile, progress=not args.no_progress,
                                 **grids)  # bad options fail before the model loads
    dest = Path(args.out) if args.out is not None else calibration_dir(args.model)
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    calibration = calibrate_model(pipe, args.intervention, options)
    dest.mkdir(parents=True, exist_ok=True)
    path = save_calibration(dest, {args.intervention: calibration.result.chosen()},
                            {args.intervention: calibration.record()},
                            weights=weights_fingerprint(resolve_checkpoint(args.model)))
    card = update_card_interventions(dest)
    print("\n".join(summary_lines(calibration)))
    print(f"wrote {path}" + (f" and updated {card}" if card is not None else ""))
    return 0


def _eval(args: argparse.Namespace) -> int:
    check_outputs(folder=args.out, what="eval --out")
    from taskmllm.eval.benchmarks import EvalOptions, evaluate

    seed = {} if args.seed is None else {"seed": args.seed}
    options = EvalOptions(n=args.n, batch_size=args.batch_size, progress=not args.no_progress,
                          pope_questions=tuple(args.pope_questions or ()), images=args.images or args.image_root,
                          instances=args.instances, captions=args.captions, tasks=args.tasks, **seed,
                          **_annotation_options(args))
    report = evaluate(args.model, args.suite, args.out, options, intervention=args.intervention, tau=args.tau,
                      max_new_tokens=args.max_new_tokens, device=args.device,
                      generation={"repetition_penalty": args.repetition_penalty,
                                  "no_repeat_ngram_size": args.no_repeat_ngram_size},
                      dtype=_dtype(args), quantize=args.quantize)
    print(report.markdown_path.read_text(), end="")
    print(f"wrote {report.json_path}, {report.markdown_path} and {len(report.plot_paths)} plot(s) to {args.out}")
    return 0


def _add_repetition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="divide the logits of ids already seen (prompt included) by this (CTRL; 1.0 = off)")
    p.add_argument("--no-repeat-ngram-size", type=nonnegative_int, default=0,
                   help="no n-gram of this size twice in prompt + answer (0 = off)")


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="the weights' and activations' dtype (default: as stored)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="integer weights for the LLM's linear layers (inference only; int4: CPU only); on a CPU "
                        "with --dtype bfloat16 (--dtype bfloat16 --quantize int8 decodes smol fastest there)")


def _pipeline(args: argparse.Namespace):
    """The Pipeline of ``--model`` on ``--device`` with ``--dtype`` / ``--quantize``."""
    from taskmllm.router.pipeline import Pipeline

    return Pipeline.from_pretrained(args.model, device=args.device, dtype=_dtype(args), quantize=args.quantize)


def _dtype(args: argparse.Namespace):
    """``--dtype`` as a torch dtype (None: as stored)."""
    import torch

    return None if args.dtype is None else getattr(torch, args.dtype)


def _model(args: argparse.Namespace):
    """``--model`` as given, or its loaded Pipeline when ``--dtype`` / ``--quantize`` ask for another precision."""
    return args.model if args.dtype is None and args.quantize is None else _pipeline(args)


def _annotation_options(args: argparse.Namespace) -> dict:
    """The EvalOptions of the suites on annotation files (refcoco, coco, mot)."""
    return {"data": args.data, "split": args.split, "clip_len": args.clip_len, "stride": args.stride,
            "templates": args.templates}


def _add_annotation_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="annotation file or folder: refs JSON (refcoco), instances JSON (coco), MOT "
                                  "sequence or folder of sequences (mot)")
    p.add_argument("--image-root", help="folder the annotation file's image paths are relative to (refcoco, coco)")
    p.add_argument("--split", default=None, help="refs of this split only (refcoco; default: all)")
    p.add_argument("--clip-len", type=positive_int, default=None, help="frames per clip (mot; default: the model's max_frames)")
    p.add_argument("--stride", type=positive_int, default=1, help="keep every n-th frame (mot)")
    p.add_argument("--templates", default=None, help="question templates YAML replacing the shipped paraphrases")


def _train(args: argparse.Namespace) -> int:
    from taskmllm.training.config import load_config

    cfg = load_config(args.config, args.overrides)
    from taskmllm.training.train import train

    print(f"trained {cfg.stage.name}: {train(cfg)}")
    return 0


def _train_recipe(args: argparse.Namespace) -> int:
    from taskmllm.training.recipe_run import run_recipe

    model = run_recipe(args.recipe, args.out, args.overrides, args.ship, args.skip_eval)
    print(f"trained recipe {args.recipe}: {model}" + (f"; shipped to {args.ship}" if args.ship else ""))
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    if args.requests is not None:
        return _predict_requests(args)
    if args.out_dir is not None or args.batch_size is not None:
        raise ConfigError("--out-dir and --batch-size go with --requests FILE.jsonl (a single request: --out FILE)")
    if args.instruction is None:
        raise ConfigError('give an instruction (taskmllm predict --image photo.png "Is there a dog?") or a file of '
                          "requests (--requests FILE.jsonl --out-dir DIR)")
    json_path = None if args.out is None else os.path.splitext(args.out)[0] + ".json"
    for flag, path in (("--out", args.out), ("--out (its .json)", json_path), ("--attention", args.attention)):
        check_outputs(file=path, what=f"predict {flag}")
    from taskmllm.predict import predict

    pred = predict(_model(args), args.instruction, image=args.image, video=args.video, out=args.out,
                   json_path=json_path, intervention=args.intervention, settings=_settings(args), device=args.device,
                   attention=args.attention)
    print(json.dumps(pred.record, indent=2) if args.json else pred.result.text)
    for path in (pred.overlay_path, pred.json_path, pred.attention_path):
        if path is not None:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _settings(args: argparse.Namespace):
    from taskmllm.predict import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size)


def _predict_requests(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("an instruction", args.instruction), ("--image", args.image),
                                      ("--video", args.video), ("--out", args.out), ("--attention", args.attention))
             if value is not None]
    if given:
        raise ConfigError(f"--requests takes each request's instruction and picture from the file; drop "
                          f"{', '.join(given)} (outputs go to --out-dir)")
    check_outputs(folder=args.out_dir, what="predict --out-dir")
    from taskmllm.predict_requests import predict_requests, print_answers

    answers = predict_requests(_model(args), args.requests, args.out_dir, args.batch_size or 8,
                               intervention=args.intervention, device=args.device, settings=_settings(args))
    return print_answers(answers, as_json=args.json, out_dir=args.out_dir)


def _demo(args: argparse.Namespace) -> int:
    from taskmllm.data.media import MediaLimits

    limits = MediaLimits(max_file_mb=args.max_upload_mb, max_video_seconds=args.max_video_seconds)
    pipe = _pipeline(args)  # a missing model fails before gradio loads
    try:
        from taskmllm.demo.app import build_demo, launch
        from taskmllm.demo.handler import DemoOptions
    except ImportError as exc:
        print(f"taskmllm: error: the demo needs the demo extra ({exc}): pip install 'taskmllm[demo]'",
              file=sys.stderr)
        return 2
    options = DemoOptions(limits, concurrency_limit=args.concurrency, max_queue=args.max_queue,
                          max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                          compile=args.compile)
    launch(build_demo(pipe, options), host=args.host, port=args.port, options=options)
    return 0


INTERVENTION_CHOICES = ["none", "vhr", "var", "zerotuning"]
INTERVENTION_HELP = ("training-free hallucination reduction, with the model's calibrated settings (interventions.json, "
                     "`taskmllm calibrate`) when it carries them, else each method's defaults")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="choose an intervention's settings on the val world; writes interventions.json",
                       description="Grid-search VHR (alpha x layer sets), VAR (p x rho x tau) or ZeroTuning (profiled "
                                   "head types x gamma) on POPE and CHAIR of ShapesWorld's val world; objective POPE "
                                   "accuracy - CHAIR_S, caption recall may drop <= 0.02, must beat the plain model "
                                   "by 0.01 (else the identity is stored). Writes interventions.json (merged) beside "
                                   "a checkpoint directory, or for a shipped model's name into "
                                   "~/.config/taskmllm/calibration/NAME/ (read by Pipeline.from_pretrained(NAME)); "
                                   "--out DIR writes DIR/interventions.json instead.")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or a shipped model's name (default: tiny)")
    p.add_argument("--intervention", required=True, choices=["vhr", "var", "zerotuning"])
    p.add_argument("--split", default="val", choices=["val", "train"], help="ShapesWorld split to calibrate on")
    p.add_argument("--n", type=positive_int, default=40, help="val images (POPE questions about each + one caption each)")
    p.add_argument("--out", default=None, help="directory for interventions.json (default: see above)")
    p.add_argument("--seed", type=nonnegative_int, default=None, help="world seed (default: the evaluation world's)")
    p.add_argument("--var-mode", default="official", choices=["official", "paper"], help="VAR's mode in the grid")
    p.add_argument("--alphas", type=finite_float, nargs="+", help="VHR alphas (default 1.25 1.5 2)")
    p.add_argument("--ps", type=finite_float, nargs="+", help="VAR p, the fraction moved (default 0.2 0.4 0.6)")
    p.add_argument("--rhos", type=finite_float, nargs="+", help="VAR rho (default 0.3 0.5 0.8)")
    p.add_argument("--taus", type=finite_float, nargs="+", help="VAR tau (default: the per-model tau)")
    p.add_argument("--gammas", type=finite_float, nargs="+", help="ZeroTuning gammas (default 0.5 0.75 1.25 1.5 2)")
    p.add_argument("--profile", default="scaled", choices=["scaled", "gradient"],
                   help="ZeroTuning's head profile: each head scaled up and down alone (the paper; 2 x heads + 1 "
                        "forwards) or its first-order estimate from one backward (for LMs with many heads)")
    p.add_argument("--profile-n", type=positive_int, default=None,
                   help="val images whose POPE questions profile ZeroTuning's heads (default: --n)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=_calibrate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (also used to render ``--help``)."""
    parser = OneLineParser(prog="taskmllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="import a local checkpoint of another format")
    p.add_argument("format", choices=["llava-hf"], help="source format")
    p.add_argument("src", help="local transformers LLaVA checkpoint directory")
    p.add_argument("dst", help="output taskmllm checkpoint directory")
    p.set_defaults(func=_convert)

    _add_calibrate(sub)

    p = sub.add_parser("eval", help="run a named evaluation suite; writes results.json, results.md and PNG plots")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or a shipped model's name (default: tiny)")
    p.add_argument("--suite", required=True, choices=["shapes", "pope-shapes", "chair-shapes", "pope", "chair",
                                                      "refcoco", "coco", "mot"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=positive_int, default=None,
                   help="questions per task (shapes) / images (pope-shapes, chair-shapes, chair) / questions per "
                        "file (pope) / sentences (refcoco), images (coco), tracks (mot); default 200 for "
                        "ShapesWorld suites, everything for real data")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="shapes suite: only these tasks (e.g. exist color count; default all)")
    p.add_argument("--intervention", choices=INTERVENTION_CHOICES, default=None, help=INTERVENTION_HELP)
    p.add_argument("--tau", type=positive_float, default=None,
                   help="VAR sink threshold (default min(20, 0.5*sqrt(hidden size)); must be < sqrt(hidden size))")
    p.add_argument("--seed", type=nonnegative_int, default=None,
                   help="evaluation world / image-sample seed (default: one never used for training)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the suite's")
    _add_repetition_args(p)
    p.add_argument("--device", type=device_name, default="cpu")
    _add_weight_args(p)
    p.add_argument("--pope-questions", nargs="+", help="POPE question files, one per split (suite pope)")
    p.add_argument("--images", help="image folder (suites pope, chair)")
    p.add_argument("--instances", help="COCO instances JSON (suites chair, refcoco)")
    p.add_argument("--captions", help="COCO captions JSON (suite chair)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_annotation_eval_args(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("train", help="run one training stage: taskmllm train RECIPE/STAGE.yaml [--a.b=c ...]")
    p.add_argument("config", help="stage YAML, e.g. taskmllm/training/recipes/tiny/pretrain.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--a.b=value config overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("train-recipe", help="train every stage of a recipe, evaluate it and write its model card")
    p.add_argument("recipe", help="recipe name (tiny) or folder with recipe.yaml")
    p.add_argument("--out", required=True, help="run directory (resumable: finished stages are skipped)")
    p.add_argument("--ship", default=None, help="copy the final model + card here (e.g. taskmllm/assets/tiny/model)")
    p.add_argument("--skip-eval", action="store_true", help="train only")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--a.b=value overrides for every stage")
    p.set_defaults(func=_train_recipe)

    p = sub.add_parser("predict", help="answer an instruction about an image or a video; write the overlay + JSON",
                       description="taskmllm predict --image PATH|--video PATH \"instruction\" [--out overlay.png] "
                                   "[--json]. --out also writes the JSON record (masks as COCO RLE, boxes in "
                                   "pixels) beside the overlay, with the suffix .json. Many requests: --requests "
                                   'FILE.jsonl, a JSON object per line {"image"|"video": PATH, "prompt": TEXT, "id": '
                                   "NAME} (paths relative to FILE), batched; --out-dir DIR gets ID.png|gif + ID.json.")
    p.add_argument("instruction", nargs="?", help='e.g. "Segment the red circle." (not with --requests)')
    p.add_argument("--requests", metavar="FILE.jsonl", default=None,
                   help="answer every request of this JSON-lines file (see above) instead of one instruction")
    p.add_argument("--out-dir", default=None, help="with --requests: write ID.png|gif and ID.json per request here")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="with --requests: requests per batched model call (default 8)")
    visual = p.add_mutually_exclusive_group()
    visual.add_argument("--image", help="image file (png, jpg, webp, bmp, tiff, gif)")
    visual.add_argument("--video", help="video file (mp4, webm, mov, avi, mkv, animated gif) or a folder of frames")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or a shipped model's name (default: tiny)")
    p.add_argument("--out", default=None, help="overlay file: png/jpg for an image, gif/png/mp4 for a video; the "
                                               "JSON record goes beside it (.json)")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of the answer text")
    p.add_argument("--intervention", choices=INTERVENTION_CHOICES, default=None, help=INTERVENTION_HELP)
    p.add_argument("--attention", default=None, metavar="PNG",
                   help="also write where the answer looked: its attention over the picture, with and without the "
                        "intervention (the heads it acted on), as a PNG")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    _add_repetition_args(p)
    p.add_argument("--device", type=device_name, default="cpu")
    _add_weight_args(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("demo", help="serve the Gradio demo (localhost by default)")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or a shipped model's name (default: tiny)")
    p.add_argument("--host", type=check_host, default="127.0.0.1",
                   help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=port_number, default=7860)
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest accepted upload")
    p.add_argument("--max-video-seconds", type=positive_float, default=60.0, help="longest accepted video")
    p.add_argument("--concurrency", type=positive_int, default=8,
                   help="requests in the handler at once (model calls run one at a time, batched)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="most concurrent requests (same settings)"
                   " per batched model call (1 = no batching; at most --concurrency)")
    p.add_argument("--batch-wait-ms", type=nonnegative_int, default=10,
                   help="how long a request at an idle model waits for others to join its batch")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before new ones are refused")
    p.add_argument("--compile", action="store_true",
                   help="decode through the compiled step (torch.compile) when a request has no intervention: on a "
                        "CPU with --dtype bfloat16 the fastest for smol; the first answer of each batch size waits "
                        "for its compile (~20-35 s for smol)")
    p.add_argument("--device", type=device_name, default="cpu")
    _add_weight_args(p)
    p.set_defaults(func=_demo)

    add_data_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``taskmllm`` console script; returns the exit code (see :func:`run_command`)."""
    import warnings

    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # taskmllm's own, lower pixel cap applies
    args = build_parser().parse_args(argv)  # a bad flag: one line, exit 2
    return run_command(args.func, args, argv)


if __name__ == "__main__":
    sys.exit(main())
