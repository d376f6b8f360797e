"""Mistral 3: multimodal checkpoints (Mistral3ForConditionalGeneration: Mistral Small 3.1/3.2,
Magistral Small, Ministral 3, Devstral Small 2) whose text model splitserve serves, a Mistral
(common/families/mistral.py) or a Ministral 3 (ministral3.py); the wrapping in multimodal.py."""

from __future__ import annotations

from ..model_config import ModelConfig, ModelConfigError
from . import ministral3, mistral
from .llama import LAYER, LAYER_ROLES, TOP
from .multimodal import PREFIX, text_model

__all__ = ["LAYER", "LAYER_ROLES", "PREFIX", "TOP", "config"]

MODEL_TYPE = "mistral3"
TEXT_FAMILIES = {m.MODEL_TYPE: m for m in (mistral, ministral3)}


def config(raw: dict) -> ModelConfig:
    text_type = (raw.get("text_config") or {}).get("model_type", "mistral")  # transformers' default text model
    family = TEXT_FAMILIES.get(text_type)
    if family is None:
        raise ModelConfigError(f"Mistral 3 with a {text_type!r} text model is not supported: its text model is one of "
                               f"{', '.join(TEXT_FAMILIES)}")
    return text_model(raw, family, MODEL_TYPE, {"bos_token_id": 1, "eos_token_id": 2})
