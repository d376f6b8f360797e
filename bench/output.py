"""Where a benchmark's results go: the JSON document, when asked for, and the PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


def save(doc: dict, json_path: Path | None, plot_dir: Path, default_stem: str,
         plot: Callable[[dict, Path], Path]) -> None:
    """The plot is named after the JSON file, or `default_stem` without one."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
    stem = json_path.stem if json_path else default_stem
    plot_dir.mkdir(parents=True, exist_ok=True)
    print(f"plot: {plot(doc, plot_dir / f'{stem}.png')}", file=sys.stderr)
