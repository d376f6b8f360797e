"""`splitserve` command line: each subcommand's module is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); each module has `add_args(parser)` and `run(args) -> int`
COMMANDS = {
    "serve": ("splitserve.commands.serve", "start the gateway and local prefill and decode workers, ready to use"),
    "gateway": ("splitserve.commands.gateway", "run the gateway alone"),
    "prefill": ("splitserve.commands.prefill", "run one prefill worker that registers with a gateway"),
    "decode": ("splitserve.commands.decode", "run one decode worker that registers with a gateway"),
    "generate": ("splitserve.commands.generate", "generate text in this process (no sockets), for checks and debugging"),
    "keygen": ("splitserve.commands.keygen", "write a CURVE key pair that encrypts and authenticates the worker link across hosts"),
    "model-path": ("splitserve.commands.model_path", "print a model's checkpoint directory, creating a built-in one if needed"),
    "train-tiny": ("splitserve.commands.train_tiny", "train the built-in tiny model on the standard library's Python source (CPU)"),
    "deploy": ("splitserve.commands.deploy", "deployment files: `deploy compose` writes a docker-compose file for any prefill/decode GPU split"),
    "bench": ("splitserve.commands.bench", "benchmarks: `bench engine` (model steps vs transformers), `bench serve` (the served pipeline under load)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_args(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"splitserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
