"""Every bad CLI invocation of the hardening issue, run as a user runs it (``python -m taskmllm.cli ...`` in a
subprocess): exit code 2, one line on stderr naming the problem, never a traceback.

The subprocesses run concurrently (each imports torch), against the tests' tiny checkpoint and copies of it
corrupted one way each; the whole table takes well under a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from taskmllm.cli_args import run_command
from taskmllm.demo.examples import example_file

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "taskmllm" / "training" / "recipes" / "tiny" / "pretrain.yaml"
IMAGE = str(example_file("shapes-seg.png"))


def _corrupt(checkpoint: Path, root: Path, name: str, edit) -> str:
    path = shutil.copytree(checkpoint, root / name)
    edit(path)
    return str(path)


def _config_edit(section, key, value):
    def edit(path: Path) -> None:
        data = json.loads((path / "config.json").read_text())
        (data[section] if section else data)[key] = value
        (path / "config.json").write_text(json.dumps(data))
    return edit


def _write(name: str, content: bytes):
    return lambda path: (path / name).write_bytes(content)


def _adapter(path: Path) -> None:
    from taskmllm.model.adapter import write_adapter

    (path / "model.safetensors").unlink()
    (path / "checksums.json").unlink()
    write_adapter(path, {}, "tiny", {"nope": 1})


def _yaml(root: Path, name: str, text: str) -> str:
    path = root / name
    path.write_text(f"inherit: {STAGE}\n{text}")
    return str(path)


def _table(ckpt: Path, root: Path) -> list[tuple[str, list, str]]:
    """(id, argv, regex the one stderr line must match)."""
    (root / "a-file").write_text("x")
    (root / "report.json").write_text("{}")
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00")
    (root / "syntax.yaml").write_text("stage:\n  name: [unclosed\noptim: {lr: 1}\n")
    bad = lambda name, edit: _corrupt(ckpt, root, name, edit)  # noqa: E731
    model = ["--model", str(ckpt)]
    return [
        ("predict --out DIR", ["predict", *model, "--image", IMAGE, "Hi.", "--out", str(root)],
         r"predict --out .* is a directory; give a file name"),
        ("predict --out under a file", ["predict", *model, "--image", IMAGE, "Hi.", "--out", f"{root}/a-file/o.png"],
         r"predict --out .*/a-file/o.png: .*/a-file is a file, not a directory"),
        ("predict invalid UTF-8 instruction", ["predict", *model, b"Segment \xff the circle"],
         r"the instruction is not valid Unicode text: character 8 is U\+DCFF, a lone surrogate"),
        ("predict --device foo", ["predict", *model, "--device", "foo", "Hi."],
         r"argument --device: unknown device 'foo'"),
        ("predict --device cuda:7", ["predict", *model, "--device", "cuda:7", "Hi."],
         r"argument --device: device 'cuda:7' is not available"),
        ("binary config.json", ["predict", "--model", bad("binary", _write("config.json", b"\x00\xff\xfe\x89")), "Hi."],
         r"config.json: .*not a UTF-8 JSON file"),
        ("malformed config.json", ["predict", "--model", bad("malformed", _write("config.json", b"{\"llm\": ")), "Hi."],
         r"config.json: .*not a UTF-8 JSON file \(Expecting value"),
        ("garbage tokenizer.json", ["predict", "--model", bad("tok", _write("tokenizer/tokenizer.json", b"%%%")),
                                    "Hi."], r"tokenizer: cannot read the tokenizer"),
        ("hidden_size -1", ["predict", "--model", bad("h-1", _config_edit("llm", "hidden_size", -1)), "Hi."],
         r"llm.hidden_size must be an integer in \[1, 65536\], got -1"),
        ("hidden_size abc", ["predict", "--model", bad("habc", _config_edit("llm", "hidden_size", "abc")), "Hi."],
         r"llm.hidden_size must be an integer in \[1, 65536\], got 'abc'"),
        ("unknown model_type", ["predict", "--model", bad("mt", _config_edit("llm", "model_type", "lama")), "Hi."],
         r"llm.model_type 'lama' is not a causal language model transformers knows \(did you mean 'llama'\?\)"),
        ("vision image_size 0", ["predict", "--model", bad("v0", _config_edit("vision", "image_size", 0)), "Hi."],
         r"vision.image_size must be an integer in \[1, 4096\], got 0"),
        ("vocab_size 2**31", ["predict", "--model", bad("vocab", _config_edit("llm", "vocab_size", 2**31)), "Hi."],
         r"llm.vocab_size must be an integer in \[1, 2097152\], got 2147483648"),
        ("bad adapter base_args", ["predict", "--model", bad("adapter", _adapter), "Hi."],
         r"adapter.json: base_args do not fit the 'tiny' builder: got an unexpected keyword argument 'nope'"),
        ("train binary YAML", ["train", str(root / "binary.yaml")], r"binary.yaml: not a UTF-8 text file"),
        ("train YAML syntax error", ["train", str(root / "syntax.yaml")],
         r"syntax.yaml: invalid YAML at line 3, column 6: .*"),
        ("train lr .nan", ["train", _yaml(root, "nan.yaml", "optim: {lr: .nan}\n")],
         r"optim.lr must be a finite number in \(0, 10\], got nan"),
        ("train betas [2, -1]", ["train", str(STAGE), "--optim.betas=[2, -1]"],
         r"optim.betas\[0\] must be a finite number in \[0, 1\), got 2"),
        ("train negative mix weight", ["train", str(STAGE), "--data.sources.shapes.mix.seg=-1"],
         r"data.sources.shapes: mix.seg: a weight must be a finite number >= 0, got -1"),
        ("train --device=cuda:7", ["train", str(STAGE), "--device=cuda:7", f"--out_dir={root}/run"],
         r"device 'cuda:7' is not available"),
        ("train --device=foo", ["train", str(STAGE), "--device=foo", f"--out_dir={root}/run"],
         r"unknown device 'foo'"),
        ("train --out_dir under a file", ["train", str(STAGE), f"--out_dir={root}/a-file/run"],
         r"out_dir .*/a-file/run: .*/a-file is a file, not a directory"),
        ("eval --out an existing file", ["eval", *model, "--suite", "shapes", "--out", str(root / "report.json")],
         r"eval --out .*report.json is an existing file; give a directory"),
        ("eval --n 0", ["eval", *model, "--suite", "shapes", "--out", str(root / "r"), "--n", "0"],
         r"argument --n: must be an integer >= 1, got 0"),
        ("eval --max-new-tokens 0", ["eval", *model, "--suite", "shapes", "--out", str(root / "r"),
                                     "--max-new-tokens", "0"], r"argument --max-new-tokens: must be an integer >= 1"),
        ("predict --repetition-penalty 0", ["predict", *model, "Describe it.", "--repetition-penalty", "0"],
         r"argument --repetition-penalty: must be a number > 0, got .0."),
        ("eval --no-repeat-ngram-size -1", ["eval", *model, "--suite", "shapes", "--out", str(root / "r"),
                                            "--no-repeat-ngram-size", "-1"],
         r"argument --no-repeat-ngram-size: must be an integer >= 0, got -1"),
        ("eval --tasks colour", ["eval", *model, "--suite", "shapes", "--out", str(root / "r"), "--tasks", "exist",
                                 "colour"], r"EvalOptions.tasks: \['colour'\]; the shapes suite's tasks are"),
        ("demo --port -1", ["demo", *model, "--port", "-1"], r"argument --port: must be a port number in 1..65535"),
        ("demo --port 70000", ["demo", *model, "--port", "70000"], r"must be a port number in 1..65535, got 70000"),
        ("demo --host 999.1.1.1", ["demo", *model, "--host", "999.1.1.1"],
         r"argument --host: must be an IP address .* or a host name, got '999.1.1.1'"),
        ("convert garbage config.json", ["convert", "llava-hf", bad("conv", _write("config.json", b"\x00garbage")),
                                         str(root / "out")], r"config.json: not a readable JSON config"),
        ("convert a taskmllm directory", ["convert", "llava-hf", str(ckpt), str(root / "out")],
         r"model_type None is not 'llava': .*\(a taskmllm checkpoint: load it with Pipeline.from_pretrained\)"),
        ("data preview --out DIR", ["data", "preview", "--out", str(root)], r"data preview --out .* is a directory"),
        ("data preview --n 0", ["data", "preview", "--n", "0"], r"argument --n: must be an integer >= 1, got 0"),
        ("data preview --n -1", ["data", "preview", "--n", "-1"], r"argument --n: must be an integer >= 1, got -1"),
        ("data preview --seed -3", ["data", "preview", "--seed", "-3"],
         r"argument --seed: must be an integer >= 0, got -3"),
    ]


def _run(argv: list, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TASKMLLM_LOG_DIR": str(root / "logs")}
    args = [os.fsencode(a) if isinstance(a, str) else a for a in argv]
    return subprocess.run([sys.executable.encode(), b"-m", b"taskmllm.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """id -> (argv, regex, CompletedProcess) of every row, run four at a time."""
    root = tmp_path_factory.mktemp("cli")
    table = _table(tiny_checkpoint, root)
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda row: _run(row[1], root), table))
    return {row[0]: (row[1], row[2], proc) for row, proc in zip(table, done)}


_ROW_IDS = [
    "predict --out DIR", "predict --out under a file", "predict invalid UTF-8 instruction", "predict --device foo",
    "predict --device cuda:7", "binary config.json", "malformed config.json", "garbage tokenizer.json",
    "hidden_size -1", "hidden_size abc", "unknown model_type", "vision image_size 0", "vocab_size 2**31",
    "bad adapter base_args", "train binary YAML", "train YAML syntax error", "train lr .nan", "train betas [2, -1]",
    "train negative mix weight", "train --device=cuda:7", "train --device=foo", "train --out_dir under a file",
    "eval --out an existing file", "eval --n 0", "eval --max-new-tokens 0", "predict --repetition-penalty 0",
    "eval --no-repeat-ngram-size -1", "eval --tasks colour", "demo --port -1", "demo --port 70000",
    "demo --host 999.1.1.1", "convert garbage config.json", "convert a taskmllm directory",
    "data preview --out DIR", "data preview --n 0", "data preview --n -1", "data preview --seed -3",
]


@pytest.mark.parametrize("row", _ROW_IDS)
def test_bad_invocation_exits_2_with_one_line_and_no_traceback(runs, row):
    argv, pattern, proc = runs[row]
    err = proc.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert proc.returncode == 2, (proc.returncode, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("taskmllm"), lines[0]
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def test_the_table_covers_every_row(runs):
    assert sorted(runs) == sorted(_ROW_IDS)


def test_convert_on_a_taskmllm_directory_fails_fast_in_process(tiny_checkpoint, tmp_path, capsys):
    from taskmllm.cli import main

    start = time.perf_counter()
    assert main(["convert", "llava-hf", str(tiny_checkpoint), str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 5.0
    assert "is not 'llava'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unexpected_exception_is_one_line_and_a_log_with_the_traceback(tmp_path, monkeypatch, capsys):
    import argparse

    monkeypatch.setenv("TASKMLLM_LOG_DIR", str(tmp_path))

    def broken(args: argparse.Namespace) -> int:
        return {}["missing"]  # a bug: KeyError

    assert run_command(broken, argparse.Namespace(), ["predict", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("taskmllm: internal error: KeyError: 'missing' (traceback in ")
    log = Path(err[0].split("traceback in ", 1)[1].split(";", 1)[0])
    text = log.read_text()
    assert log.parent == tmp_path and "command: taskmllm predict x" in text
    assert "Traceback (most recent call last)" in text and "KeyError: 'missing'" in text


def test_a_project_error_and_an_os_error_exit_2(capsys):
    import argparse

    from taskmllm.errors import InputError

    def bad_input(args):
        raise InputError("the image is\nbroken")

    def full_disk(args):
        raise OSError(28, "No space left on device")

    assert run_command(bad_input, argparse.Namespace()) == 2
    assert run_command(full_disk, argparse.Namespace()) == 2
    assert capsys.readouterr().err.splitlines() == ["taskmllm: error: the image is broken",
                                                    "taskmllm: error: [Errno 28] No space left on device"]


def test_decompression_bomb_through_predict(tiny_checkpoint, tmp_path, capsys):
    from taskmllm.cli import main

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    assert main(["predict", "--model", str(tiny_checkpoint), "--image", str(bomb), "Hi."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image bomb.png has more than 179 megapixels" in err[0]
