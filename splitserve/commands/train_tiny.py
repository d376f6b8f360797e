from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from splitserve.common.builtin.train_options import TrainOptions

DEFAULT_OUT = Path("tiny-trained")


def add_args(p: argparse.ArgumentParser) -> None:
    d = TrainOptions(out=DEFAULT_OUT)
    p.add_argument("--minutes", type=float, default=d.minutes, help="training time; sets the step count from the first steps' speed")
    p.add_argument("--steps", type=int, default=d.steps, help="exact step count (overrides --minutes; repeats a run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="PyTorch threads (results are deterministic per seed and thread count)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (linear warmup, cosine decay)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--fim-rate", type=float, default=d.fim_rate, help="share of examples rearranged for fill-in-the-middle")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows of --seq-len tokens per evaluation")
    p.add_argument("--max-files", type=int, default=0, help="train on the first N training files only (quick checks)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="matmul precision (auto: bf16 where the CPU has it natively, else fp32)")


def run(args: argparse.Namespace) -> int:
    from splitserve.common.builtin.train_tiny import bf16_supported, train

    names = {f.name for f in fields(TrainOptions)}
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_supported())
    opts = TrainOptions(**{k: v for k, v in vars(args).items() if k in names}, bf16=bf16)
    if opts.steps < 0 or opts.minutes <= 0 or opts.batch < 1 or opts.seq_len < 8 or not 0 <= opts.fim_rate <= 1:
        raise ValueError("--steps must be >= 0, --minutes > 0, --batch >= 1, --seq-len >= 8, --fim-rate in [0, 1]")
    result = train(opts)
    print(json.dumps({k: v for k, v in vars(result).items() if k != "history"}, indent=2))
    print(f"wrote {opts.out}")
    return 0
