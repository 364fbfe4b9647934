"""``taskmllm data ...``: the data tools' subcommands (preview, tokenizer, export, replay), each parsing its
arguments and calling one library function; :func:`add_data_commands` adds them to the console script's parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from taskmllm.cli_args import check_outputs, device_name, nonnegative_int, positive_int

#: the bundled prompts of ``taskmllm data replay``
REPLAY_PROMPTS = Path(__file__).parent / "assets" / "replay" / "prompts.json"


def _data_preview(args: argparse.Namespace) -> int:
    check_outputs(file=args.out, what="data preview --out")
    from taskmllm.data.shapesworld.preview import preview_main

    preview_main(n=args.n, out=args.out, seed=args.seed)
    print(f"wrote {args.out}")
    return 0


def _data_tokenizer(args: argparse.Namespace) -> int:
    from taskmllm.zoo import build_tiny_tokenizer

    build_tiny_tokenizer(args.out, vocab_size=args.vocab_size)
    print(f"wrote tokenizer to {args.out}")
    return 0


def _data_replay(args: argparse.Namespace) -> int:
    check_outputs(file=args.out, what="data replay --out")
    from taskmllm.data.replay import write_replay
    from taskmllm.router.pipeline import Pipeline

    if args.model:
        pipe = Pipeline.from_pretrained(args.model, device=args.device)
    else:  # the recipe's untouched pretrained parts (the LLM as its authors ship it)
        from taskmllm.router.joint import JointModel
        from taskmllm.zoo import build_smol

        pipe = Pipeline(JointModel.build(build_smol()).to(args.device).eval())
    n = write_replay(pipe, args.prompts, args.out, args.max_new_tokens, progress=not args.no_progress)
    print(f"wrote {n} conversations to {args.out}")
    return 0


def _data_export(args: argparse.Namespace) -> int:
    check_outputs(folder=args.out, what="data export: OUT")
    from taskmllm.data.shapesworld.export import ExportOptions, export

    options = ExportOptions(n=args.n, split=args.split, seed=args.seed, image_size=args.image_size,
                            num_frames=args.num_frames, image_first=args.image_first)
    done = export(args.format, args.out, options, overwrite=args.overwrite)
    root = f", images under {done.image_root}" if done.image_root is not None else ""
    print(f"wrote {args.n} ShapesWorld {args.split} samples as {args.format}: {done.path}{root}")
    return 0


def _add_data_export(data) -> None:
    p = data.add_parser("export", help="write ShapesWorld samples as real files (coco, refcoco, mot, llava)",
                        description="taskmllm data export --format coco|refcoco|mot|llava --n N --split "
                                    "train|val|test OUT: ShapesWorld samples in each format's own layout (images or "
                                    "frames as PNG + the annotation JSON/TXT of the public data set) in the new "
                                    "folder OUT.")
    p.add_argument("out", help="output folder (must not exist, or be empty)")
    p.add_argument("--format", required=True, choices=["coco", "refcoco", "mot", "llava"])
    p.add_argument("--n", type=positive_int, default=100, help="images (videos for mot)")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "heldout"])
    p.add_argument("--seed", type=nonnegative_int, default=0, help="the world's seed (training's data.seed)")
    p.add_argument("--image-size", type=positive_int, default=128)
    p.add_argument("--num-frames", type=positive_int, default=8, help="frames per video (mot)")
    p.add_argument("--image-first", action="store_true", help="llava: <image> before the question (LLaVA's layout)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT whole if it exists")
    p.set_defaults(func=_data_export)


def add_data_commands(sub) -> None:
    """Add ``data preview|tokenizer|export|replay`` to the console script's subcommands ``sub``."""
    data = sub.add_parser("data", help="ShapesWorld data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("preview", help="render samples with masks, boxes and text to a PNG grid")
    p.add_argument("--n", type=positive_int, default=16, help="number of samples")
    p.add_argument("--out", default="grid.png", help="output PNG path")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.set_defaults(func=_data_preview)
    p = data.add_parser("tokenizer", help="train the tiny recipe's BPE tokenizer on the ShapesWorld corpus")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=positive_int, default=1024)
    p.set_defaults(func=_data_tokenizer)
    _add_data_export(data)
    p = data.add_parser("replay", help="text conversations answered by a base LLM (a llava source that keeps its "
                                       "language while it learns images)")
    p.add_argument("--prompts", default=str(REPLAY_PROMPTS), help="prompt file: {single: [...], chats: [[...]]}")
    p.add_argument("--out", required=True, help="output LLaVA JSON")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--base", choices=["smol"], default="smol", help="the untouched pretrained LLM of a recipe")
    who.add_argument("--model", help="a model name or checkpoint folder instead")
    p.add_argument("--max-new-tokens", type=positive_int, default=96)
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_data_replay)
