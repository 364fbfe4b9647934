"""The model card of a recipe run: what was trained, how long each stage took, learning curves, the metrics.

Written by :func:`~taskmllm.training.recipe_run.run_recipe` as ``<run>/MODEL_CARD.md`` beside
``<run>/learning_curves.png``; everything in it is read from the run's files (``recipe.json``, each stage's
``metrics.jsonl`` and ``train_config.yaml``, the evaluation ``results.json``), nothing is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from taskmllm.training.host import hosts_text

#: (task, summary key) rows of the headline table and the floor issue #6 sets for the shipped default.
FLOORS = {"routing": 0.95, "vqa": 0.75, "seg": 0.55, "rec": 0.50, "det": 0.40, "track": 0.40, "pope_f1": 0.75}
#: upper bounds (the card prints "≤"): task tokens emitted on questions that need no expert
CEILINGS = {"false_call_rate": 0.02}
#: a bound of the headline table: (lowest, highest) allowed, either None
Bound = tuple[Optional[float], Optional[float]]
#: the headline rows and their labels, in the card's order
HEADLINE_ROWS = {"routing": "task-token routing accuracy (all questions)", "vqa": "VQA accuracy (exist/color/count)",
                 "exist": "  existence", "color": "  color", "count": "  count", "seg": "referring segmentation gIoU",
                 "rec": "REC Acc@0.5", "det": "detection AP50", "track": "tracking success AUC",
                 "false_call_rate": "  false-call rate (task tokens on VQA and caption questions)",
                 "pope_f1": "POPE-random F1", "pope_acc": "POPE-random accuracy",
                 "pope_yes_ratio": "  POPE-random yes-ratio"}
INTERVENTIONS_HEADING = "## Hallucination interventions (calibrated)"


def default_bounds() -> dict[str, Bound]:
    """The bounds a recipe gets when its ``recipe.yaml`` names none: :data:`FLOORS` and :data:`CEILINGS`."""
    return {**{k: (v, None) for k, v in FLOORS.items()}, **{k: (None, v) for k, v in CEILINGS.items()}}


def _bound_text(bound: Optional[Bound]) -> str:
    low, high = bound if bound is not None else (None, None)
    if low is not None and high is not None:
        return f"{low:.2f}–{high:.2f}"
    return f"≥ {low:.2f}" if low is not None else f"≤ {high:.2f}" if high is not None else ""


def headline(shapes: dict[str, Any], pope: dict[str, Any] | None) -> dict[str, float | None]:
    """The headline numbers of a ``shapes`` (and ``pope-shapes``) result: routing, VQA, seg, REC, det, track, POPE.

    ``routing`` is the fraction of questions whose emitted task tokens equal the reference's (all tasks);
    ``vqa`` is the mean accuracy of existence, color and count questions (each also returned).
    """
    summary = shapes.get("summary", {})
    score = {t: row.get("score") for t, row in summary.items()}
    routed = [(row["routing"], row["n"]) for row in summary.values() if row.get("routing") is not None]
    vqa = [score[t] for t in ("exist", "color", "count") if score.get(t) is not None]
    routing = sum(r * n for r, n in routed) / sum(n for _, n in routed) if routed else None
    out = {"routing": routing, "vqa": sum(vqa) / len(vqa) if vqa else None,
           "exist": score.get("exist"), "color": score.get("color"), "count": score.get("count"),
           "seg": _seg_giou(shapes), "rec": score.get("rec"), "det": shapes.get("tasks", {}).get("det", {}).get("AP50"),
           "track": score.get("track"), "false_call_rate": shapes.get("routing", {}).get("false_call_rate")}
    if pope is not None:
        random = pope["pope"]["splits"]["random"]
        out["pope_f1"] = random["f1"]
        out["pope_acc"], out["pope_yes_ratio"] = random.get("accuracy"), random.get("yes_ratio")
    return out


def _read_cache_stats(path: Path) -> dict[str, Any]:
    """A stage's ``call_cache.json`` (``stage.cached_calls``), or ``{}``."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _seg_giou(shapes: dict[str, Any]) -> float | None:
    """Referring segmentation gIoU (the floor's metric; the summary's headline is cIoU)."""
    return shapes.get("tasks", {}).get("seg", {}).get("giou")


