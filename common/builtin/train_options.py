"""The options of a tiny-model training run (train_tiny.py), apart from it: the command line
declares them without importing PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainOptions:
    out: Path
    minutes: float = 55.0
    steps: int = 0  # 0: chosen from `minutes`
    seed: int = 0
    threads: int = 2
    seq_len: int = 512
    batch: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.1
    fim_rate: float = 0.5
    eval_every: int = 500
    eval_windows: int = 48
    calibration_steps: int = 6
    max_files: int = 0  # 0: every training file; fewer for quick checks
    bf16: bool = True  # bf16 matmuls under autocast, fp32 weights and optimizer state
