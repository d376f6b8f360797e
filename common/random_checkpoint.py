"""Random GPTBigCode checkpoints from one seeded generator: the same tensors on every machine."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import save_weights
from .families import checkpoint_shapes, gpt_bigcode
from .model_config import model_config_from_dict
from .tokenizer import write_tokenizer_files


def random_weights(hf_config: dict, seed: int, progress: bool = True) -> dict[str, torch.Tensor]:
    """GPT-2 style initialisation.

    Biases and layer norms get small random values too, so that tests comparing against
    `transformers` exercise every parameter.
    """
    cfg = model_config_from_dict(hf_config)
    std = hf_config.get("initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in tqdm(checkpoint_shapes(cfg).items(), desc="creating weights", disable=not progress,
                            unit="tensor", leave=False):
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        elif name.endswith("c_proj.weight"):
            t = std / (2 * cfg.n_layer) ** 0.5 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        weights[name] = t
    return weights


def write_random_checkpoint(out_dir: Path, hf_config: dict, seed: int, progress: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_weights(random_weights(hf_config, seed, progress), out_dir, gpt_bigcode.PREFIX)
    write_tokenizer_files(out_dir)
