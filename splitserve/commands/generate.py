from __future__ import annotations

import argparse
import json
import sys

from splitserve.common.config import add_model_args, model_options
from splitserve.common.params import SamplingParams, random_seed
from splitserve.common.request import GenerateRequest


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (greedy when no sampling flag is given)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None, help="keep tokens at least this share of the likeliest one's "
                   "probability")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (random when not given)")
    p.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": "..."} of the new tokens')


def run(args: argparse.Namespace) -> int:
    from splitserve.engine import Engine, EngineOptions
    from splitserve.runtime_setup import open_model

    model = open_model(model_options(args))
    sampled = any(v is not None for v in (args.temperature, args.top_k, args.top_p, args.min_p, args.seed))
    sampling = SamplingParams(
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        min_p=args.min_p or 0.0,
        seed=random_seed() if args.seed is None else args.seed,
        do_sample=sampled,
    )
    prompt_ids = tuple(model.tokenizer.encode(args.prompt))
    # One short request: capturing CUDA graphs would take longer than it saves.
    engine = Engine(model, EngineOptions(num_slots=1, cuda_graphs=False))
    (result,) = engine.generate([GenerateRequest("cli", prompt_ids, args.max_new_tokens, sampling)])
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text}))
    else:
        sys.stdout.write(args.prompt + result.text + "\n")
    return 0
