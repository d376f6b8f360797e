"""Where a benchmark's results go: the JSON document, when asked for, and the PNG (the flags that
say where, and `save`); and how the printed tables write a number."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

RESULTS = Path("bench/results")


def add_output_args(p: argparse.ArgumentParser, plot_dir: Path = RESULTS) -> None:
    """--json and --plot-dir, the arguments of `save`."""
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot-dir", type=Path, default=plot_dir, help="where the PNG goes")


def save(doc: dict, json_path: Path | None, plot_dir: Path, default_stem: str,
         plot: Callable[[dict, Path], Path]) -> None:
    """The plot is named after the JSON file, or `default_stem` without one."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
    stem = json_path.stem if json_path else default_stem
    plot_dir.mkdir(parents=True, exist_ok=True)
    print(f"plot: {plot(doc, plot_dir / f'{stem}.png')}", file=sys.stderr)


def num(x: float | None) -> str:
    """A measurement in a printed table: three significant digits below 10, one decimal above; - for none."""
    return "-" if x is None else f"{x:.3g}" if x < 10 else f"{x:.1f}"
