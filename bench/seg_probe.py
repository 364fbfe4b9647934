"""Where does referring segmentation fail: in the ``<seg>`` query states or in the segmentation expert?

The segmentation counterpart of ``bench/expert_probe.py``. A trained model's MLLM is frozen; for ShapesWorld
referring-segmentation samples (train split, and the held-out eval seed) the frozen vision features and the
``<seg>`` query states the MLLM computes on the teacher-forced answer are cached once, then a FRESH segmentation
expert trains on them from three query sources, same features, same batches, same steps:

- ``llm``: the model's own query states (what the recipe trains on);
- ``oracle``: a learned bag-of-words encoding of the ``<ref>`` phrase (a perfect reader of the phrase);
- ``none``: one learned constant (the expert sees only the image: the floor of "segment the salient object").

Reports held-out gIoU (:func:`taskmllm.eval.grounding.referring_segmentation`, masks at the world's size) against
the step count, and what kind of error is left: ``hit`` (the mask overlaps the target at all), ``precision`` and
``recall`` of the predicted pixels (a wrong object: precision ~0; a coarse mask on the right one: high recall, low
precision), ``empty`` (no pixel predicted). If ``oracle`` learns and ``llm`` does not, the phrase does not reach the
expert through the query states; if neither does, the expert (or the features) is the bottleneck.
``--options`` gives the fresh expert other options (e.g. ``'{"query_match": true}'``); the cache keeps the LLM's
visual-token states, so ``llm_context`` can be probed too.

Measured on the shipped ``smol`` (2026-12-05; 2,000 / 300 samples, 2,400 steps at batch 32, val world; gIoU as the
mean of the last three evaluations): ``llm`` 0.29, ``none`` 0.25, ``oracle`` 0.40 — the query states were as
good as no phrase to the decoder; ``llm`` with ``--query-norm zscore`` and ``llm_context`` + ``query_match`` 0.45
(each alone: 0.34 / 0.415 / 0.30). The README's smol section has the table.

    python bench/seg_probe.py --model smol --cache /tmp/seg_probe_smol
    python bench/seg_probe.py --model smol --cache /tmp/seg_probe_smol --sources llm --query-norm zscore \
        --options '{"bce_weight": 0.5, "dice_weight": 2.0, "llm_context": true, "query_match": true}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)
from expert_probe import PhraseEncoder, normalize_queries  # bench/expert_probe.py: the REC probe's parts


def cache_calls(joint, samples, task: str, target_rows, batch_size: int) -> dict[str, torch.Tensor]:
    """Per ``task`` call of ``samples`` (the answer teacher-forced, the MLLM run once): ``features (N, T, n, C)``,
    ``context (N, T, n', H)`` the LLM's last-layer visual-token states, ``queries (N, K, H)``, ``phrases (N, L)``
    token ids padded with -1, and the tensors ``target_rows(target)`` names (the call's sample's first target)."""
    proc = joint.mllm.processor
    rows: dict[str, list] = {k: [] for k in ("features", "context", "queries", "phrases")}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        visuals = [s.image if s.image is not None else s.frames for s in chunk]
        batch = proc([s.turns[0][0] for s in chunk], visuals, answers=[s.turns[0][1] for s in chunk])
        with torch.no_grad():
            out = joint.mllm(batch, "none")
            calls = joint.router.route(batch.input_ids, out.hidden_states, batch.attention_mask)
        for c in (c for c in calls if c.task == task):
            frames = out.expert_inputs.frames(c.sample)
            rows["features"].append(out.expert_inputs.features[frames])
            rows["context"].append(out.expert_inputs.visual_states[frames])
            rows["queries"].append(c.query_states)
            rows["phrases"].append(proc.tokenizer.encode(c.phrase or "", add_special_tokens=False) or [0])
            for key, value in target_rows(chunk[c.sample].targets[0]).items():
                rows.setdefault(key, []).append(value)
    width = max(len(p) for p in rows["phrases"])
    rows["phrases"] = [torch.tensor(p + [-1] * (width - len(p))) for p in rows["phrases"]]
    return {k: torch.stack(v) for k, v in rows.items()}


def cache(joint, samples, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """:func:`cache_calls` of referring-segmentation samples, with ``masks (N, S, S)`` uint8."""
    return cache_calls(joint, samples, "seg",
                       lambda t: {"masks": torch.as_tensor(np.asarray(t.mask), dtype=torch.uint8)}, batch_size)


def cached(folder: Optional[Path], name: str, key: str, compute) -> dict[str, torch.Tensor]:
    """``compute()``'s tensors, read from / written to ``folder/name.safetensors`` when ``folder`` is given; a file
    written for another ``key`` (model, sample count) is recomputed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = None if folder is None else folder / f"{name}.safetensors"
    if path is not None and path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(path))
    data = compute()
    if path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in data.items()}, str(path), metadata={"key": key})
    return data


