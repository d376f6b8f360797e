"""`splitserve keygen DIR --name NAME`: a CURVE key pair for the worker link (see common/curve.py).

A typical setup: `keygen keys --name gateway` and `keygen keys --name workers`; the gateway runs
with `--curve-secret-file keys/gateway.key_secret --curve-clients DIR_WITH_workers.key`, each
worker with `--curve-secret-file keys/workers.key_secret --curve-server-key keys/gateway.key`.
"""

from __future__ import annotations

import argparse

from splitserve.common.curve import load_keypair, write_keypair


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="where to write NAME.key (public) and NAME.key_secret (mode 0600)")
    p.add_argument("--name", default="splitserve", help="the files' name (default: splitserve)")


def run(args: argparse.Namespace) -> int:
    public_file, secret_file = write_keypair(args.directory, args.name)
    print(f"public key:  {public_file}  ({load_keypair(secret_file)[0].decode()})\nsecret key:  {secret_file}")
    return 0