def write_model_card(run: Path, plan, configs: Sequence, log: dict) -> Path:
    """Write ``<run>/MODEL_CARD.md`` and ``<run>/learning_curves.png``; returns the card's path."""
    curves = plot_learning_curves(run, plan.stages, log)
    lines = [f"# `{plan.name}` — model card", "", plan.description, "",
             "Reproduce: `" + f"taskmllm train-recipe --out {run} {plan.name} {' '.join(log.get('overrides', []))}".rstrip()
             + "`", "",
             "## Training", "", "| stage | trainable | steps × batch | lr | wall time | final loss |",
             "|---|---|---|---|---|---|"]
    total, reused = 0.0, 0.0
    for stage, cfg in zip(plan.stages, configs):
        info = log["stages"].get(stage, {})
        total += info.get("wall_s", 0.0)
        loss = final_loss(run / stage / "metrics.jsonl", info.get("final_loss"))
        trainable = ", ".join(f"{k}: {v}" for k, v in cfg.stage.trainable.items())
        lr = f"{cfg.optim.lr:g}" + ("" if cfg.optim.token_lr is None else f" (token rows {cfg.optim.token_lr:g})")
        wall = f"{info.get('wall_s', 0) / 60:.1f} min"
        cache = _read_cache_stats(run / stage / "call_cache.json")
        if cache.get("loaded_from"):  # the stage read a call cache an earlier identical run built
            built = cache.get("seconds", 0.0)
            reused += built
            wall += f" (+ {built / 60:.1f} min building its call cache, read from a file)"
        lines.append(f"| {stage} | {trainable} | {cfg.max_steps} × {cfg.data.batch_size} | {lr} | {wall} | {loss} |")
    first = configs[0]
    if reused:
        total_text = f"**{total / 60:.1f} min** + {reused / 60:.1f} min of call caching done before"
    else:
        total_text = f"**{total / 60:.1f} min**"
    hosts = hosts_text([(log["stages"].get(s) or {}).get("host") for s in plan.stages])
    lines += ["", f"Total training wall time: {total_text} {hosts}. Data: ShapesWorld "
              f"`train` split generated on the fly (world seed {first.data.seed}); training seed {first.seed}. "
              "Evaluation uses a world seed never used in training (`DEFAULT_EVAL_SEED`).", "",
              "![learning curves](curves/learning_curves.png)" if curves else "", ""]
    lines += _metrics_section(log.get("eval", {}), _compared(plan.compare), plan.bounds)
    lines += interventions_section(run / plan.stages[-1] / "final")
    path = run / "MODEL_CARD.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _setting(value: Any) -> str:
    """A setting as the card shows it: a long list of (layer, head) pairs by its size and layer span."""
    if isinstance(value, list) and len(value) > 8 and all(isinstance(v, list) and len(v) == 2 for v in value):
        layers = sorted({int(v[0]) for v in value})
        return f"{len(value)} heads in {len(layers)} layers ({layers[0]}–{layers[-1]}; all in interventions.json)"
    return str(value)


