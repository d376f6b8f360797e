"""Plots of `splitserve bench serve` results (matplotlib, Agg).

`python -m splitserve.bench.serve_plots RESULTS.json [PNG]` redraws a saved serving benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib import ticker  # noqa: E402

from .plots import finish, label_axes, plain_log, redraw  # noqa: E402

COLORS = {"pipeline": "C0", "engine": "C1"}
STYLES = ("-", "--", ":", "-.")


def plot_serve(doc: dict, path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    results, levels = doc["results"], doc["cdf_levels"]
    _cdf(axes[0, 0], results, levels, "itl_cdf_ms", "inter-token latency", "ms between consecutive tokens")
    _cdf(axes[0, 1], results, levels, "ttft_cdf_ms", "time to first token", "ms from send to first token")
    _percentiles(axes[1, 0], results)
    _throughput(axes[1, 1], results)
    threads = f"{doc['threads']} thread(s) per worker{', pinned' if doc.get('pinned') else ''}; " \
              f"engine {doc['engine_threads']} thread(s)"
    return finish(fig, path, f"serving benchmark ({doc['scenario']}): {doc['model']}, {doc['device']}\n{threads}")


def _label(r: dict) -> str:
    return f"c={r['concurrency']}" if r["load"] == "concurrency" else f"{r['rate']:g} req/s"


def _points(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(_label(r) for r in results))


def _cdf(ax, results: list[dict], levels: list[float], key: str, title: str, xlabel: str) -> None:
    """On a logit y axis, so that the tail (p99, p99.9) gets as much room as the median."""
    style = dict(zip(_points(results), STYLES * 4))
    for r in results:
        pairs = [(x, q) for x, q in zip(r[key], levels) if 0 < q < 1 and x > 0]
        if pairs:
            xs, qs = zip(*pairs)
            ax.plot(xs, qs, style[_label(r)], color=COLORS[r["system"]], label=f"{r['system']} {_label(r)}")
    plain_log(ax, "x")
    ax.set_yscale("logit")
    ax.set_yticks([0.1, 0.5, 0.9, 0.99, 0.999])
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"p{100 * v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    label_axes(ax, f"{title} (CDF)", xlabel, "fraction at or below")


def _percentiles(ax, results: list[dict]) -> None:
    points = _points(results)
    for system, color in COLORS.items():
        mine = {_label(r): r for r in results if r["system"] == system}
        for metric, marker in (("ttft_ms", "o"), ("itl_ms", "s")):
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [mine[p][metric][q] if p in mine else None for p in points]
                ax.plot(points, [float("nan") if y is None else y for y in ys], style, marker=marker, color=color,
                        label=f"{system} {metric.removesuffix('_ms').upper()} {q}")
    plain_log(ax, "y")
    label_axes(ax, "latency percentiles per load", "load", "ms", fontsize=7, ncol=2)


def _throughput(ax, results: list[dict]) -> None:
    points = _points(results)
    width = 0.8 / len(COLORS)
    for k, (system, color) in enumerate(COLORS.items()):
        mine = {_label(r): r["output_tok_s"] for r in results if r["system"] == system}
        xs = [i + (k - (len(COLORS) - 1) / 2) * width for i, p in enumerate(points) if p in mine]
        ys = [mine[p] for p in points if p in mine]
        bars = ax.bar(xs, ys, width, color=color, label=system)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(points)), points)
    label_axes(ax, "output tokens per second", "load", "tokens/s", grid="y")


def main(argv: list[str] | None = None) -> int:
    return redraw(argv, "splitserve.bench.serve_plots", plot_serve)


if __name__ == "__main__":
    sys.exit(main())
