from __future__ import annotations

import argparse
import os
from pathlib import Path

from splitserve.common.builtin_models import default_home, resolve_model


def add_args(p: argparse.ArgumentParser) -> None:
    # the same environment defaults as every part's --model and --revision: a Kubernetes init container
    # fetches with the variables its pod's process serves with
    env = os.environ.get
    p.add_argument("model", nargs="?", default=env("SPLITSERVE_MODEL", "tiny"),
                   help="built-in name (tiny, tiny-random), a directory, or a Hugging Face Hub repository id "
                        "(owner/name: fetched into the Hub's cache) (default $SPLITSERVE_MODEL or tiny)")
    p.add_argument("--revision", default=env("SPLITSERVE_REVISION"),
                   help="with a Hub repository id: the branch, tag or commit (default $SPLITSERVE_REVISION or main)")
    p.add_argument("--no-weights", dest="weights", action="store_false",
                   help="with a Hub repository id: only the config and tokenizer files, which the router and "
                        "frontends read (not the safetensors)")
    p.add_argument("--home", type=Path, default=default_home(),
                   help="where built-in models live (default $SPLITSERVE_HOME or ~/.cache/splitserve)")


def run(args: argparse.Namespace) -> int:
    print(resolve_model(args.model, args.home, revision=args.revision, weights=args.weights))
    return 0
