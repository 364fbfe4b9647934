"""Can a fresh tiny LLM learn to answer from the image? VQA training on cached features, three feature kinds.

The shipped ``tiny`` reads the image for captions but its VQA answers ignore it (``bench/image_reliance.py``:
gap ~0 nats). This probe separates "the features lack the answer" from "the LLM does not learn to look": a
fresh ``tiny`` projector + LLM (the recipe's pretrain model) trains on ShapesWorld questions with the tower's
features cached once, and the held-out image-reliance gap (answer NLL with another scene's image minus with
its own, nats per answer; :mod:`taskmllm.eval.reliance`) is logged as it trains. Features:

- ``tower``: the recipe's frozen MobileNetV2 features (what the model sees);
- ``patches``: an oracle per-patch one-hot of the shape and color covering >= half of each patch (the answer is
  in the features, but must be looked up where the question points);
- ``answer``: an oracle that writes "yes"/"no" into every patch (exist only; the answer needs no lookup);
- ``words``: oracle visual tokens in the LLM's own vocabulary (each token the mean input embedding of
  " <color> <shape>" of the object covering most of it, else " none"; the projector is skipped): can a
  pretrained LLM answer from tokens that read like words? ``--words-loss`` trains the real projector toward
  them (the recipe's ``stage.aux.words``);
- ``words2``: the same oracle as two tokens per visual cell, the color word then the shape word, as text writes
  them (twice the visual tokens): is one mixed vector per cell what keeps the LLM from binding color to shape?

``--max-objects 1`` is the positive control with real features: one object per scene, so no lookup is needed
(color, 300 steps at 192 px: gap 2.1 nats). ``--tasks qa`` trains on multi-turn conversations (several
questions per image, every answer supervised) and measures the gap on single exist/color/count questions.
``--schedule color:300 exist,color,count:500`` trains phases in order (a curriculum) and reports the gap per task:
color alone learns to look (0.1-0.4 nats), exist alone does not (0.000 through 600 steps), and color's looking
survives a following mixed phase without carrying over to exist. ``--position learned`` adds a learned row + column
embedding to the visual tokens (a 2D position signal); every report splits the held-out "sure" share by whether
the question names its object by position ("the leftmost ...").
``--layout sandwich`` writes the question, the image, then the question again (``tokens.repeat_question``): the
visual tokens can depend on what the question names while the answer still follows the question.

    python bench/vqa_probe.py --features patches --tasks exist --steps 1000 --out bench/results/vqa_probe.json
    python bench/vqa_probe.py --image-size 96 --pool 1 ...   # the previous recipe's 6 x 6 grid
    python bench/vqa_probe.py --recipe smol --llm lora --lr 2e-4 ...   # pretrained SmolLM2 (LoRA) + projector
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from taskmllm.data.shapesworld import COLORS, SHAPES, ConversationConfig, WorldConfig, shapesworld_dataset
from taskmllm.data.shapesworld.referring import POSITIONS
from taskmllm.eval.reliance import sequence_nll
from taskmllm.eval.suites import DEFAULT_EVAL_SEED
from taskmllm.model.expert_inputs import ExpertInputs
from taskmllm.model.mllm import lm_loss
from taskmllm.model.processor import positions
from taskmllm.training.recipe_run import RECIPES
from taskmllm.training.config import load_config
from taskmllm.training.aux import (AttributeLoss, AttributeOptions, AuxContext, AuxStates, FocusLoss, FocusOptions,
                                   LookupLoss, LookupOptions, WordLoss, WordOptions)
from taskmllm.training.aux_targets import grounding_cover, label_maps
from taskmllm.training.config import StageConfig
from taskmllm.training.stages import apply_stage
from taskmllm.training.train import build_joint, word_vectors
from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)

FEATURES = ("tower", "patches", "answer", "words", "words2")
POSITION_WORDS = tuple(POSITIONS)  # "leftmost", ...: the referring grammar's position words
CLASSES = {"category": tuple(SHAPES), "color": tuple(COLORS)}


def cached_batches(mllm, tasks, n, split, seed, features, batch_size=16, max_objects=6):
    """``[(batch, features (B, N, C), samples)]`` of ``n`` questions: the processor's batches (laid out as the
    model's ``tokens`` say), the tower run once."""
    mix = {t: 1.0 for t in tasks}
    world = WorldConfig(image_size=mllm.config.vision.image_size, max_objects=max_objects)
    data = shapesworld_dataset(mix, n, seed=seed, split=split, config=world,
                               conversation=ConversationConfig(question_first=None))
    out = []
    for start in range(0, n, batch_size):
        samples = [data[i] for i in range(start, min(n, start + batch_size))]
        batch = mllm.processor.conversations([s.turns for s in samples], [s.image for s in samples])
        with torch.no_grad():
            feats = mllm.vision(batch.pixel_values)  # (B, N, C)
        if features == "patches":
            maps = label_maps(samples, mllm.vision.grid, 1, CLASSES)  # (B, N) class ids, 0 = background
            feats = torch.zeros_like(feats)
            feats.scatter_(2, maps["category"].unsqueeze(-1), 1.0)
            feats.scatter_(2, 16 + maps["color"].unsqueeze(-1), 1.0)
        elif features in ("words", "words2"):
            feats = word_tokens(mllm, samples, split=features == "words2")  # (B, N' or 2N', H): LLM inputs
        elif features == "answer":
            yes = torch.tensor([s.turns[0][1] == "Yes." for s in samples], dtype=feats.dtype)
            feats = torch.randn_like(feats) * 0.1 + (2 * yes - 1)[:, None, None]
        out.append((batch, feats, samples))
    return out


