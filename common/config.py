"""Typed configuration, built once from CLI flags (environment variables only as defaults)
and passed down explicitly."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from .builtin_models import default_home


@dataclass(frozen=True)
class ModelOptions:
    model: str  # a built-in name, a checkpoint directory or a Hugging Face Hub repository id
    dtype: str  # auto | float32 | float16 | bfloat16
    device: str  # auto | cpu | cuda | cuda:N
    threads: int  # PyTorch threads for this process; 0 = PyTorch's default
    home: Path  # where built-in models are created
    revision: str | None  # of a Hub repository: a branch, tag or commit (None: main)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--model", default=env("SPLITSERVE_MODEL", "tiny"),
                        help="built-in model name (tiny, tiny-random), a local checkpoint directory, or a Hugging "
                             "Face Hub repository id (owner/name), fetched into the Hub's cache ($HF_HOME) on first use")
    parser.add_argument("--revision", default=env("SPLITSERVE_REVISION"),
                        help="with a Hub repository id: the branch, tag or commit to serve (default: main)")
    parser.add_argument("--dtype", default=env("SPLITSERVE_DTYPE", "auto"),
                        choices=["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"],
                        help="compute dtype; auto = float32 on CPU, bfloat16 (or the checkpoint's half dtype) on CUDA")
    parser.add_argument("--device", default=env("SPLITSERVE_DEVICE", "auto"),
                        help="auto (the first CUDA device, else the CPU), auto:N (the Nth, modulo their count), cpu, "
                             "cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=int(env("SPLITSERVE_THREADS", "0")),
                        help="PyTorch threads for this process (0: PyTorch's default)")
    parser.add_argument("--home", type=Path, default=default_home(),
                        help="where built-in models are created (default $SPLITSERVE_HOME or ~/.cache/splitserve)")


def model_options(ns: argparse.Namespace) -> ModelOptions:
    return ModelOptions(model=ns.model, dtype=ns.dtype, device=ns.device, threads=ns.threads, home=ns.home,
                        revision=ns.revision)
