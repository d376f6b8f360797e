"""`splitserve bench WHAT`: one module per benchmark, each with `add_args(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib

# what -> (module, help)
BENCHES = {
    "engine": ("splitserve.bench.engine_bench",
               "splitserve's prefill and decode engines against transformers' generate, same weights"),
    "serve": ("splitserve.bench.serve_bench",
              "the served pipeline (gateway + worker processes) under load, against the in-process engine"),
    "soak": ("splitserve.bench.soak",
             "a bounded soak of a local pipeline over every front end: latency and memory over time, "
             "leftovers, and admitted requests' latency under overload"),
}


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, (module, help_text) in BENCHES.items():
        importlib.import_module(module).add_args(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHES[args.what][0]).run(args)
