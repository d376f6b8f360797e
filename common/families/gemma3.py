"""Gemma 3 4B/12B/27B: multimodal checkpoints (Gemma3ForConditionalGeneration) whose text model
splitserve serves (common/families/gemma3_text.py) from `text_config`; the vision tower's tensors
are left in the files. Their text tensors are named `language_model.model.*` as transformers 4
wrote them (the released checkpoints) or `model.language_model.*` as transformers 5 does."""

from __future__ import annotations

from dataclasses import replace

from ..model_config import ModelConfig, eos_ids
from . import gemma3_text

__all__ = ["PREFIX", "TOP", "config"]

MODEL_TYPE = "gemma3"
PREFIX = ("model.language_model.", "language_model.model.", "language_model.")
TOP, LAYER, LAYER_ROLES = gemma3_text.TOP, gemma3_text.LAYER, gemma3_text.LAYER_ROLES
TOKENS = {"bos_token_id": 2, "eos_token_id": 1}  # Gemma3TextConfig's defaults


def config(raw: dict) -> ModelConfig:
    text = dict(raw.get("text_config") or {})
    if raw.get("tie_word_embeddings") is not None:  # the top level's word holds for the whole model
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    tokens = TOKENS | {k: text[k] for k in TOKENS if text.get(k) is not None}
    cfg = gemma3_text.config(text, MODEL_TYPE)
    return replace(cfg, bos_token_id=tokens["bos_token_id"], eos_token_ids=eos_ids(tokens["eos_token_id"]))
