from __future__ import annotations

import argparse
from pathlib import Path

from splitserve.common.builtin_models import default_home, resolve_model


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="tiny",
                   help="built-in name (tiny, tiny-random), a directory, or a Hugging Face Hub repository id "
                        "(owner/name: fetched into the Hub's cache)")
    p.add_argument("--revision", help="with a Hub repository id: the branch, tag or commit (default: main)")
    p.add_argument("--home", type=Path, default=default_home(),
                   help="where built-in models live (default $SPLITSERVE_HOME or ~/.cache/splitserve)")


def run(args: argparse.Namespace) -> int:
    print(resolve_model(args.model, args.home, revision=args.revision))
    return 0
