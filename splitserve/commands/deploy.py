"""`splitserve deploy compose`: write the docker-compose file for one node, for any prefill/decode split."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from splitserve.compose import (
    MAX_FRONTENDS,
    ZMQ_PORT,
    NodeLayout,
    compose_file,
    cpu_layout,
    gpu_layout,
    secured,
    with_frontends,
)

DEFAULTS = {"model": "tiny", "revision": "", "threads": 2, "bind": "127.0.0.1", "prefill_workers": 1,
            "decode_workers": 1, "frontends": 1, "api_key_file": "", "curve_dir": ""}
FRONTENDS_NOTE = ("# frontend-0 .. frontend-{last} share the network namespace of `frontend`, which only holds it and\n"
                  "# publishes its ports: HTTP and WebSocket on 8080 for all (the kernel spreads the connections),\n"
                  "# frontend i's ZMQ client port 5555 + i (5555 to {zmq_last}): give a client every one of them.\n")
SECRETS_NOTE = ("# The secret files keep their owner and mode from the host, and the containers run as 10001:10001:\n"
                "# let that group read them, e.g. `sudo chgrp 10001 FILES && chmod 640 FILES`.\n")


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    c = sub.add_parser("compose", help="docker-compose file for one node",
                       description="Write a docker-compose file: the router, the frontends, and one container per worker.")
    c.add_argument("--prefill-gpus", help="GPUs of the prefill workers, one worker each: e.g. 0,1 or 0-1")
    c.add_argument("--decode-gpus", help="GPUs of the decode workers, one worker each: e.g. 2-7")
    c.add_argument("--cpu", action="store_true",
                   help="no GPUs (a laptop): --prefill-workers and --decode-workers CPU workers")
    c.add_argument("--prefill-workers", type=int, default=DEFAULTS["prefill_workers"], help="with --cpu")
    c.add_argument("--decode-workers", type=int, default=DEFAULTS["decode_workers"], help="with --cpu")
    c.add_argument("--model", default=DEFAULTS["model"],
                   help="a built-in model (in the image), a checkpoint directory on the host (mounted read-only), "
                        "or a Hugging Face Hub repository id (owner/name: the `model` service fetches it into a "
                        "volume before the others start)")
    c.add_argument("--revision", default=DEFAULTS["revision"],
                   help="with a Hub repository id: the branch, tag or commit (default: main when `up` runs)")
    c.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="PyTorch threads per worker")
    c.add_argument("--frontends", type=int, default=DEFAULTS["frontends"],
                   help=f"frontend processes (1 to {MAX_FRONTENDS}), one container each, sharing the HTTP port; "
                        "frontend i's ZMQ client port is 5555 + i")
    c.add_argument("--bind", default=DEFAULTS["bind"], help="host address the frontends' ports are published on")
    c.add_argument("--api-key-file", default=DEFAULTS["api_key_file"],
                   help="a file on the host holding the API key the frontends ask every client for")
    c.add_argument("--curve-dir", default=DEFAULTS["curve_dir"],
                   help="a directory on the host with gateway.key, gateway.key_secret, worker.key and "
                        "worker.key_secret (`splitserve keygen DIR --name gateway`, then --name worker): "
                        "the links to and from workers under CURVE")
    c.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")


def run(args: argparse.Namespace) -> int:
    out = None if args.output == "-" else Path(args.output)
    layout = layout_of(args)
    doc = compose_file(layout, out.resolve().parent if out else Path.cwd())
    text = f"# Written by `{command_line(args)}`:\n# change the split with that command rather than by hand.\n"
    if layout.api_key_file or layout.curve_dir:
        text += SECRETS_NOTE
    if layout.frontends > 1:
        text += FRONTENDS_NOTE.format(last=layout.frontends - 1, zmq_last=ZMQ_PORT + layout.frontends - 1)
    text += yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
    return 0


def layout_of(args: argparse.Namespace) -> NodeLayout:
    layout = secured(with_frontends(split_of(args), args.frontends), args.api_key_file, args.curve_dir)
    return replace(layout, revision=args.revision)


def split_of(args: argparse.Namespace) -> NodeLayout:
    if args.cpu:
        if args.prefill_gpus or args.decode_gpus:
            raise ValueError("--cpu takes --prefill-workers and --decode-workers, not GPU lists")
        return cpu_layout(args.prefill_workers, args.decode_workers, args.model, args.threads, args.bind)
    if not (args.prefill_gpus and args.decode_gpus):
        raise ValueError("give both --prefill-gpus and --decode-gpus (e.g. --prefill-gpus 0,1 --decode-gpus 2-7), "
                         "or --cpu")
    return gpu_layout(args.prefill_gpus, args.decode_gpus, args.model, args.threads, args.bind)


def command_line(args: argparse.Namespace) -> str:
    """The command that writes this file again (the output path aside)."""
    words = ["splitserve deploy compose"]
    if args.cpu:
        words.append("--cpu")
    else:
        words += [f"--prefill-gpus {args.prefill_gpus}", f"--decode-gpus {args.decode_gpus}"]
    for name, default in DEFAULTS.items():
        value = getattr(args, name)
        if value != default and (args.cpu or not name.endswith("_workers")):
            words.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(words)
