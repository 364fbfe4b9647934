"""What every benchmark does with its result: print the JSON and, with ``--out``, write it there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def emit(report: dict[str, Any], out: Optional[str | Path]) -> None:
    """Print ``report`` as indented JSON; also write it to ``out`` (parents created) when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
