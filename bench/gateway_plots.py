"""Plots of `splitserve bench gateway` results (matplotlib, Agg).

`python -m splitserve.bench.gateway_plots RESULTS.json [PNG]` redraws a saved run.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from .plots import redraw  # noqa: E402


def plot_gateway(doc: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.2))
    results = doc["results"]
    transports = list(dict.fromkeys(r["transport"] for r in results))
    series = list(dict.fromkeys((r["frontends"], r["concurrency"], r["new_tokens"]) for r in results))
    width = 0.8 / max(1, len(series))
    for k, key in enumerate(series):
        row = {r["transport"]: r for r in results if (r["frontends"], r["concurrency"], r["new_tokens"]) == key}
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(transports))]
        label = f"{key[0]} frontend(s), {key[1]} x {key[2]} tokens"

        def value(f):
            return [f(row[t]) if t in row else 0 for t in transports]

        # the frontends' CPU per token, summed: the whole relay cost, however many share it
        axes[0].bar(xs, value(lambda r: sum(v for n, v in r["us_per_token"].items() if n != "router")), width,
                    label=label)
        axes[1].bar(xs, value(lambda r: 1e6 * r["cpu_s"]["router"] / max(r["requests"], 1)), width, label=label)
        axes[2].bar(xs, value(lambda r: r["tokens_per_s"]), width, label=label)
        for stat, marker in (("p50", "o"), ("p99", "^")):
            axes[3].scatter(xs, value(lambda r: (r["delay_us"][stat] or 0) / 1e3), marker=marker, color=f"C{k}",
                            label=f"{stat}, {label}")
    for i, t in enumerate(transports):
        target = doc["targets_us"].get(t)
        if target is not None:
            axes[0].hlines(target, i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                           label="target at 64 x 200" if i == 0 else None)
    titles = ("frontends' CPU per token relayed (µs)", "router's CPU per request (µs)", "tokens relayed per second",
              "token delay, worker -> client (ms)")
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(transports)), transports)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"gateway relay cost: synthetic workers (a step every {doc['step_ms']:g} ms), {doc['concurrency']} "
                 f"streaming clients per transport, {doc['cpus']} CPUs; WebSocket in {doc['ws_encoding']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    return redraw(argv, "splitserve.bench.gateway_plots", plot_gateway)


if __name__ == "__main__":
    raise SystemExit(main())
