"""Everything one process needs to run a model: shape, weights on the device, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_weights
from .model import ModelWeights, prepare_weights
from .model_config import ModelConfig, load_model_config
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    cfg: ModelConfig
    weights: ModelWeights
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype

    def fingerprint(self) -> str:
        return self.cfg.fingerprint(self.tokenizer.vocab_size)


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device, progress: bool | None = None) -> LoadedModel:
    cfg = load_model_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    with torch.inference_mode():
        weights = load_weights(model_dir, cfg, dtype, device, progress)
        prepared = prepare_weights(weights, cfg)
    return LoadedModel(model_dir, cfg, prepared, tokenizer, device, dtype)
