from __future__ import annotations

import argparse

from splitserve.gateway.options import add_router_args, router_options
from splitserve.logs import setup_logging


def add_args(p: argparse.ArgumentParser) -> None:
    add_router_args(p)


def run(args: argparse.Namespace) -> int:
    from splitserve.gateway.server import run_router

    setup_logging("router")
    return run_router(router_options(args))
