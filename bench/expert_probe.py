"""Where does referring detection (REC) fail: in the query states or in the detection expert?

A trained model's REC is the chain tower -> LLM query states -> detection expert. This probe freezes a model's
MLLM, caches for ShapesWorld REC samples (train split, and the held-out eval seed) the frozen vision features
and the ``<det>`` query states the MLLM computes on the teacher-forced answer, and trains a FRESH detection
expert on them from three query sources, same features, same batches, same steps:

- ``llm``: the model's own query states (what the joint model trains on);
- ``oracle``: a learned bag-of-words encoding of the ``<ref>`` phrase (a perfect reader of the phrase);
- ``none``: one learned constant (the expert sees only the image: a floor that shows how far the features alone
  get, e.g. by always boxing the largest object).

If ``oracle`` learns REC and ``llm`` does not, either the LLM's query states do not carry the phrase or the
expert does not read it there: the report's ``phrase_readout_heldout_acc`` tells which (a linear probe reading the
phrase's shape and colour words from the first query state, per depth). If neither source learns, the expert or
the features are the bottleneck. Reports held-out Acc@0.5 (the top-scoring slot's IoU with the target >= 0.5) and
mean IoU against the step count, plus the model's own trained expert on ``llm``. ``--query-layers`` takes the
states of other depths, ``--query-norm`` standardizes them before the expert.

    python bench/expert_probe.py --model tiny --steps 600 --out bench/results/expert_probe_tiny.json
    python bench/expert_probe.py --model smol --sources llm --query-layers 6 12 18 24 -1 --cache /tmp/probe_smol
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _report import emit  # bench/_report.py (scripts run as `python bench/<name>.py`)


def cache(joint, samples, layers: tuple[int, ...] = (-1,), batch_size: int = 32):
    """``(features (N, 1, n, C), queries (N, len(layers), K, H), phrase ids list, boxes (N, 4))`` of REC samples.

    ``layers`` index ``MLLMOutput.layer_states`` (0 the input embeddings, -1 the last block after the final norm);
    an intermediate block's states go through the LM's final norm too (as the last layer's do), so that every
    layer reaches the expert at the scale it was built for."""
    proc = joint.mllm.processor
    norm = joint.mllm.llm.get_decoder().norm
    feats, queries, phrases, boxes = [], [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start: start + batch_size]
        batch = proc([s.turns[0][0] for s in chunk], [s.image for s in chunk], answers=[s.turns[0][1] for s in chunk])
        with torch.no_grad():
            out = joint.mllm(batch, "none")
            last = len(out.layer_states) - 1
            states = [out.layer_states[l] if l in (-1, last) else norm(out.layer_states[l]) for l in layers]
            per_layer = [joint.router.route(batch.input_ids, h, batch.attention_mask) for h in states]
        for c, *same in zip(*per_layer):
            s = chunk[c.sample]
            feats.append(out.expert_inputs.features[out.expert_inputs.frames(c.sample)])
            queries.append(torch.stack([c.query_states] + [d.query_states for d in same]))  # (len(layers), K, H)
            phrases.append(proc.tokenizer.encode(c.phrase or "", add_special_tokens=False) or [0])
            boxes.append(torch.as_tensor(s.targets[0].boxes, dtype=torch.float32).reshape(-1, 4)[0])
    return torch.stack(feats), torch.stack(queries), phrases, torch.stack(boxes)


def tower_features(samples, layer: int, size: int, batch_size: int = 64):
    """``(N, 1, h*w, C)`` features of the samples' images from ImageNet MobileNetV2 cut after block ``layer``
    at ``size`` px (the experts' alternative inputs; the MLLM keeps its own), and the tower's grid."""
    from taskmllm.model.config import VisionConfig
    from taskmllm.model.packaged import load_mobilenet_v2_features
    from taskmllm.model.vision import build_vision_tower

    cfg = VisionConfig(kind="mobilenet_v2", feature_layer=layer, image_size=size, pretrained="imagenet",
                       mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    tower = build_vision_tower(cfg).eval()
    load_mobilenet_v2_features(tower.features)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)

    def pixels(image: np.ndarray) -> torch.Tensor:  # as the Processor does: bicubic resize, ImageNet normalization
        arr = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - mean) / std
    out = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            out.append(tower(torch.stack([pixels(s.image) for s in samples[start: start + batch_size]])))
    return torch.cat(out)[:, None], tower.grid


def cached(folder: Optional[Path], name: str, key: str, compute):
    """``compute()``'s tensors, read from / written to ``folder/name.safetensors`` when ``folder`` is given;
    a file written for another ``key`` (model, sample count) is recomputed, not reused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = None if folder is None else folder / f"{name}.safetensors"
    if path is not None and path.is_file():
        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("key") == key
        if same:
            t = load_file(str(path))
            phrases = [[i for i in row.tolist() if i >= 0] for row in t["phrases"]]
            return t["features"], t["queries"], phrases, t["boxes"]
    feats, queries, phrases, boxes = compute()
    if path is not None:
        width = max(len(p) for p in phrases)
        padded = torch.tensor([p + [-1] * (width - len(p)) for p in phrases])
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"features": feats.contiguous(), "queries": queries.contiguous(), "phrases": padded,
                   "boxes": boxes.contiguous()}, str(path), metadata={"key": key})
    return feats, queries, phrases, boxes


