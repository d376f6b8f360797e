"""The text model of a multimodal checkpoint (Gemma 3, Mistral 3): its config is config.json's
`text_config`, read by the text model's family; its tensors are named `language_model.model.*` as
transformers 4 wrote them (the released checkpoints, and what transformers 5 still saves) or
`model.language_model.*` as transformers 5 names its modules; the vision tower's are left unread."""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType

from ..model_config import ModelConfig, eos_ids

PREFIX = ("model.language_model.", "language_model.model.", "language_model.")


def text_model(raw: dict, text_family: ModuleType, model_type: str, tokens: dict[str, int]) -> ModelConfig:
    """The text model's config, as `model_type` (the wrapper's family, whose PREFIX finds its
    tensors). `tokens`: the text config class's bos_token_id and eos_token_id defaults. The top
    level's tie_word_embeddings, where written, holds for the whole model, as in transformers."""
    text = dict(raw.get("text_config") or {})
    if raw.get("tie_word_embeddings") is not None:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    ids = tokens | {k: text[k] for k in tokens if text.get(k) is not None}
    cfg = text_family.config(text)
    return replace(cfg, model_type=model_type, bos_token_id=ids["bos_token_id"],
                   eos_token_ids=eos_ids(ids["eos_token_id"]))
