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


def plot_editor(doc: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    names = {c: _name(doc, c) for c in doc["conditions"]}
    colors = {c: f"C{i}" for i, c in enumerate(names)}
    _ttft_cdf(axes[0], doc, names, colors)
    _per_phase(axes[1], doc["phases"], names, colors)
    _prefill(axes[2], doc["conditions"], names, colors)
    cfg, r, targets = doc["config"], doc["ratios"], doc["targets"]
    what = ("the prefix cache on and off" if doc.get("compare", "cache") == "cache" else
            f"a long prompt every {cfg['long_every']:g} s, prefilled in pieces and whole")
    ratios = ", ".join(f"{k} {_num(v)} (target <= {targets[k]})" for k, v in r.items())
    return finish(fig, path,
                  f"editors typing, /infill, {what}: {doc['model']}, {doc['device']}\n"
                  f"{cfg['editors']} editors at {cfg['cps']:g} chars/s, a request every {cfg['every']} chars; "
                  f"{' / '.join(names)}: {ratios}; replayed answers differing: {doc['replay']['differing']} of "
                  f"{doc['replay']['requests']}")


def _name(doc: dict, condition: str) -> str:
    """'cache on'; 'prefill in pieces' (documents from before --compare are the cache's)."""
    if doc.get("compare", "cache") == "cache":
        return f"cache {condition}"
    return {"pieces": "prefill in pieces", "whole": "prefill whole"}.get(condition, condition)


def _ttft_cdf(ax, doc: dict, names: dict, colors: dict) -> None:
    for c, s in doc["conditions"].items():
        if s["ttft_cdf_ms"]:
            ax.plot(s["ttft_cdf_ms"], doc["cdf_levels"], color=colors[c],
                    label=f"{names[c]}: {s['answered']} of {s['requests']} answered before cancelled")
        if s.get("long", {}).get("ttft_cdf_ms"):
            ax.plot(s["long"]["ttft_cdf_ms"], doc["cdf_levels"], color=colors[c], linestyle="--",
                    label=f"{names[c]}: the long prompts")
    plain_log(ax, "x")
    label_axes(ax, "time to first token (CDF, answered requests)", "ms", "fraction at or below")


def _per_phase(ax, phases: list[dict], names: dict, colors: dict) -> None:
    """Each phase's median TTFT over all its requests, in the order run (alternation shows what the
    machine's noise did): the lower bound, and the upper one where cancelled requests leave it known."""
    for c, color in colors.items():
        mine = [(i, p["ttft_p50_bounds_ms"]) for i, p in enumerate(phases) if p["condition"] == c]
        low = [(i, b[0]) for i, b in mine if b[0] is not None]
        high = [(i, b[1]) for i, b in mine if b[1] is not None]
        if low:
            ax.plot(*zip(*low), "o", color=color, label=f"{names[c]}, at least")
        if high:
            ax.plot(*zip(*high), "o", color=color, fillstyle="none", markersize=10, label=f"{names[c]}, at most")
    ax.set_yscale("log")
    label_axes(ax, "TTFT p50 of all requests, per phase in the order run", "phase", "ms")


def _prefill(ax, by: dict, names: dict, colors: dict) -> None:
    conditions = list(by)
    computed = [by[c]["prefill_tokens_per_request"] or 0 for c in conditions]
    prompt = [by[c]["prompt_tokens"] or 0 for c in conditions]
    xs = range(len(conditions))
    ax.bar([x - 0.2 for x in xs], prompt, 0.4, color="0.7", label="prompt tokens")
    bars = ax.bar([x + 0.2 for x in xs], computed, 0.4, color=[colors[c] for c in conditions], label="computed")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(xs), [names[c] for c in conditions])
    label_axes(ax, "prefill tokens per request", None, "tokens", grid="y")


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    return redraw(argv, "splitserve.bench.editor_plots", plot_editor)


if __name__ == "__main__":
    sys.exit(main())