class PhraseEncoder(nn.Module):
    """Oracle query source: mean of learned token embeddings of the phrase -> MLP -> K query states."""

    def __init__(self, vocab: int, hidden: int, k: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, hidden, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden * k))
        self.k, self.hidden = k, hidden

    def forward(self, phrases: list[list[int]]) -> torch.Tensor:
        flat = torch.tensor([i for p in phrases for i in p])
        offsets = torch.tensor([0] + [len(p) for p in phrases[:-1]]).cumsum(0)
        return self.mlp(self.bag(flat, offsets)).view(len(phrases), self.k, self.hidden)


def phrase_readout(train_q: torch.Tensor, train_words: list[list[str]], val_q: torch.Tensor,
                   val_words: list[list[str]], vocab: tuple[str, ...], steps: int = 300) -> Optional[float]:
    """Held-out accuracy of a linear probe reading from the first query state ``(N, H)`` (standardized with the
    train statistics) which word of ``vocab`` the phrase names; phrases naming none or several are left out.
    None when the held-out set has no such phrase."""
    def labels(words):
        hits = [[i for i, w in enumerate(vocab) if w in ws] for ws in words]
        return torch.tensor([h[0] if len(h) == 1 else -1 for h in hits])

    ytr, yva = labels(train_words), labels(val_words)
    if not bool((yva >= 0).any()):
        return None
    xtr, xva = normalize_queries("zscore", train_q[ytr >= 0], val_q[yva >= 0])
    torch.manual_seed(0)
    probe = nn.Linear(xtr.shape[1], len(vocab))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(probe(xtr), ytr[ytr >= 0]).backward()
        opt.step()
    with torch.no_grad():
        return float((probe(xva).argmax(1) == yva[yva >= 0]).float().mean())


