"""Fuzz what configures a model or changes its run: interventions, model configs, stage YAML overrides and
corrupted checkpoints. Every case must end in a result or a typed error (see ``tests/fuzz/harness.py``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from taskmllm.model.interventions import VAR, VHR, ZeroTuning
from tests.conftest import tiny_config
from tests.fuzz.harness import fuzz_settings
from tests.fuzz.strategies import anything

GOOD = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
RECIPE = Path(__file__).resolve().parents[2] / "taskmllm" / "training" / "recipes" / "tiny" / "pretrain.yaml"
PARAMETERS = {VHR: ["alpha", "layers", "remove_outliers"],
              VAR: ["p", "rho", "tau", "min_image_attention", "sink_dims", "layers", "mode"],
              ZeroTuning: ["gamma", "heads", "gammas"]}
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 50), st.floats(0, 3))
INDEX_LISTS = st.lists(st.one_of(st.integers(-6, 6), st.floats(), st.text(max_size=1)), max_size=4)


@fuzz_settings(ci=30, long=1000)
@given(data=st.data(), kind=st.sampled_from([VHR, VAR, ZeroTuning, "object"]))
def test_fuzz_interventions(fuzz_pipeline, figures, data, kind):
    if kind == "object":
        hook = data.draw(st.one_of(anything(), st.sampled_from([VHR, VAR, ZeroTuning])))
        figures.run("intervention", lambda: fuzz_pipeline(GOOD, "Describe it.", intervention=hook, max_new_tokens=3),
                    lambda: repr(hook))
        return
    names = data.draw(st.lists(st.sampled_from(PARAMETERS[kind]), unique=True, max_size=3))
    kwargs = {n: data.draw(st.one_of(NUMBERS, INDEX_LISTS, anything(), st.sampled_from(["paper", "official"])))
              for n in names}

    def call():
        hook = kind(**kwargs)
        fuzz_pipeline(GOOD, "Is there a star?", intervention=hook, max_new_tokens=3)

    figures.run("intervention", call, lambda: f"{kind.__name__}(**{kwargs!r})")


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, prefix + (key,))
    else:
        yield prefix


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


@fuzz_settings(ci=30, long=1000)
@given(data=st.data())
def test_fuzz_model_configs(fuzz_tokenizer, figures, data):
    from taskmllm.model.config import MLLMConfig
    from taskmllm.model.config_check import llm_parameters
    from taskmllm.model.mllm import TaskMLLM

    raw = tiny_config(fuzz_tokenizer).to_dict()
    leaves = [p for p in _leaves(raw) if p[:2] != ("tokens", "tasks")]  # task tokens would grow the tokenizer
    edits = []
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(leaves))
        edits.append((".".join(path), data.draw(st.one_of(anything(), st.integers(-2, 2**32), NUMBERS))))
        _set(raw, path, edits[-1][1])

    def call():
        config = MLLMConfig.from_dict(json.loads(json.dumps(raw, default=repr)))
        from taskmllm.model.config_check import check_llm

        if llm_parameters(check_llm(config.llm)) < 20_000_000 and config.vision.image_size <= 256:
            TaskMLLM(config, fuzz_tokenizer)  # build only what is small: the check, not the allocation, is tested

    figures.run("model config", call, lambda: repr(edits))


STAGE_KEYS = ["optim.lr", "optim.betas", "optim.eps", "optim.token_lr", "optim.grad_clip", "optim.warmup_steps",
              "optim.min_lr_ratio", "optim.weight_decay", "stage.lm_weight", "stage.lora.r", "stage.lora.dropout",
              "stage.trainable.llm", "stage.expert_weights.seg", "stage.aux.focus.weight", "data.batch_size",
              "data.length", "data.seed", "data.sources.shapes.mix.seg", "data.sources.shapes.weight",
              "data.sources.shapes.image_size", "data.sources.shapes.kind", "model.max_frames", "model.llm.hidden_size",
              "max_steps", "grad_accum", "seed", "device", "precision", "resume", "keep_last", "save_every",
              "model.init", "stage.name", "out_dir"]
YAML_VALUES = st.one_of(st.sampled_from([".nan", ".inf", "-.inf", "-1", "0", "1e400", "[2, -1]", "[0.9]", "{}",
                                         "[]", "null", "true", "'x'", "cuda:7", "foo", "2**31", "1e-3", "[1,"]),
                        st.integers(-10, 10**12).map(str), st.floats(allow_nan=False).map(repr), st.text(max_size=6))


@fuzz_settings(ci=30, long=1000)
@given(overrides=st.lists(st.tuples(st.one_of(st.sampled_from(STAGE_KEYS), st.text(max_size=8)), YAML_VALUES),
                          min_size=1, max_size=3))
def test_fuzz_stage_overrides(figures, overrides):
    from taskmllm.training.config import check_paths, load_config

    with tempfile.TemporaryDirectory() as tmp:
        argv = [f"--{k}={v}" for k, v in overrides] + [f"--out_dir={tmp}/run"] * (not any(k == "out_dir"
                                                                                           for k, _ in overrides))
        figures.run("stage config", lambda: check_paths(load_config(RECIPE, argv)), lambda: repr(argv))


CHECKPOINT_FILES = ["config.json", "model.safetensors", "checksums.json", "tokenizer/tokenizer.json",
                    "tokenizer/tokenizer_config.json", "experts/seg/config.json", "experts/det/model.safetensors"]


@fuzz_settings(ci=20, long=800)
@given(edits=st.lists(st.tuples(st.sampled_from(CHECKPOINT_FILES),
                                st.sampled_from(["flip", "truncate", "delete", "random", "json"]),
                                st.integers(0, 2**31), st.binary(min_size=1, max_size=64)), min_size=1, max_size=2),
       json_value=anything())
def test_fuzz_corrupted_checkpoints(tiny_checkpoint, figures, edits, json_value):
    from taskmllm.router.joint import JointModel

    def call():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(shutil.copytree(tiny_checkpoint, Path(tmp) / "ck"))
            for name, how, at, blob in edits:
                _corrupt(path / name, how, at, blob, json_value)
            JointModel.from_pretrained(path)

    figures.run("checkpoint", call, lambda: repr(edits)[:300])


def _corrupt(file: Path, how: str, at: int, blob: bytes, json_value) -> None:
    if not file.exists():
        return
    data = bytearray(file.read_bytes())
    if how == "delete":
        file.unlink()
    elif how == "truncate":
        file.write_bytes(bytes(data[: at % (len(data) + 1)]))
    elif how == "random":
        file.write_bytes(blob)
    elif how == "json" and file.suffix == ".json":
        file.write_text(json.dumps(json_value, default=repr))
    elif data:
        start = at % len(data)
        data[start:start + len(blob)] = blob
        file.write_bytes(bytes(data))
