"""Where a process computes: device, compute dtype and PyTorch threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def resolve_device(flag: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU; `auto:N` the Nth, modulo
    how many there are (how serve spreads its workers over the GPUs)."""
    if flag == "auto" or flag.startswith("auto:"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(flag.partition(":")[2] or 0) % torch.cuda.device_count())
    device = torch.device(flag)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: CUDA is not available in this process")
    return device


def resolve_dtype(flag: str, device: torch.device, model_dir: str | Path | None = None) -> torch.dtype:
    """`auto` computes in fp32 on the CPU whatever the checkpoint stores; on CUDA it keeps a
    half-precision checkpoint's dtype and otherwise uses bf16."""
    if flag != "auto":
        if flag not in DTYPES:
            raise ValueError(f"unknown dtype {flag!r}; choose auto, {', '.join(DTYPE_NAMES.values())}")
        return DTYPES[flag]
    if device.type != "cuda":
        return torch.float32
    stored = _checkpoint_dtype(model_dir) if model_dir else None
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


def _checkpoint_dtype(model_dir: str | Path) -> torch.dtype | None:
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype")))


def set_threads(threads: int) -> None:
    """0 leaves PyTorch's default; processes sharing a machine pass their share of the cores."""
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
