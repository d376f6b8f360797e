"""Plots of benchmark results (matplotlib, Agg).

`python -m splitserve.bench.plots RESULTS.json [PNG]` redraws a saved engine benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib import ticker  # noqa: E402

COLORS = {"splitserve": "C0", "transformers": "C1"}
FLOOR_COLOR = "0.45"
MARKERS = "os^Dv<>p"

# (phase, curve, x key, title, y label): one panel each
ENGINE_PANELS = (
    ("decode", "batch", "batch_size", "decode vs batch size", "ms per step"),
    ("decode", "key_len", "key_len", "decode vs key length", "ms per step"),
    ("prefill", "prompt_len", "prompt_len", "prefill vs prompt length (batch 1)", "ms"),
    ("prefill", "prefill_batch", "batch_size", "prefill vs batch size (128-token prompts)", "ms"),
)


def plot_engine(doc: dict, path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, panel in zip(axes.flat, ENGINE_PANELS):
        _panel(ax, doc["results"], *panel)
    _mixed(axes[1, 1], doc["results"])
    return finish(fig, path, f"engine benchmark: {doc['model']}, {doc['dtype']}, {doc['device']}")


def finish(fig, path: Path, title: str) -> Path:
    """Title the figure, lay it out and write it to `path` (closed after); returns `path`."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def label_axes(ax, title: str, xlabel: str | None, ylabel: str, grid: str = "both", **legend) -> None:
    """A panel's title, axis labels, grid and legend (fontsize 8 unless `legend` says otherwise).
    grid: "both", lines at the minor ticks too; "major"; "y", the major ones across (bar charts)."""
    ax.set_title(title)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if grid == "y":
        ax.grid(True, axis="y", alpha=0.3)
    else:
        ax.grid(True, which=grid, alpha=0.3)
    ax.legend(**{"fontsize": 8, **legend})


def _panel(ax, results: list[dict], phase: str, curve: str, x: str, title: str, ylabel: str) -> None:
    rows = [r for r in results if r["phase"] == phase and r["curve"] == curve]
    ax.set_title(title)
    if not rows:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    # The key-length curve has a line per batch size; the other curves have one batch or vary it.
    batches = sorted({r["batch_size"] for r in rows}) if curve == "key_len" else [None]
    for marker, batch in zip(MARKERS, batches):
        mine = [r for r in rows if batch is None or r["batch_size"] == batch]
        suffix = f" B={batch}" if batch is not None else ""
        for system, color in COLORS.items():
            line = sorted((r[x], r["ms"]) for r in mine if r["system"] == system)
            if line:
                ax.plot(*zip(*line), marker=marker, color=color, label=system + suffix)
        floor = sorted({(r[x], r["floor_ms"]) for r in mine})
        ax.plot(*zip(*floor), "--", marker=marker, color=FLOOR_COLOR, markersize=4, label="floor (matmuls)" + suffix)
    log_axes(ax, sorted({r[x] for r in rows}), x.replace("_", " "), ylabel)
    ax.legend(fontsize=8)


def log_axes(ax, xs: list, xlabel: str, ylabel: str) -> None:
    """log2 x ticked at the measured values, log y; plain numbers, not powers, on both."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    plain_log(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def plain_log(ax, which: str) -> None:
    """A log axis ("x" or "y") written in plain numbers, minor ticks labelled as densely as its span allows."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(_PlainLog())
    axis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.8)))


class _PlainLog(ticker.LogFormatter):
    """LogFormatter's choice of which ticks to label, written as 40000 rather than 4e+04."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _mixed(ax, results: list[dict]) -> None:
    """The mixed batch as lone points beside the equal-length batch curve."""
    rows = [r for r in results if r.get("label") == "mixed-8"]
    if not rows:
        return
    ticks = {int(t) for t in ax.get_xticks()} if ax.axison else set()
    if not ax.axison:  # the batch curve was skipped: the mixed points get the panel to themselves
        ax.set_axis_on()
        ax.texts[0].remove()
    tokens = rows[0]["prompt_len"]
    for r in rows:
        ax.scatter(r["batch_size"], r["ms"], marker="*", s=140, color=COLORS[r["system"]], zorder=3,
                   label=f"{r['system']} mixed-8 ({tokens} tok)")
    ax.scatter(rows[0]["batch_size"], rows[0]["floor_ms"], marker="*", s=80, color=FLOOR_COLOR, zorder=3,
               label=f"floor mixed-8 ({tokens} tok)")
    log_axes(ax, sorted(ticks | {rows[0]["batch_size"]}), "batch size", "ms")
    ax.legend(fontsize=8)


def redraw(argv: list[str] | None, module: str, plot) -> int:
    """`python -m MODULE RESULTS.json [PNG]`: draw a saved result again."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print(f"usage: python -m {module} RESULTS.json [PNG]", file=sys.stderr)
        return 2
    src = Path(args[0])
    out = Path(args[1]) if len(args) == 2 else src.with_suffix(".png")
    print(plot(json.loads(src.read_text()), out))
    return 0


def main(argv: list[str] | None = None) -> int:
    return redraw(argv, "splitserve.bench.plots", plot_engine)


if __name__ == "__main__":
    sys.exit(main())
