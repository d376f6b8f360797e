"""GLM: GLM-4-9B in transformers' format (THUDM/glm-4-9b-hf and its chat models). GLM-4-0414's
layout (common/families/glm4.py) without its sandwich norms."""

from __future__ import annotations

from ..model_config import ModelConfig
from . import glm4
from .llama import PREFIX, TOP

__all__ = ["PREFIX", "TOP", "config"]

MODEL_TYPE = "glm"
LAYER = glm4.LAYER
LAYER_ROLES = {role: name for role, name in glm4.LAYER_ROLES.items() if role not in ("attn_out_norm", "mlp_out_norm")}


def config(raw: dict) -> ModelConfig:
    return glm4.config(raw, MODEL_TYPE, sandwich_norms=False)
