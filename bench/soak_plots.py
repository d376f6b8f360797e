"""Plots of `splitserve bench soak` results (matplotlib, Agg).

`python -m splitserve.bench.soak_plots RESULTS.json [PNG]` redraws a saved soak.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from .plots import finish, label_axes, plain_log, redraw  # noqa: E402


def plot_soak(doc: dict, path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    soak = doc["soak"]
    _over_time(axes[0, 0], soak["buckets"], "ttft_ms", "time to first token per bucket")
    _over_time(axes[0, 1], soak["buckets"], "itl_ms", "inter-token latency per bucket")
    _rss(axes[1, 0], doc["rss"], soak)
    _overload(axes[1, 1], doc["overload"])
    cfg = doc["config"]
    return finish(fig, path, f"soak: {doc['model']}, {doc['device']}, {soak['requests']} requests in "
                  f"{soak['seconds']:.0f} s at concurrency {cfg['concurrency']}\nmax_concurrent_requests "
                  f"{cfg['max_concurrent_requests']}, failed {soak['failed']}, held after: "
                  f"{'nothing' if not soak['held_after'] else soak['held_after']}")


def _over_time(ax, buckets: list[dict], key: str, title: str) -> None:
    ts = [b["t_s"] for b in buckets]
    for q, style in (("p50", "-"), ("p99", "--")):
        ys = [b[key][q] for b in buckets]
        ax.plot(ts, [float("nan") if y is None else y for y in ys], style, marker="o", color="C0", label=q)
    plain_log(ax, "y")
    label_axes(ax, title, "s since the soak began (bucket start)", "ms")


def _rss(ax, rss: dict, soak: dict) -> None:
    for i, (name, kib) in enumerate(rss["kib"].items()):
        ax.plot(rss["t_s"], [k / 1024 for k in kib], color=f"C{i}",
                label=f"{name} ({soak['rss_growth_pct'][name]:+.2f}% over the soak)")
    ax.axvspan(0, soak["seconds"], color="0.9", zorder=0, label="soak (then at-limit and overload phases)")
    label_axes(ax, "resident memory per process", "s since the soak began", "MiB", grid="major")


def _overload(ax, over: dict) -> None:
    rows = {"at limit": over["at_limit"], "overloaded": over["overloaded"]}
    width = 0.35
    for k, (q, color) in enumerate((("p50", "C0"), ("p99", "C3"))):
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        bars = ax.bar(xs, [r["itl_ms"][q] or 0 for r in rows.values()], width, color=color, label=f"ITL {q}")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    limit, loaded = over["at_limit"], over["overloaded"]
    labels = [f"at limit\n{limit['clients']} clients, {limit['admitted_ok']} ok",
              f"overloaded\n{loaded['offered_req_s']:g} req/s offered, {loaded['admitted_ok']} ok, "
              f"{loaded['refused']} got 429"]
    ax.set_xticks(range(len(rows)), labels)
    ratio = over["itl_p99_ratio"]
    label_axes(ax, f"admitted requests' inter-token latency: p99 ratio {ratio if ratio is not None else '-'} "
               f"(target <= {over['target']})", None, "ms", grid="y")


def main(argv: list[str] | None = None) -> int:
    return redraw(argv, "splitserve.bench.soak_plots", plot_soak)


if __name__ == "__main__":
    sys.exit(main())
