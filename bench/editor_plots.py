"""Plots of `splitserve bench editor` results (matplotlib, Agg).

`python -m splitserve.bench.editor_plots RESULTS.json [PNG]` redraws a saved run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from .plots import finish, label_axes, plain_log, redraw  # noqa: E402

COLORS = {"on": "C0", "off": "C1"}


def plot_editor(doc: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    _ttft_cdf(axes[0], doc)
    _per_phase(axes[1], doc["phases"])
    _prefill(axes[2], doc["conditions"])
    cfg, r = doc["config"], doc["ratios"]
    return finish(fig, path,
                  f"editors typing, /infill with the prefix cache on and off: {doc['model']}, {doc['device']}\n"
                  f"{cfg['editors']} editors at {cfg['cps']:g} chars/s, a request every {cfg['every']} chars; on/off: "
                  f"TTFT p50 {_num(r['ttft_p50'])} (target <= {doc['targets']['ttft_p50']}), prefill tokens/request "
                  f"{_num(r['prefill_tokens_per_request'])} (<= {doc['targets']['prefill_tokens_per_request']}); "
                  f"replayed answers differing: {doc['replay']['differing']} of {doc['replay']['requests']}")


def _ttft_cdf(ax, doc: dict) -> None:
    for c, s in doc["conditions"].items():
        if s["ttft_cdf_ms"]:
            ax.plot(s["ttft_cdf_ms"], doc["cdf_levels"], color=COLORS[c],
                    label=f"cache {c}: {s['answered']} of {s['requests']} answered before cancelled")
    plain_log(ax, "x")
    label_axes(ax, "time to first token (CDF, answered requests)", "ms", "fraction at or below")


def _per_phase(ax, phases: list[dict]) -> None:
    """Each phase's median TTFT over all its requests, in the order run (alternation shows what the
    machine's noise did): the lower bound, and the upper one where cancelled requests leave it known."""
    for c, color in COLORS.items():
        mine = [(i, p["ttft_p50_bounds_ms"]) for i, p in enumerate(phases) if p["condition"] == c]
        low = [(i, b[0]) for i, b in mine if b[0] is not None]
        high = [(i, b[1]) for i, b in mine if b[1] is not None]
        if low:
            ax.plot(*zip(*low), "o", color=color, label=f"cache {c}, at least")
        if high:
            ax.plot(*zip(*high), "o", color=color, fillstyle="none", markersize=10, label=f"cache {c}, at most")
    ax.set_yscale("log")
    label_axes(ax, "TTFT p50 of all requests, per phase in the order run", "phase", "ms")


def _prefill(ax, by: dict) -> None:
    names = list(by)
    computed = [by[c]["prefill_tokens_per_request"] or 0 for c in names]
    prompt = [by[c]["prompt_tokens"] or 0 for c in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], prompt, 0.4, color="0.7", label="prompt tokens")
    bars = ax.bar([x + 0.2 for x in xs], computed, 0.4, color=[COLORS[c] for c in names], label="computed")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(xs), [f"cache {c}" for c in names])
    label_axes(ax, "prefill tokens per request", None, "tokens", grid="y")


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    return redraw(argv, "splitserve.bench.editor_plots", plot_editor)


if __name__ == "__main__":
    sys.exit(main())