def word_tokens(mllm, samples, cover: float = 0.2, split: bool = False) -> torch.Tensor:
    """Oracle visual tokens in the LLM's own vocabulary: each token of the LLM's visual grid is the mean input
    embedding of the words " <color> <shape>" of the object covering most of it (>= ``cover``), else of " none".
    Can the pretrained LLM answer from image tokens that read like words?

    ``split``: two tokens per cell instead, ``" <color>"`` then ``" <shape>"`` (``" none"`` twice on background):
    ``(B, 2N', H)``, the processor's ``tokens_per_frame`` doubled by the caller."""
    maps = label_maps(samples, mllm.grid, 1, CLASSES, min_cover=cover)  # (B, N') class ids, 0 = background
    colors, shapes = CLASSES["color"], CLASSES["category"]
    shown = maps["category"] > 0
    none = word_vectors(mllm, [" none"])[0]
    if split:
        color_vec = word_vectors(mllm, [f" {c}" for c in colors])  # (C, H)
        shape_vec = word_vectors(mllm, [f" {s}" for s in shapes])  # (S, H)
        out = none.expand(*maps["color"].shape, 2, -1).clone()  # (B, N', 2, H)
        out[shown, 0] = color_vec[maps["color"][shown] - 1]
        out[shown, 1] = shape_vec[maps["category"][shown] - 1]
        return out.flatten(1, 2)  # (B, 2N', H): color, shape, color, shape, ...
    combos = word_vectors(mllm, [f" {c} {s}" for c in colors for s in shapes]).view(len(colors), len(shapes), -1)
    out = none.expand(*maps["color"].shape, -1).clone()  # (B, N', H)
    out[shown] = combos[maps["color"][shown] - 1, maps["category"][shown] - 1]
    return out


