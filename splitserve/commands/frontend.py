from __future__ import annotations

import argparse

from splitserve.gateway.options import add_frontend_args, frontend_options
from splitserve.logs import setup_logging


def add_args(p: argparse.ArgumentParser) -> None:
    add_frontend_args(p)


def run(args: argparse.Namespace) -> int:
    from splitserve.gateway.server import run_frontend

    setup_logging("frontend")
    return run_frontend(frontend_options(args))