def phrase_ids(row: torch.Tensor) -> list[int]:
    return [i for i in row.tolist() if i >= 0]


def evaluate(expert, data: dict, queries: torch.Tensor, vf) -> dict[str, float]:
    """Held-out gIoU and the error breakdown of the expert's masks (thresholded as ``postprocess`` does)."""
    from taskmllm.eval.grounding import referring_segmentation

    preds = []
    with torch.no_grad():
        for start in range(0, len(queries), 64):
            sl = slice(start, start + 64)
            out = expert(queries[sl], vf(data, sl))
            sizes = [tuple(m.shape) for m in data["masks"][sl]]
            preds += [r.mask for r in expert.postprocess(out, sizes)]
    targets = [m.numpy().astype(bool) for m in data["masks"]]
    inter = np.array([(p & t).sum() for p, t in zip(preds, targets)], dtype=float)
    area = np.array([p.sum() for p in preds], dtype=float)
    tgt = np.array([t.sum() for t in targets], dtype=float)
    giou = referring_segmentation(preds, targets)["giou"]
    iou = inter / np.maximum(area + tgt - inter, 1)
    return {"giou": round(giou, 4), "acc50": round(float((iou >= 0.5).mean()), 4),
            "hit": round(float((inter > 0).mean()), 4),
            "precision": round(float((inter / np.maximum(area, 1))[area > 0].mean()) if (area > 0).any() else 0.0, 4),
            "recall": round(float((inter / np.maximum(tgt, 1)).mean()), 4),
            "empty": round(float((area == 0).mean()), 4)}


