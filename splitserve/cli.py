"""`splitserve` command line. Only the command being run is imported, and each command module
declares its flags without importing what it runs (PyTorch, the servers), so that `--help` and
argument errors answer at once."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple, Union


class Command(NamedTuple):
    module: str  # has `add_args(parser)` and `run(args) -> int`
    help: str


class Group(NamedTuple):
    help: str
    commands: dict[str, Command]


COMMANDS: dict[str, Union[Command, Group]] = {
    "serve": Command("splitserve.commands.serve",
                     "start the gateway and local prefill and decode workers, ready to use"),
    "gateway": Command("splitserve.commands.gateway", "run the gateway alone: a router and one frontend in one process"),
    "router": Command("splitserve.commands.router", "run the router alone: the fleet's books, for frontends and workers "
                      "in other processes"),
    "frontend": Command("splitserve.commands.frontend", "run one frontend (HTTP, WebSocket, ZMQ clients) that joins a "
                        "router with --router"),
    "prefill": Command("splitserve.commands.prefill", "run one prefill worker that registers with a gateway"),
    "decode": Command("splitserve.commands.decode", "run one decode worker that registers with a gateway"),
    "generate": Command("splitserve.commands.generate",
                        "generate text in this process (no sockets), for checks and debugging"),
    "keygen": Command("splitserve.commands.keygen",
                      "write a CURVE key pair that encrypts and authenticates the worker link across hosts"),
    "model-path": Command("splitserve.commands.model_path",
                          "print a model's checkpoint directory, creating a built-in one if needed"),
    "train-tiny": Command("splitserve.commands.train_tiny",
                          "train the built-in tiny model on the standard library's Python source (CPU)"),
    "deploy": Command("splitserve.commands.deploy", "deployment files: `deploy compose` writes a docker-compose "
                      "file for any prefill/decode GPU split"),
    "bench": Group("benchmarks: `bench engine` (model steps vs transformers), `bench serve` (the served pipeline "
                   "under load), `bench soak`, `bench handoff` (KV transports), `bench editor` (editors typing, the "
                   "prefix cache on and off), `bench gateway` (the gateway's CPU per relayed token)", {
        "engine": Command("splitserve.bench.engine_bench",
                          "splitserve's prefill and decode engines against transformers' generate, same weights"),
        "serve": Command("splitserve.bench.serve_bench",
                         "the served pipeline (gateway + worker processes) under load, against the in-process engine"),
        "handoff": Command("splitserve.bench.handoff_bench",
                           "the KV handoff alone (nixl, tcp, shm) over prompt lengths, synthetic KV in a model's "
                           "layout, no forward pass"),
        "soak": Command("splitserve.bench.soak",
                        "a bounded soak of a local pipeline over every front end: latency and memory over time, "
                        "leftovers, and admitted requests' latency under overload"),
        "editor": Command("splitserve.bench.editor_bench",
                          "editors typing: /infill requests at typing speed, each cancelling the last, against "
                          "pipelines with the prefill workers' prefix cache on and off"),
        "gateway": Command("splitserve.bench.gateway_bench",
                           "the gateway relaying tokens of synthetic workers (no model) to streaming clients over SSE, "
                           "WebSocket and ZMQ: its CPU per token, tokens/s, and the delay it adds"),
    }),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: only the command it names has its flags declared (every command's,
    when argv is None)."""
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    _add_commands(parser, COMMANDS, argv, "command")
    return parser


def _add_commands(parser: argparse.ArgumentParser, table: dict, words: list[str] | None, dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    # the command is the first word that is not an option (no level above it has an option with a value)
    chosen = next((w for w in words if not w.startswith("-")), None) if words is not None else None
    for name, entry in table.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        rest = None if words is None else words[words.index(name) + 1:] if name == chosen else []
        if isinstance(entry, Group):
            _add_commands(p, entry.commands, rest, "what")
            continue
        if words is None or name == chosen:
            importlib.import_module(entry.module).add_args(p)
        p.set_defaults(_module=entry.module)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"splitserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
