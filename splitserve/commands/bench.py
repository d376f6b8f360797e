from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["engine"])


def run(args: argparse.Namespace) -> int:
    raise ValueError("not yet")
