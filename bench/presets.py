"""The flags a benchmark fills from presets: a full run's values, or --quick's (a smoke run)."""

from __future__ import annotations

import argparse
import os


def resolve_presets(args: argparse.Namespace, presets: dict[str, tuple], workers: int) -> argparse.Namespace:
    """Each flag of `presets` (flag -> (full, quick)) left out takes its preset: a flag given on the
    command line wins. A quick run of the tiny model takes its random-weight twin; --threads 0
    splits the cores between the pipeline's `workers`."""
    column = 1 if args.quick else 0
    for name, values in presets.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    if args.quick and args.model == "tiny":
        args.model = "tiny-random"
    if not args.threads:
        args.threads = max(1, len(os.sched_getaffinity(0)) // workers)
    return args
