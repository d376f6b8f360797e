from __future__ import annotations

import argparse

from splitserve.gateway.options import add_gateway_args, gateway_options
from splitserve.logs import setup_logging


def add_args(p: argparse.ArgumentParser) -> None:
    add_gateway_args(p)


def run(args: argparse.Namespace) -> int:
    from splitserve.gateway.server import run_gateway

    setup_logging("gateway")
    return run_gateway(gateway_options(args))