class GridPosition(torch.nn.Module):
    """A learned 2D position signal for the visual tokens: a row and a column embedding, each ``(side, H)``,
    added to every token of a ``grid`` in raster order (the LLM otherwise sees a token's place only as its 1D
    sequence index). Initialized at 0.02 x the mean norm of the LLM's word embeddings, so it starts small."""

    def __init__(self, grid: tuple[int, int], hidden: int, scale: float) -> None:
        super().__init__()
        self.grid = grid
        self.rows = torch.nn.Parameter(torch.randn(grid[0], hidden) * scale / math.sqrt(hidden))
        self.cols = torch.nn.Parameter(torch.randn(grid[1], hidden) * scale / math.sqrt(hidden))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, h*w, H)`` tokens -> the same with their row and column embeddings added."""
        h, w = self.grid
        pos = (self.rows[:, None, :] + self.cols[None, :, :]).reshape(h * w, -1)  # (h*w, H), raster order
        return tokens + pos


def visual_inputs(mllm, feats, position: GridPosition | None = None):
    """The LLM's visual tokens for cached ``feats``: projected tower features, or the ``words`` oracle as is;
    ``position`` adds a 2D position signal."""
    if feats.shape[-1] == mllm.hidden_size:
        tokens = feats
    else:
        pooled, _ = mllm.projector.pool(feats, mllm.vision.grid)
        tokens = mllm.projector(pooled)
    return tokens if position is None else position(tokens)


def aux_states(mllm, batch, feats, samples, layer_states) -> AuxStates:
    """What the auxiliary losses read of a probe forward over cached ``feats`` (one frame per sample)."""
    inputs = ExpertInputs(feats, mllm.vision.grid, mllm.config.vision.image_size, [1] * len(samples),
                          [s.hw for s in samples], visual_grid=mllm.grid)
    return AuxStates(layer_states, batch.input_ids == mllm.image_id, inputs, max_frames=1, labels=batch.labels)


def answer_loss(mllm, batch, feats, reduce: bool = True, aux=None, samples=None, position=None):
    """LM loss of the answers given cached features (mean over tokens, or summed per sample).

    ``aux``: ``[(loss, weight)]`` auxiliary losses of the training recipe's ``stage.aux`` (focus, attr, words)
    on this forward's hidden states, added with their weights (``samples`` give their targets). ``position``: a
    :class:`GridPosition` added to the visual tokens.
    """
    emb = mllm.embed(batch.input_ids, visual_inputs(mllm, feats, position))
    out = mllm.llm(inputs_embeds=emb, attention_mask=batch.attention_mask,
                   position_ids=positions(batch.attention_mask), use_cache=False,
                   output_hidden_states=bool(aux))
    if not reduce:
        return sequence_nll(out.logits, batch.labels)
    loss = lm_loss(out.logits, batch.labels)
    if aux:
        states = aux_states(mllm, batch, feats, samples, out.hidden_states)
        for head, weight in aux:
            loss = loss + weight * head.loss(states, samples)
    return loss


@torch.no_grad()
def reliance_gap(mllm, batches, position=None) -> tuple[float, float, dict]:
    """Held-out ``(gap, sure, sure_by_form)``: mean NLL(another scene's features) - NLL(own features) in nats, the
    share of answers given probability > 0.5 (NLL < ln 2: surely the model's argmax; for yes/no, its accuracy),
    and that share split by whether the question names its object by position ("the leftmost ...")."""
    mllm.eval()
    own = torch.cat([answer_loss(mllm, b, f, False, position=position) for b, f, _ in batches])
    other = torch.cat([answer_loss(mllm, b, f.roll(1, 0), False, position=position) for b, f, _ in batches])
    mllm.train()
    sure = own < np.log(2)
    positional = torch.tensor([any(w in s.turns[0][0].split() for w in POSITION_WORDS)
                               for _, _, samples in batches for s in samples])
    by_form = {form: (round(float(sure[m].float().mean()), 3), int(m.sum()))
               for form, m in (("positional", positional), ("other", ~positional)) if m.any()}
    return float((other - own).mean()), float(sure.float().mean()), by_form


@torch.no_grad()
def focus_iou(mllm, head, batches) -> float:
    """Held-out IoU of the tokens the focus head marks (logit > 0) with those a named object covers (target >=
    0.5), over questions that name something present."""
    mllm.eval()
    ious = []
    for batch, feats, samples in batches:
        targets, valid = grounding_cover(samples, mllm.grid, 1)
        emb = mllm.embed(batch.input_ids, visual_inputs(mllm, feats))
        out = mllm.llm(inputs_embeds=emb, attention_mask=batch.attention_mask,
                       position_ids=positions(batch.attention_mask), use_cache=False, output_hidden_states=True)
        hidden = out.hidden_states[head.options.layer][batch.input_ids == mllm.image_id]
        marked = (head.linear(hidden).squeeze(-1) > 0).view(targets.shape)
        truth = targets >= 0.5
        for m, t, v in zip(marked, truth, valid):
            if v and t.any():
                ious.append(float((m & t).sum() / (m | t).sum()))
    mllm.train()
    return float(np.mean(ious)) if ious else float("nan")


@torch.no_grad()
def lookup_accuracy(mllm, head, batches) -> float:
    """Held-out: how often "some token's lookup logit > 0" agrees with "the question names something present"
    (the lookup head answering the existence question itself, read off the answer position's state)."""
    mllm.eval()
    right = []
    for batch, feats, samples in batches:
        emb = mllm.embed(batch.input_ids, visual_inputs(mllm, feats))
        out = mllm.llm(inputs_embeds=emb, attention_mask=batch.attention_mask,
                       position_ids=positions(batch.attention_mask), use_cache=False, output_hidden_states=True)
        logits, _ = head.logits(aux_states(mllm, batch, feats, samples, out.hidden_states), samples)
        for said, s in zip((logits > 0).any(1), samples):
            if s.grounding is not None:
                right.append(bool(said) == bool(s.grounding.objects))
    mllm.train()
    return float(np.mean(right)) if right else float("nan")


def words_first(mllm, words, batches, steps: int, lr: float) -> list[dict]:
    """Train the projector alone with the words loss at the LLM's inputs for ``steps`` steps (no LLM forward: the
    loss reads only the embedded visual tokens), so the answers later start from tokens that read like words."""
    params = list(mllm.projector.parameters()) + list(words.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    curve = []
    for step in range(1, steps + 1):
        batch, feats, samples = batches[(step - 1) % len(batches)]
        emb = mllm.embed(batch.input_ids, visual_inputs(mllm, feats))
        loss = words.loss(aux_states(mllm, batch, feats, samples, (emb,)), samples)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 4) == 0 or step == steps:
            curve.append({"words_first_step": step, "words_loss": round(loss.item(), 4)})
            print(curve[-1], flush=True)
    return curve


@torch.no_grad()
def oracle_cosine(mllm, batches) -> dict:
    """Held-out mean cosine of the projected tokens to the ``words`` oracle, on tokens an object covers (>= 0.2)
    and on background tokens."""
    obj, bg = [], []
    for batch, feats, samples in batches:
        cos = torch.nn.functional.cosine_similarity(visual_inputs(mllm, feats), word_tokens(mllm, samples), dim=-1)
        shown = label_maps(samples, mllm.grid, 1, CLASSES, min_cover=0.2)["category"] > 0
        obj.append(cos[shown])
        bg.append(cos[~shown])
    return {"object": round(float(torch.cat(obj).mean()), 3), "background": round(float(torch.cat(bg).mean()), 3)}


def parse_schedule(items: list[str]) -> list[tuple[list[str], int]]:
    """``["color:400", "exist,count:600"]`` -> ``[(["color"], 400), (["exist", "count"], 600)]``."""
    phases = []
    for item in items:
        tasks, _, steps = item.rpartition(":")
        if not tasks or not steps.isdigit():
            raise SystemExit(f"--schedule: {item!r} is not TASKS:STEPS (e.g. color:400 or exist,count:600)")
        phases.append((tasks.split(","), int(steps)))
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", choices=FEATURES, default="tower")
    parser.add_argument("--tasks", nargs="+", default=["exist", "color", "count"],
                        help="training tasks; 'qa' = multi-turn conversations of several questions per image "
                             "(the held-out gap is then measured on single exist/color/count questions)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--schedule", nargs="+", default=None, metavar="TASKS:STEPS",
                        help="phases trained in order, e.g. 'color:400 exist,color,count:600' (overrides --tasks "
                             "and --steps; the gap is reported per held-out task)")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n", type=int, default=4000, help="training questions (cycled)")
    parser.add_argument("--image-first", action="store_true", help="<image> before the question text "
                        "(= --layout image)")
    parser.add_argument("--layout", choices=("question", "image", "sandwich"), default="question",
                        help="the first turn: question then <image>, <image> then question, or question, <image>, "
                        "question again")
    parser.add_argument("--max-objects", type=int, default=6, help="objects per scene, train and held-out "
                        "(1: the answer is wherever the model looks; a positive control)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the recipe's)")
    parser.add_argument("--pool", type=int, default=None, help="projector pooling (default: the recipe's)")
    parser.add_argument("--match-loss", type=float, default=0.0, help="weight of the focus loss (the recipe's "
                        "stage.focus_weight): each visual token says whether it shows what the question names")
    parser.add_argument("--attr-loss", type=float, default=0.0, help="weight of a per-token shape + color "
                        "classifier at the match layer (color must be linear there to be read by attention)")
    parser.add_argument("--match-layer", type=int, default=2, help="after how many LLM blocks the match is read")
    parser.add_argument("--words-loss", type=float, default=0.0, help="weight of the recipe's stage.aux.words: "
                        "visual tokens point to the LLM's word vectors of their object's shape and color")
    parser.add_argument("--words-regress", type=float, default=0.0, help="stage.aux.words.regress: pull the tokens "
                        "onto their words (relative squared error), not only toward them")
    parser.add_argument("--words-layer", type=int, default=0, help="after how many LLM blocks (0: the inputs)")
    parser.add_argument("--lookup-loss", type=float, default=0.0, help="weight of stage.aux.lookup: the answer "
                        "position's state queries the visual tokens for what the question names (image first too)")
    parser.add_argument("--lookup-layer", type=int, default=4, help="after how many LLM blocks the lookup reads")
    parser.add_argument("--words-first", type=int, default=0, help="steps of the projector alone on the words "
                        "loss (needs --words-loss; no LLM forward) before the answers train")
    parser.add_argument("--freeze-projector", action="store_true", help="after --words-first, keep the projector "
                        "fixed: only the LLM (its LoRA) learns to read the tokens")
    parser.add_argument("--cosine", action="store_true", help="decay the rate as the recipe does (to 5%%)")
    parser.add_argument("--recipe", choices=("tiny", "smol"), default="tiny",
                        help="the model: tiny's pretrain stage (a fresh LLM) or smol's align stage (SmolLM2)")
    parser.add_argument("--llm", choices=("full", "lora", "frozen"), default="full",
                        help="how the LLM trains beside the projector (lora: the recipes' r16 on every linear)")
    parser.add_argument("--position", choices=("none", "learned"), default="none",
                        help="learned: a row + column embedding added to the visual tokens, trained with them "
                             "(does a 2D position signal help questions that name objects by position?)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--held", type=int, default=128, help="held-out questions per task (the gap's sample)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.image_first:
        if args.layout not in ("question", "image"):
            parser.error("--image-first is --layout image: give one of them")
        args.layout = "image"
    if args.features == "answer" and args.tasks != ["exist"]:
        parser.error("--features answer writes yes/no into the features: use it with --tasks exist")
    torch.manual_seed(0)
    overrides = ["--out_dir=/tmp/vqa_probe"]
    if args.image_size:
        overrides += [f"--model.vision.image_size={args.image_size}",
                      f"--data.sources.shapes.image_size={args.image_size}"]
    if args.pool:
        overrides.append(f"--model.projector.pool={args.pool}")
    first_stage = {"tiny": "pretrain.yaml", "smol": "align.yaml"}[args.recipe]
    cfg = load_config(RECIPES / args.recipe / first_stage, overrides)
    joint = build_joint(cfg)
    trainable = {"projector": "full"} | ({} if args.llm == "frozen" else {"llm": args.llm})
    apply_stage(joint, StageConfig(trainable=trainable, lora=cfg.stage.lora))
    mllm = joint.mllm.train()
    mllm.config.tokens.image_first = args.layout == "image"  # where the processor places <image>
    mllm.config.tokens.repeat_question = args.layout == "sandwich"
    if args.features == "words2":
        mllm.processor.tokens_per_frame *= 2  # two word tokens per visual cell
        if args.position != "none":
            parser.error("--position needs one token per grid cell: not with --features words2")
    position = None
    if args.position == "learned":
        scale = float(mllm.llm.get_input_embeddings().weight.norm(dim=-1).mean()) * 0.02
        position = GridPosition(mllm.grid, mllm.hidden_size, scale)
    phases = parse_schedule(args.schedule) if args.schedule else [(list(args.tasks), args.steps)]
    t0 = time.perf_counter()
    trains = [cached_batches(mllm, tasks, args.n, "train", i, args.features, args.batch_size,
                             max_objects=args.max_objects) for i, (tasks, _) in enumerate(phases)]
    seen = [t for tasks, _ in phases for t in tasks]
    held_tasks = list(dict.fromkeys(t for t in seen if t != "qa")) or ["exist", "color", "count"]
    held = {t: cached_batches(mllm, [t], args.held, "test", DEFAULT_EVAL_SEED, args.features,
                              max_objects=args.max_objects) for t in held_tasks}
    cache_s = time.perf_counter() - t0
    context = AuxContext(mllm.hidden_size, mllm.vision.width, len(mllm.llm.get_decoder().layers), CLASSES,
                         word_vectors=lambda phrases: word_vectors(mllm, phrases))
    head = FocusLoss(FocusOptions(layer=args.match_layer), context)
    aux = [(head, args.match_loss)] if args.match_loss else []
    if args.attr_loss:
        aux.append((AttributeLoss(AttributeOptions(layer=args.match_layer, labels=list(CLASSES)), context),
                    args.attr_loss))
    if args.words_loss:
        options = WordOptions(layer=args.words_layer, labels=list(CLASSES), regress=args.words_regress)
        aux.append((WordLoss(options, context), args.words_loss))
    lookup = LookupLoss(LookupOptions(layer=args.lookup_layer), context) if args.lookup_loss else None
    if lookup is not None:
        aux.append((lookup, args.lookup_loss))
    first = []
    if args.words_first:
        if not args.words_loss:
            parser.error("--words-first trains the words loss: give --words-loss")
        words = next(h for h, _ in aux if isinstance(h, WordLoss))
        first = words_first(mllm, words, trains[0], args.words_first, args.lr)
        first.append({"oracle_cosine": {t: oracle_cosine(mllm, b) for t, b in held.items()}})
        print(first[-1], flush=True)
    if args.freeze_projector:
        for p in mllm.projector.parameters():
            p.requires_grad_(False)
        aux = [(h, w) for h, w in aux if not isinstance(h, WordLoss)]  # it trains only the projector
    params = [p for p in mllm.parameters() if p.requires_grad] + [p for h, _ in aux for p in h.parameters()]
    params += [] if position is None else list(position.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=cfg.optim.weight_decay)
    total = sum(n for _, n in phases)
    cosine = lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))  # the recipe's decay
    warmup = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.optim.warmup_steps) * (cosine(s) if args.cosine else 1.0))
    curve, t0, step = [], time.perf_counter(), 0
    for (tasks, steps), train in zip(phases, trains):
        for local in range(1, steps + 1):
            step += 1
            batch, feats, samples = train[(local - 1) % len(train)]
            loss = answer_loss(mllm, batch, feats, aux=aux, samples=samples, position=position)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
            warmup.step()
            if step % args.every == 0 or local == steps:
                stats = {t: reliance_gap(mllm, b, position) for t, b in held.items()}
                gaps = {t: round(g, 4) for t, (g, _, _) in stats.items()}
                row = {"step": step, "phase": ",".join(tasks), "train_loss": round(loss.item(), 4),
                       "gap": round(sum(gaps.values()) / len(gaps), 4), "gap_per_task": gaps,
                       "sure_per_task": {t: round(a, 3) for t, (_, a, _) in stats.items()},
                       "sure_by_form": {t: f for t, (_, _, f) in stats.items() if len(f) > 1},
                       "focus_iou": {t: round(focus_iou(mllm, head, b), 3) for t, b in held.items()}
                       if args.match_loss else None,
                       "lookup_acc": {t: round(lookup_accuracy(mllm, lookup, b), 3) for t, b in held.items()}
                       if lookup is not None else None,
                       "wall_s": round(time.perf_counter() - t0, 1)}
                curve.append(row)
                print(row, flush=True)
    emit({"features": args.features, "match_loss": args.match_loss, "attr_loss": args.attr_loss,
          "words_loss": args.words_loss, "words_layer": args.words_layer, "words_regress": args.words_regress,
          "match_layer": args.match_layer, "lookup_loss": args.lookup_loss, "lookup_layer": args.lookup_layer,
          "phases": [{"tasks": t, "steps": n} for t, n in phases], "lr": args.lr,
          "layout": args.layout, "max_objects": args.max_objects, "cache_s": round(cache_s, 1),
          "recipe": args.recipe, "llm": args.llm, "batch_size": args.batch_size, "held": args.held,
          "words_first": first, "freeze_projector": args.freeze_projector, "position": args.position,
          "curve": curve}, args.out)


if __name__ == "__main__":
    main()
