"""`splitserve prefill` and `splitserve decode`: one worker process each."""

from __future__ import annotations

import argparse
import importlib
import os

from splitserve.common.service_config import add_worker_args, worker_options
from splitserve.logs import setup_logging


def add_args_for(role: str):
    def add_args(p: argparse.ArgumentParser) -> None:
        add_worker_args(p, role)

    return add_args


def run(args: argparse.Namespace) -> int:
    opts = worker_options(args)
    setup_logging(opts.role)
    if opts.cpus:
        os.sched_setaffinity(0, opts.cpus)
    from splitserve.runtime_setup import open_model  # PyTorch, after the flags were read

    model = open_model(opts.model)
    module = importlib.import_module(f"splitserve.{opts.role}_worker.worker")
    return module.run(opts, model)
