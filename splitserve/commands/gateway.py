from __future__ import annotations

import argparse

from splitserve.gateway.server import add_gateway_args, gateway_options, run as run_gateway
from splitserve.logs import setup_logging


def add_args(p: argparse.ArgumentParser) -> None:
    add_gateway_args(p)


def run(args: argparse.Namespace) -> int:
    setup_logging("gateway")
    return run_gateway(gateway_options(args))
