"""Plots of a device-pass benchmark document (gpu_bench.py's): splitserve with graphs, eager,
transformers and the bound.

    python bench/gpu/gpu_plots.py RESULTS.json [PNG]   # redraws a saved run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from splitserve.bench.plots import finish, log_axes  # noqa: E402

# (color, style) of each row label's line
LINES = {"graphs": ("C0", "-"), "eager": ("C0", ":"), "splitserve": ("C0", "-"), "transformers": ("C1", "-")}
BOUND = ("0.3", "--")
MARKERS = "os^Dv"


def label(row: dict) -> str:
    """transformers; splitserve's decode "graphs" or "eager"; splitserve's prefill "splitserve"."""
    if row["system"] == "transformers" or row["phase"] == "prefill":
        return row["system"]
    return "graphs" if row["graphs"] else "eager"


def plot_gpu(doc: dict, path: Path) -> Path:
    rows = doc["results"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    decode = [r for r in rows if r["phase"] == "decode"]
    batch = [r for r in decode if r["curve"] == "batch"]
    keys = [r for r in decode if r["curve"] == "key_len"]
    prefill = [r for r in rows if r["phase"] == "prefill"]
    key_of_batch = f" ({batch[0]['key_len']} keys)" if batch else ""
    _lines(axes[0, 0], batch, "batch_size", [None], f"decode vs batch size{key_of_batch}", "ms per step")
    _lines(axes[0, 1], keys, "key_len", sorted({r["batch_size"] for r in keys}), "decode vs key length", "ms per step")
    _lines(axes[1, 0], prefill, "prompt_len", [None], "prefill vs prompt length (batch 1)", "ms")
    _ratios(axes[1, 1], batch)
    bound = f"bound: copy {doc['bandwidth_gb_s']:.0f} GB/s, matmul {doc['matmul_tflop_s']:.0f} TFLOP/s"
    return finish(fig, path, f"{doc['model']}, {doc['dtype']}, {doc['device']}, torch {doc['torch']}\n{bound}")


def _lines(ax, rows: list[dict], x: str, batches: list, title: str, ylabel: str) -> None:
    ax.set_title(title)
    if not rows:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for marker, b in zip(MARKERS, batches):
        mine = [r for r in rows if b is None or r["batch_size"] == b]
        suffix = f" B={b}" if b is not None else ""
        for name, (color, style) in LINES.items():
            line = sorted((r[x], r["ms"]) for r in mine if label(r) == name)
            if line:
                ax.plot(*zip(*line), style, marker=marker, color=color, label=name + suffix)
        bound = sorted({(r[x], r["bound_ms"]) for r in mine})
        ax.plot(*zip(*bound), BOUND[1], color=BOUND[0], marker=marker, markersize=3,
                label=f"{mine[0]['bound']} bound{suffix}")
    log_axes(ax, sorted({r[x] for r in rows}), x.replace("_", " "), ylabel)
    ax.legend(fontsize=8)


def _ratios(ax, rows: list[dict]) -> None:
    """How far each system is from the bound, per batch size."""
    ax.set_title("decode time / bandwidth bound")
    for name, (color, style) in LINES.items():
        line = sorted((r["batch_size"], r["ms"] / r["bound_ms"]) for r in rows if label(r) == name)
        if line:
            ax.plot(*zip(*line), style, marker="o", color=color, label=name)
    if rows:
        log_axes(ax, sorted({r["batch_size"] for r in rows}), "batch size", "x bound")
        ax.axhline(1.0, color=BOUND[0], linestyle=BOUND[1])
        ax.legend(fontsize=8)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python bench/gpu/gpu_plots.py RESULTS.json [PNG]", file=sys.stderr)
        return 2
    src = Path(argv[0])
    print(plot_gpu(json.loads(src.read_text()), Path(argv[1]) if len(argv) == 2 else src.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