def normalize_queries(kind: str, train_q: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The query states as the expert gets them: ``none`` as cached, ``zscore`` each dimension standardized with
    the train statistics, ``layernorm`` each state normalized (no affine)."""
    if kind == "none":
        return (train_q, *others)
    if kind == "layernorm":
        return tuple(nn.functional.layer_norm(q, q.shape[-1:]) for q in (train_q, *others))
    flat = train_q.reshape(-1, train_q.shape[-1])
    mu, sd = flat.mean(0), flat.std(0) + 1e-6
    return tuple((q - mu) / sd for q in (train_q, *others))


def evaluate(expert, features, queries, boxes, vf) -> dict[str, float]:
    """Acc@0.5 and mean IoU of the top-scoring slot, and Acc@0.5 of the best slot (``any_slot_acc50``: the boxes
    are there; the gap to ``acc50`` is what the scores miss)."""
    from taskmllm.experts.base import VisionFeatures
    from taskmllm.experts.boxes import box_iou, elementwise_box_iou

    with torch.no_grad():
        out = expert(queries, VisionFeatures(features, *vf))
    top = out.logits.argmax(1)
    pred = out.boxes[torch.arange(len(top)), top]
    iou = elementwise_box_iou(pred, boxes)
    best = torch.stack([box_iou(out.boxes[i], boxes[i:i + 1]).max() for i in range(len(boxes))])
    return {"acc50": float((iou >= 0.5).float().mean()), "miou": float(iou.mean()),
            "any_slot_acc50": float((best >= 0.5).float().mean())}


def train_probe(source: str, joint, spec, data, val, vf, steps: int, lr: float, batch: int, seed: int,
                options: dict) -> dict:
    from taskmllm.experts import build_expert
    from taskmllm.experts.base import TaskTarget, VisionFeatures

    torch.manual_seed(seed)
    expert = build_expert("det", dataclasses.replace(spec, options=options))
    feats, llm_q, phrases, boxes = data
    k, hidden = llm_q.shape[1:]
    encoder = {"llm": None, "oracle": PhraseEncoder(len(joint.mllm.tokenizer), hidden, k),
               "none": nn.ParameterList([nn.Parameter(torch.randn(1, k, hidden) * 0.02)])}[source]
    params = list(expert.parameters()) + (list(encoder.parameters()) if encoder is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def queries_of(idx, q, ph):
        if source == "llm":
            return q[idx]
        if source == "oracle":
            return encoder([ph[i] for i in idx.tolist()])
        return encoder[0].expand(len(idx), -1, -1)

    curve, start = [], time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(len(boxes), (batch,), generator=g)
        out = expert(queries_of(idx, llm_q, phrases), VisionFeatures(feats[idx], *vf))
        terms = expert.loss(out, [TaskTarget("det", boxes=boxes[i:i + 1].numpy()) for i in idx.tolist()])
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % max(steps // 6, 1) == 0 or step == steps:
            expert.eval()
            with torch.no_grad():
                q = queries_of(torch.arange(len(val[3])), val[1], val[2])
                seen = torch.arange(min(300, len(boxes)))
                train_acc = evaluate(expert, feats[seen], queries_of(seen, llm_q, phrases), boxes[seen], vf)["acc50"]
            curve.append({"step": step, "wall_s": round(time.perf_counter() - start, 1),
                          **evaluate(expert, val[0], q, val[3], vf), "train_acc50": train_acc})
            expert.train()
            print(f"[expert_probe] {source} {curve[-1]}", flush=True)
    return {"source": source, "curve": curve, **{k: v for k, v in curve[-1].items() if k != "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a checkpoint directory or a shipped model's name")
    parser.add_argument("--train", type=int, default=2000, help="REC training samples to cache")
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sources", nargs="+", default=["llm", "oracle", "none"])
    parser.add_argument("--options", type=json.loads, default={},
                        help='the fresh detection expert\'s options as JSON, e.g. \'{"box_head": "localizing"}\'')
    parser.add_argument("--tower", default=None, metavar="LAYER:SIZE",
                        help="give the expert ImageNet MobileNetV2 features cut after block LAYER at SIZE px "
                             "instead of the model's own (the queries stay the model's)")
    parser.add_argument("--query-layers", type=int, nargs="+", default=[-1],
                        help="the LLM depths whose query states the 'llm' source reads (layer_states indices; -1 the "
                             "last, which the router uses); one probe per layer")
    parser.add_argument("--query-norm", choices=["none", "zscore", "layernorm"], default="none",
                        help="how the 'llm' source's states reach the fresh expert (see normalize_queries)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the cached features and query states in this folder (safetensors) for later runs")
    args = parser.parse_args()

    from taskmllm.data.shapesworld import shapesworld_dataset
    from taskmllm.eval.suites import DEFAULT_EVAL_SEED
    from taskmllm.router.joint import JointModel

    joint = JointModel.from_pretrained(args.model).eval()
    start = time.perf_counter()
    train_ds = shapesworld_dataset({"rec": 1.0}, length=args.train, seed=0)
    val_ds = shapesworld_dataset({"rec": 1.0}, length=args.val, seed=DEFAULT_EVAL_SEED, split="val")
    train_samples = [train_ds[i] for i in range(args.train)]
    val_samples = [val_ds[i] for i in range(args.val)]
    layers = tuple(args.query_layers)
    key = "" if layers == (-1,) else f"_layers={'_'.join(map(str, layers))}"  # the default keeps older caches
    data = cached(args.cache, f"train{key}", f"{args.model}:{args.train}{key}", lambda: cache(joint, train_samples, layers))
    val = cached(args.cache, f"val{key}", f"{args.model}:{args.val}{key}", lambda: cache(joint, val_samples, layers))
    data, val = ((*d[:1], d[1] if d[1].dim() == 4 else d[1][:, None], *d[2:]) for d in (data, val))  # (N, layers, K, H)
    cache_s = time.perf_counter() - start
    vf = (joint.mllm.vision.grid, joint.mllm.config.vision.image_size)
    last = layers.index(-1) if -1 in layers else None
    shipped = None if last is None else evaluate(joint.experts["det"].eval(), val[0], val[1][:, last], val[3], vf)
    spec = joint.experts["det"].spec
    if args.tower:
        layer, size = (int(v) for v in args.tower.split(":"))
        train_f, grid = tower_features(train_samples, layer, size)
        val_f, _ = tower_features(val_samples, layer, size)
        data, val = (train_f, *data[1:]), (val_f, *val[1:])
        spec = dataclasses.replace(spec, vision_dim=train_f.shape[-1], grid=grid, image_size=size)
        vf = (grid, size)
    first = data[1][:, -1 if last is None else last, 0]  # (N, H) the first query state
    spread = float(first.std(0).mean() / first.abs().mean())  # query variation across prompts
    from taskmllm.data.shapesworld.vocab import COLORS, SHAPES

    words = [[joint.mllm.tokenizer.decode(p).split() for p in d[2]] for d in (data, val)]
    readout = {f"{name}@{layer}": phrase_readout(data[1][:, i, 0], words[0], val[1][:, i, 0], words[1], vocab)
               for i, layer in enumerate(layers) for name, vocab in (("shape", SHAPES), ("color", tuple(COLORS)))}
    data, val = ((d[0], q, *d[2:]) for d, q in zip((data, val), normalize_queries(args.query_norm, data[1], val[1])))
    results = {}
    for source in args.sources:
        for i, layer in enumerate(layers if source == "llm" else layers[:1]):
            at = lambda d: (d[0], d[1][:, i], *d[2:])  # noqa: E731  the query states of one depth
            name = source if source != "llm" or layers == (-1,) else f"llm@{layer}"
            results[name] = train_probe(source, joint, spec, at(data), at(val), vf, args.steps, args.lr, args.batch,
                                        seed=0, options=args.options)
    ratio = None
    if {"llm", "oracle"} <= results.keys():
        ratio = results["oracle"]["acc50"] / max(results["llm"]["acc50"], 1e-9)
    emit({"model": str(args.model), "train": len(data[3]), "val": len(val[3]), "steps": args.steps, "lr": args.lr,
          "batch": args.batch, "options": args.options, "cache_s": round(cache_s, 1), "query_relative_std": spread,
          "shipped_expert_on_llm_queries": shipped, "query_norm": args.query_norm,
          "phrase_readout_heldout_acc": readout, "probes": results, "oracle_over_llm_acc50": ratio}, args.out)


if __name__ == "__main__":
    main()