def interventions_section(model_dir: Path) -> list[str]:
    """The card's section listing the calibrated intervention settings of ``model_dir`` (its
    ``interventions.json``, written by ``taskmllm calibrate``); no lines when it has none."""
    from taskmllm.model.interventions.calibrated import load_calibration

    entries = load_calibration(model_dir, raw=True)
    if not entries:
        return []
    lines = ["", INTERVENTIONS_HEADING, "", "`intervention=\"vhr\"` / `\"var\"` / `\"zerotuning\"` (Pipeline, `taskmllm "
             "predict/eval --intervention`, the demo) run with these settings. Chosen by `taskmllm calibrate` on the "
             "validation world: objective POPE accuracy − CHAIR_S, caption recall may drop ≤ 0.02, and a setting must "
             "beat the plain model by 0.01, else the identity is stored.", "",
             "| intervention | settings | val objective: plain → chosen | POPE acc | CHAIR_S | recall | data |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in sorted(entries.items()):
        rec = entry.get("calibration") or {}
        settings = ", ".join(f"{k}={_setting(v)}" for k, v in entry["settings"].items() if v is not None)
        if (rec.get("profile") or {}).get("method") and entry["settings"].get("heads"):
            settings += f" ({rec['profile']['method']} head profile on {rec['profile'].get('questions')} questions)"
        chosen = next((row["metrics"] for row in rec.get("table", []) if row["settings"] == entry["settings"]), None)
        if chosen is None and rec:
            settings += " (identity: no candidate beat the plain model)"
        chosen = chosen or rec.get("baseline", {})
        base = rec.get("baseline", {})

        def pair(key: str) -> str:
            return f"{_fmt(base.get(key))} → {_fmt(chosen.get(key))}" if base else "–"

        data = (f"{rec.get('split')} world seed {rec.get('seed')}, {rec.get('n_images')} images, "
                f"{rec.get('candidates')} candidates") if rec else "–"
        objective = f"{_fmt(rec.get('baseline_score'))} → {_fmt(rec.get('score'))}" if rec else "–"
        lines.append(f"| {name} | {settings} | {objective} | {pair('pope_accuracy')} | {pair('chair_s')} | "
                     f"{pair('recall')} | {data} |")
    return lines


def update_card_interventions(model_dir: Path) -> Optional[Path]:
    """Rewrite the interventions section of ``model_dir/MODEL_CARD.md`` from its ``interventions.json``
    (replacing the section, or appending it); atomic. None when the directory has no card."""
    from taskmllm.model.io import atomic_write_text

    card = Path(model_dir) / "MODEL_CARD.md"
    if not card.is_file():
        return None
    lines = card.read_text().rstrip("\n").split("\n")
    if INTERVENTIONS_HEADING in lines:
        start = lines.index(INTERVENTIONS_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + lines[end:]
        while lines and not lines[-1].strip():
            lines.pop()
    return atomic_write_text(card, "\n".join(lines + interventions_section(Path(model_dir))) + "\n")


def _compared(names: Sequence[str]) -> dict[str, dict]:
    """Headline numbers and per-task summary of shipped models ``names`` (their ``eval/<suite>.json``)."""
    from taskmllm.zoo import SHIPPED

    out = {}
    for name in names:
        folder = SHIPPED.get(name, Path(name)) / "eval"
        if (folder / "shapes.json").is_file():
            shapes = json.loads((folder / "shapes.json").read_text())
            pope = json.loads((folder / "pope-shapes.json").read_text()) if (folder / "pope-shapes.json").is_file() else None
            out[name] = {"headline": headline(shapes, pope), "summary": shapes.get("summary", {}),
                         "n": shapes.get("n_per_task")}
    return out


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def _metrics_section(evals: dict, compared: dict[str, dict] | None = None,
                     bounds: Optional[dict[str, Bound]] = None) -> list[str]:
    """The metrics section: the headline rows with their ``bounds`` (default :func:`default_bounds`; a row with
    no number and no bound is left out), every task, decoding, image reliance."""
    bounds = default_bounds() if bounds is None else bounds
    if "shapes" not in evals:
        return ["## Metrics", "", "Not evaluated yet."]
    compared = compared or {}
    shapes = json.loads(Path(evals["shapes"]["json"]).read_text())
    pope = json.loads(Path(evals["pope-shapes"]["json"]).read_text()) if "pope-shapes" in evals else None
    numbers = headline(shapes, pope)
    n = shapes.get("n_per_task")
    others = "".join(f" | shipped `{name}`" for name in compared)
    beside = ", ".join(f"`{c}` (same command" + ("" if info.get("n") in (None, n) else f" at `--n {info['n']}`")
                       + ")" for c, info in compared.items())
    lines = ["## Metrics", "", f"`taskmllm eval --suite shapes --n {n}` (and `--suite pope-shapes`) on the test "
             f"world (seed {shapes.get('seed')})" + (f", beside the shipped {beside}" if compared else "") + ":", "",
             f"| metric | value{others} | target |", "|---|---|" + "---|" * len(compared) + "---|"]
    for key, label in HEADLINE_ROWS.items():
        value = numbers.get(key)
        if value is None and key not in bounds:
            continue
        beside = "".join(f" | {_fmt(c['headline'].get(key))}" for c in compared.values())
        lines.append(f"| {label} | {_fmt(value)}{beside} | {_bound_text(bounds.get(key))} |")
    lines += ["", "Every task (test split):", "", f"| task | n | routing | metric | score{others} |",
              "|---|---|---|---|---|" + "---|" * len(compared)]
    for task, row in shapes.get("summary", {}).items():
        beside = "".join(f" | {_fmt(c['summary'].get(task, {}).get('score'))}" for c in compared.values())
        lines.append(f"| {task} | {row['n']} | {row['routing']:.3f} | {row['metric']} | {_fmt(row.get('score'))}"
                     f"{beside} |")
    lines += ["", decoding_line(shapes)]
    if "image_reliance" in evals:
        lines += _reliance_section(json.loads(Path(evals["image_reliance"]["json"]).read_text()))
    return lines


def decoding_line(report: dict[str, Any]) -> str:
    """How the evaluated answers were decoded (from a report's metadata): greedy unless it says otherwise, and
    transformers' repetition processors at the values the report records (absent: off, the library's default)."""
    sampling = "sampled" if report.get("do_sample") else "greedy"
    penalty = report.get("repetition_penalty", 1.0)
    ngram = report.get("no_repeat_ngram_size", 0)
    return (f"Decoding of these numbers: {sampling}, `repetition_penalty` {penalty:g}"
            f"{' (off)' if penalty == 1.0 else ''}, `no_repeat_ngram_size` {ngram}{' (off)' if ngram == 0 else ''} "
            "(transformers' logits processors). `Pipeline`, `predict`, `eval` and the demo default to greedy with "
            "both off and take both as options.")


def _reliance_section(per_task: dict[str, dict]) -> list[str]:
    """The image-reliance table (:mod:`taskmllm.eval.reliance`): 0 nats = the answers ignore the image."""
    lines = ["", "Image reliance (`python bench/image_reliance.py`): teacher-forced answer NLL in nats with the "
             "question's own image vs. another scene's; a gap of 0 means the answers ignore the image.", "",
             "| task | n | NLL own image | NLL other image | gap |", "|---|---|---|---|---|"]
    for task, row in per_task.items():
        lines.append(f"| {task} | {row['n']} | {row['own_nll']:.3f} | {row['other_nll']:.3f} | {row['gap']:.3f} |")
    return lines


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def last_loss(metrics: Path) -> float | None:
    """The last ``loss_weighted`` of a stage's ``metrics.jsonl``; None when the file is absent or empty."""
    rows = _metrics(metrics)
    return rows[-1].get("loss_weighted") if rows else None


def final_loss(metrics: Path, recorded: float | None = None) -> str:
    """:func:`last_loss` as the card prints it; ``recorded`` (the value ``recipe.json`` kept when the stage
    finished) when the file is not in the run directory; else ``–``."""
    value = last_loss(metrics)
    value = recorded if value is None else value
    return "–" if value is None else f"{value:.3f}"


def plot_learning_curves(run: Path, stages: Sequence[str], log: Optional[dict] = None) -> Path | None:
    """One figure: every loss term of every stage against cumulative training wall time (minutes). A stage
    without ``metrics.jsonl`` in ``run`` gets an empty panel, and its ``wall_s`` in ``log`` (``recipe.json``)
    still moves the later stages' time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from taskmllm.training.train import CLOCK_KEYS

    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    offset, drew = 0.0, False
    for ax, stage in zip(axes[0], stages):
        rows = _metrics(run / stage / "metrics.jsonl")
        if not rows:
            ax.set_title(f"{stage} (no metrics.jsonl here)", fontsize=8)
            offset += ((log or {}).get("stages", {}).get(stage) or {}).get("wall_s", 0.0)
            continue
        minutes = [(offset + r.get("time_s", r["step"])) / 60 for r in rows]
        skip = {"step", "lr", "grad_norm", *CLOCK_KEYS}
        for key in sorted({k for r in rows for k in r} - skip):
            ax.plot(minutes, _smooth([r.get(key, float("nan")) for r in rows]), label=key, lw=1)
        ax.set_title(stage)
        ax.set_xlabel("minutes (cumulative)")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
        offset += rows[-1].get("time_s", 0.0)
        drew = True
    if not drew:
        plt.close(fig)
        return None
    axes[0][0].set_ylabel("loss (smoothed)")
    fig.tight_layout()
    path = run / "learning_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _smooth(values: list[float], k: int = 20) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-k:]
        out.append(sum(acc) / len(acc))
    return out
