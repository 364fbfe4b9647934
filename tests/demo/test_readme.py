"""The README's Python example runs as written (the shipped "tiny" name pointed at a test checkpoint)."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = 'Pipeline.from_pretrained("tiny")'


def python_example() -> str:
    """The first ```python block of the README's "## Python" section."""
    text = README.read_text()
    section = text[text.index("\n## Python"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md has no ```python block under '## Python'"
    return match.group(1)


def test_readme_python_example_runs(demo_checkpoint, demo_pipeline, tmp_path, monkeypatch, capsys):
    code = python_example()
    assert code.count(TINY) == 1, f"the example should load the shipped model once with {TINY}"
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace(TINY, f"Pipeline.from_pretrained({str(demo_checkpoint)!r})"), "README.md", "exec"),
         {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "result.json").read_text())
    from taskmllm.demo.examples import example_file

    want = demo_pipeline(str(example_file("shapes-seg.png")), "Can you segment the bottommost blue object?")
    assert record["raw_text"] == want.raw_text and want.text in printed
    for name in ("overlay.png", "track-frame0.png"):
        assert (tmp_path / name).stat().st_size > 0, f"the example did not write {name}"
