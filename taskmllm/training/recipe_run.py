"""Run a whole recipe: every stage in order, the evaluation suites, the model card, and (optionally) ship it.

``taskmllm train-recipe tiny --out runs/tiny [--ship DIR]`` (``make train-default``) reads
``training/recipes/<name>/recipe.yaml`` (the stage order and the evaluation), trains each stage from the
previous stage's ``final/`` and evaluates the last one. It is resumable at two levels: a stage whose
``final/`` exists is skipped, and a stage killed mid-way resumes from its own last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from taskmllm.errors import ConfigError
from taskmllm.training.card import HEADLINE_ROWS, Bound, default_bounds, last_loss, write_model_card
from taskmllm.training.host import describe_host, load_average

RECIPES = Path(__file__).parent / "recipes"


@dataclass
class RecipePlan:
    """``recipe.yaml``: the stages in order and what evaluates the result.

    Attributes:
        name: the recipe's name (its folder under ``training/recipes``).
        stages: stage YAML names (without ``.yaml``), trained in this order.
        eval_suites: evaluation suites run on the last stage's model (``taskmllm eval --suite``).
        eval_n: questions per task / images per suite.
        compare: shipped models whose evaluation the card shows beside this one's (``eval.compare``).
        description: one paragraph for the model card.
        folder: the folder holding ``recipe.yaml`` and the stage YAMLs.
        ship: ``full`` (every weight) or ``adapter`` (the difference from the first stage's pretrained base,
            rebuilt from installed packages at load time; see :mod:`taskmllm.model.adapter`).
        bounds: the targets the card prints beside the headline numbers (``eval.targets``: a number is a floor,
            ``[low, high]`` a range with either end ``null``); default :func:`~taskmllm.training.card.default_bounds`.
    """

    name: str
    stages: list[str]
    eval_suites: list[str] = field(default_factory=lambda: ["shapes"])
    eval_n: int = 100
    compare: list[str] = field(default_factory=list)
    description: str = ""
    folder: Path = RECIPES
    ship: str = "full"
    bounds: dict[str, Bound] = field(default_factory=default_bounds)


def _targets(raw: dict, path: Path) -> dict[str, Bound]:
    """``eval.targets`` of ``recipe.yaml`` as bounds.

    Raises:
        ConfigError: an unknown metric, or a target that is neither a number nor ``[low, high]``.
    """
    unknown = sorted(set(raw) - set(HEADLINE_ROWS))
    if unknown:
        raise ConfigError(f"{path}: unknown eval.targets {unknown}; known: {sorted(HEADLINE_ROWS)}")
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out: dict[str, Bound] = {}
    for key, value in raw.items():
        if number(value):
            value = [value, None]
        if not (isinstance(value, list) and len(value) == 2 and all(v is None or number(v) for v in value)
                and value != [None, None]):
            raise ConfigError(f"{path}: eval.targets.{key} must be a number (a floor) or [low, high] with either "
                              f"end null, got {raw[key]!r}")
        out[key] = tuple(None if v is None else float(v) for v in value)
    return out


def load_plan(name: str) -> RecipePlan:
    """The plan of recipe ``name`` (a folder of ``training/recipes``) or of a recipe folder path."""
    folder = RECIPES / name if (RECIPES / name).is_dir() else Path(name)
    path = folder / "recipe.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in RECIPES.glob("*/recipe.yaml"))
        raise ConfigError(f"recipe {name!r}: no {path}; known recipes: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"stages", "eval", "description", "ship"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; known: ['description', 'eval', 'ship', 'stages']")
    if raw.get("ship", "full") not in ("full", "adapter"):
        raise ConfigError(f"{path}: ship must be 'full' or 'adapter', got {raw['ship']!r}")
    ev = raw.get("eval", {})
    unknown = sorted(set(ev) - {"suites", "n", "compare", "targets"})
    if unknown:
        raise ConfigError(f"{path}: unknown eval keys {unknown}; known: ['compare', 'n', 'suites', 'targets']")
    bounds = _targets(ev["targets"], path) if "targets" in ev else default_bounds()
    plan = RecipePlan(folder.name, list(raw.get("stages", [])), list(ev.get("suites", ["shapes"])),
                      int(ev.get("n", 100)), list(ev.get("compare", [])), str(raw.get("description", "")).strip(),
                      folder, str(raw.get("ship", "full")), bounds)
    missing = [s for s in plan.stages if not (folder / f"{s}.yaml").is_file()]
    if not plan.stages or missing:
        raise ConfigError(f"{path}: stages must name YAML files in {folder}; missing: {missing or 'all'}")
    return plan


def run_recipe(name: str, out: str | Path, overrides: Sequence[str] = (), ship: Optional[str | Path] = None,
               skip_eval: bool = False) -> Path:
    """Train every stage of recipe ``name`` under ``out``, evaluate, write ``MODEL_CARD.md``; return the model dir.

    ``overrides`` (``--a.b=c``) apply to every stage. With ``ship``, the final model, its card and learning
    curves are copied there atomically (the package-data directory of a shipped model).
    """
    from taskmllm.training.config import load_config
    from taskmllm.training.train import train

    plan, out = load_plan(name), Path(out)
    configs = []
    for i, stage in enumerate(plan.stages):  # every config is checked before any stage trains
        init = [f"--model.init={out / plan.stages[i - 1] / 'final'}"] if i else []
        configs.append(load_config(plan.folder / f"{stage}.yaml", [f"--out_dir={out / stage}", *init, *overrides]))
    log = _read_json(out / "recipe.json") or {"stages": {}}
    log["overrides"] = list(overrides)
    for stage, cfg in zip(plan.stages, configs):
        final = out / stage / "final"
        if (final / "config.json").is_file() and stage in log["stages"]:
            print(f"[{plan.name}] {stage}: done already ({final})")
            continue
        t0, host = time.perf_counter(), describe_host(cfg.device)
        train(cfg)
        host["load_avg_end"] = load_average()
        log["stages"][stage] = {"wall_s": round(time.perf_counter() - t0, 1), "steps": cfg.max_steps,
                                "batch_size": cfg.data.batch_size, "final_loss": last_loss(out / stage / "metrics.jsonl"),
                                "host": host}
        _write_json(out / "recipe.json", log)
    model = out / plan.stages[-1] / "final"
    if not skip_eval:
        log["eval"] = _evaluate(model, plan, out / "eval")
        _write_json(out / "recipe.json", log)
    card = write_model_card(out, plan, configs, log)
    if ship is not None:
        base = None
        if plan.ship == "adapter":
            mc = configs[0].model
            base = (mc.init, mc.builder_args())
        ship_model(model, card, out, Path(ship), base, log.get("eval", {}))
    return model


def _evaluate(model: Path, plan: RecipePlan, out: Path) -> dict:
    from taskmllm.eval.benchmarks import EvalOptions, evaluate

    done = {}
    for suite in plan.eval_suites:
        t0 = time.perf_counter()
        report = evaluate(model, suite, out / suite, EvalOptions(n=plan.eval_n))
        done[suite] = {"json": str(report.json_path), "wall_s": round(time.perf_counter() - t0, 1)}
    done["image_reliance"] = {"json": str(_image_reliance(model, plan.eval_n, out / "image_reliance.json"))}
    return done


def _image_reliance(model: Path, n: int, dest: Path) -> Path:
    """Answer nats the right image is worth, per question task (:mod:`taskmllm.eval.reliance`) -> ``dest``."""
    from taskmllm.eval.reliance import reliance_by_task
    from taskmllm.router.pipeline import Pipeline

    _write_json(dest, reliance_by_task(Pipeline.from_pretrained(model).model.mllm, n=n))
    return dest


def ship_model(model: Path, card: Path, run: Path, dest: Path, base: Optional[tuple[str, dict]] = None,
               evals: Optional[dict] = None) -> Path:
    """Copy the model directory, its card, the learning curves and the evaluation results (``eval/<suite>.json``,
    what other cards compare against) to ``dest`` in one rename.

    ``base = (builder name, its arguments)``: ship an adapter (the difference from that rebuilt base) instead
    of the full weights.
    """
    from taskmllm.model.io import atomic_directory_write, record_checksums

    def write(tmp: Path) -> None:
        def full_weights(folder: str, names: list[str]) -> list[str]:  # an adapter replaces them (experts stay)
            return ["model.safetensors"] if base and Path(folder) == model else []

        shutil.copytree(model, tmp, dirs_exist_ok=True, ignore=full_weights)
        if base:
            error = write_adapter_of(model, tmp, *base)
            print(f"adapter of {base[0]!r}: {sum(f.stat().st_size for f in tmp.rglob('*')) / 2**20:.1f} MB, "
                  f"largest weight difference after reloading {error:.2e}")
        shutil.copy(card, tmp / "MODEL_CARD.md")
        for suite, info in (evals or {}).items():
            (tmp / "eval").mkdir(exist_ok=True)
            shutil.copy(info["json"], tmp / "eval" / f"{suite}.json")
        curves = tmp / "curves"
        curves.mkdir()
        for png in sorted(run.glob("*.png")) + sorted(run.glob("*/loss.png")):
            shutil.copy(png, curves / (png.name if png.parent == run else f"{png.parent.name}.png"))
        record_checksums(tmp)  # the adapter replaced the full weights: the sums describe what ships

    return atomic_directory_write(dest, write)


def write_adapter_of(model: Path, dest: Path, base: str, base_args: dict) -> float:
    """Write the adapter of checkpoint ``model`` against ``BUILDERS[base](**base_args)`` into ``dest``.

    Returns the largest absolute weight difference between ``model`` and the adapter loaded back.
    """
    from taskmllm.model.adapter import adapter_error, diff_state, load_adapter, write_adapter
    import torch

    from taskmllm.model.mllm import TaskMLLM
    from taskmllm.zoo import BUILDERS

    tuned = TaskMLLM.from_pretrained(model).state_dict()  # LoRA factors in float16: a shipped smol fits in 30 MB
    diff = diff_state(tuned, BUILDERS[base](**base_args).state_dict(), factor_dtype=torch.float16)
    write_adapter(dest, diff, base, base_args)
    return adapter_error(tuned, load_adapter(dest, BUILDERS).state_dict())


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
