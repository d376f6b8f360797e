"""Gemma 3 4B/12B/27B: multimodal checkpoints (Gemma3ForConditionalGeneration) whose text model
splitserve serves (common/families/gemma3_text.py; the wrapping in multimodal.py)."""

from __future__ import annotations

from ..model_config import ModelConfig
from . import gemma3_text
from .multimodal import PREFIX, text_model

__all__ = ["PREFIX", "config"]

MODEL_TYPE = "gemma3"
TOP, LAYER, LAYER_ROLES = gemma3_text.TOP, gemma3_text.LAYER, gemma3_text.LAYER_ROLES


def config(raw: dict) -> ModelConfig:
    return text_model(raw, gemma3_text, MODEL_TYPE, {"bos_token_id": 2, "eos_token_id": 1})