def train_probe(source: str, joint, spec, data: dict, val: dict, vf, steps: int, lr: float, batch: int,
                options: dict, targets_of: Optional[Callable] = None, score: Optional[Callable] = None,
                task: str = "seg") -> dict:
    """A fresh ``task`` expert (``spec`` with ``options``) trained on ``source``'s queries; its held-out curve
    (``score(expert, val, queries, vf)`` at six points). ``targets_of(data, i)`` is sample ``i``'s TaskTarget
    (default: the seg mask; ``bench/track_probe.py`` passes its own, with its ``evaluate``)."""
    from taskmllm.experts import build_expert
    from taskmllm.experts.base import TaskTarget

    targets_of = targets_of or (lambda d, i: TaskTarget("seg", mask=d["masks"][i].numpy().astype(bool)))
    score = score or evaluate
    torch.manual_seed(0)
    expert = build_expert(task, dataclasses.replace(spec, options=options))
    k, hidden = data["queries"].shape[1:]
    encoder = {"llm": None, "oracle": PhraseEncoder(len(joint.mllm.tokenizer), hidden, k),
               "none": torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1, k, hidden) * 0.02)])}[source]
    params = list(expert.parameters()) + (list(encoder.parameters()) if encoder is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def queries_of(d: dict, idx: torch.Tensor) -> torch.Tensor:
        if source == "llm":
            return d["queries"][idx]
        if source == "oracle":
            return encoder([phrase_ids(d["phrases"][i]) for i in idx.tolist()])
        return encoder[0].expand(len(idx), -1, -1)

    curve, start, g = [], time.perf_counter(), torch.Generator().manual_seed(0)
    n = len(data["queries"])
    for step in range(1, steps + 1):
        idx = torch.randint(n, (batch,), generator=g)
        out = expert(queries_of(data, idx), vf(data, idx))
        loss = sum(expert.loss(out, [targets_of(data, i) for i in idx.tolist()]).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % max(steps // 6, 1) == 0 or step == steps:
            expert.eval()
            with torch.no_grad():
                q = queries_of(val, torch.arange(len(val["queries"])))
            curve.append({"step": step, "wall_s": round(time.perf_counter() - start, 1), "loss": round(loss.item(), 4),
                          **score(expert, val, q, vf)})
            expert.train()
            print(f"[{task}_probe] {source} {curve[-1]}", flush=True)
    return {"source": source, "curve": curve, **{k: v for k, v in curve[-1].items() if k != "step"}}


def probe_parser(doc: str, task: str, train: int, val: int, steps: int, lr: float, batch: int) -> argparse.ArgumentParser:
    """The probes' shared command line (``bench/seg_probe.py``, ``bench/track_probe.py``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="smol", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--train", type=int, default=train, help=f"{task} training samples to cache")
    parser.add_argument("--val", type=int, default=val)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--sources", nargs="+", default=["llm", "oracle", "none"])
    parser.add_argument("--options", type=json.loads, default=None,
                        help=f"the fresh expert's options as JSON (default: the model's {task} options)")
    parser.add_argument("--query-norm", choices=["none", "zscore", "layernorm"], default="none")
    parser.add_argument("--cache", type=Path, default=None, help="keep the cached tensors here for later runs")
    parser.add_argument("--out", default=None)
    return parser


def main() -> None:
    parser = probe_parser(__doc__, "seg", train=2000, val=300, steps=1200, lr=1e-3, batch=32)
    args = parser.parse_args()

    from taskmllm.data.shapesworld import shapesworld_dataset
    from taskmllm.eval.suites import DEFAULT_EVAL_SEED
    from taskmllm.experts.base import VisionFeatures
    from taskmllm.router.joint import JointModel

    joint = JointModel.from_pretrained(args.model).eval()
    start = time.perf_counter()
    train_ds = shapesworld_dataset({"seg": 1.0}, length=args.train, seed=0)
    val_ds = shapesworld_dataset({"seg": 1.0}, length=args.val, seed=DEFAULT_EVAL_SEED, split="val")
    data = cached(args.cache, "train", f"{args.model}:{args.train}:context",
                  lambda: cache(joint, [train_ds[i] for i in range(args.train)]))
    val = cached(args.cache, "val", f"{args.model}:{args.val}:context", lambda: cache(joint, [val_ds[i] for i in range(args.val)]))
    cache_s = time.perf_counter() - start
    grid, size = joint.mllm.vision.grid, joint.mllm.config.vision.image_size
    context_grid = joint.mllm.grid  # the visual tokens' (pooled) grid

    def vf(d: dict, rows) -> "VisionFeatures":  # the expert's inputs for some rows of a cached set
        return VisionFeatures(d["features"][rows], grid, size, d["context"][rows], context_grid)
    shipped_expert = joint.experts["seg"].eval()
    shipped = evaluate(shipped_expert, val, val["queries"], vf)
    spec = shipped_expert.spec
    options = dict(spec.options) if args.options is None else args.options
    data["queries"], val["queries"] = normalize_queries(args.query_norm, data["queries"], val["queries"])
    results = {source: train_probe(source, joint, spec, data, val, vf, args.steps, args.lr, args.batch, options)
               for source in args.sources}
    emit({"model": str(args.model), "train": len(data["masks"]), "val": len(val["masks"]), "steps": args.steps,
          "lr": args.lr, "batch": args.batch, "options": options, "query_norm": args.query_norm,
          "cache_s": round(cache_s, 1), "shipped_expert_on_llm_queries": shipped, "probes": results}, args.out)


if __name__ == "__main__":
    main()
