"""Benchmarks: numbers measured as ratios to an anchor taken in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], path: Path | None) -> None:
    """A suite's result as JSON: into ``path`` (``--json``), else to standard output."""
    text = json.dumps(result, indent=1)
    if path:
        path.write_text(text)
    else:
        print(text)
