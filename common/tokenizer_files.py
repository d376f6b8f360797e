"""A checkpoint's tokenizer files read as transformers 5 reads them, so that our prompt ids are
`AutoTokenizer.from_pretrained(dir)(text).input_ids`.

transformers 5 (5.25 checked) takes tokenizer.json as it is (its TokenizersBackend) unless the
tokenizer class it picks builds its own pipeline in code: then only tokenizer.json's vocabulary,
merges, added tokens and post-processor are kept, and the normalizer, pre-tokenizer and decoder
are the class's. The class comes from tokenizer_config.json's `tokenizer_class`, overridden by
config.json's `model_type` for some models. `add_bos_token` / `add_eos_token` in
tokenizer_config.json are dropped whenever tokenizer.json exists: its post-processor decides
whether a BOS goes first, except for CodeLlama's class, which always puts one there.

Not reproduced: special tokens named in tokenizer_config.json but absent from tokenizer.json
(transformers appends them past the vocabulary, where the model has no embedding, e.g.
CodeLlama's <FILL_ME>), and Mistral's own tokenizer (MistralCommonBackend), which transformers
uses only when the mistral_common package is installed and the checkpoint ships tekken.json or
tokenizer.model.v*.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

# The class transformers 5 registers for a model type, for the families splitserve serves ("" is
# TokenizersBackend: tokenizer.json as it is). It stands in for a missing tokenizer_class and
# overrides a different one; for the types in REGISTERED_CLASS_WINS even one it rebuilds.
MODEL_TYPE_CLASSES = {"gpt_bigcode": "", "mistral": "", "mixtral": "", "qwen2": "Qwen2Tokenizer",
                      "qwen3": "Qwen2Tokenizer", "qwen3_moe": "Qwen2Tokenizer", "starcoder2": "GPT2Tokenizer",
                      "gpt2": "GPT2Tokenizer", "phi3": "", "stablelm": "", "granite": "",
                      "glm": "", "glm4": "", "mistral3": "", "ministral3": "",
                      "iquestcoder": "", "phi": "GPT2Tokenizer"}
REGISTERED_CLASS_WINS = {"qwen2"}
# Qwen2Tokenizer's pre-tokenizer split, as transformers writes it.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class TokenizerConfig:
    # The class transformers builds, without "Fast" ("" for TokenizersBackend); those not in REBUILT
    # take tokenizer.json as it is.
    tokenizer_class: str
    special_tokens: dict[str, str]  # bos_token, eos_token, unk_token, pad_token: those that are set
    add_prefix_space: bool | None = None
    legacy: bool | None = None
    split_special_tokens: bool = False  # special tokens written in text stay text


def read_config(model_dir: Path, tokenizer_json: str) -> TokenizerConfig:
    """tokenizer_config.json, special_tokens_map.json and config.json's model_type, as far as they
    decide the ids."""
    config = _read_json(model_dir / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:  # older checkpoints: the map file has the last word
        config |= _read_json(model_dir / "special_tokens_map.json")
    model_type = _read_json(model_dir / "config.json").get("model_type")
    # DeepSeek-Coder names Llama's class over a byte-level tokenizer.json; transformers then takes the file as it is.
    byte_level = '"ByteLevel"' in tokenizer_json
    special = {name: text for name in NAMED_TOKENS if (text := _token_text(config.get(name))) is not None}
    return TokenizerConfig(transformers_class(config.get("tokenizer_class"), model_type, byte_level), special,
                           config.get("add_prefix_space"), config.get("legacy"),
                           bool(config.get("split_special_tokens", False)))


def transformers_class(declared: str | None, model_type: str | None, byte_level: bool) -> str:
    """The tokenizer class AutoTokenizer builds (the rules of transformers 5's tokenization_auto)."""
    declared = (declared or "").removesuffix("Fast")
    registered = MODEL_TYPE_CLASSES.get(model_type or "")
    if declared == "LlamaTokenizer" and byte_level and model_type not in REGISTERED_CLASS_WINS:
        return ""
    if not declared or registered is None or registered == declared:
        return declared or registered or ""
    if registered == "":
        return ""
    return registered if model_type in REGISTERED_CLASS_WINS else declared


def apply_config(tok: tokenizers.Tokenizer, config: TokenizerConfig) -> None:
    """Give `tok` (tokenizer.json as loaded) the pipeline transformers builds for the class."""
    rebuild = REBUILT.get(config.tokenizer_class)
    if rebuild is not None:
        rebuild(tok, config)
    tok.encode_special_tokens = config.split_special_tokens


def _llama(tok: tokenizers.Tokenizer, config: TokenizerConfig) -> None:
    """LlamaTokenizer: SentencePiece's ▁ by a Metaspace pre-tokenizer; the dummy prefix ▁ goes only
    before the text's start (before each piece after a special token too, in legacy mode)."""
    prefix_space = config.add_prefix_space is not False
    _metaspace(tok, ("always" if config.legacy else "first") if prefix_space else "never", strip=prefix_space)


def _code_llama(tok: tokenizers.Tokenizer, config: TokenizerConfig) -> None:
    """CodeLlamaTokenizer: Llama's pipeline without legacy mode, and always a BOS first."""
    _metaspace(tok, "first" if config.add_prefix_space is not False else "never", strip=True)
    bos = config.special_tokens.get("bos_token")
    bos_id = tok.token_to_id(bos) if bos is not None else None
    tok.post_processor = (processors.TemplateProcessing(single=f"{bos}:0 $A:0", special_tokens=[(bos, bos_id)])
                          if bos_id is not None else None)


def _metaspace(tok: tokenizers.Tokenizer, prepend_scheme: str, strip: bool) -> None:
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if strip else steps)


def _qwen2(tok: tokenizers.Tokenizer, config: TokenizerConfig) -> None:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.add_prefix_space), use_regex=False)])
    tok.decoder = decoders.ByteLevel()


def _gpt2(tok: tokenizers.Tokenizer, config: TokenizerConfig) -> None:
    """GPT2Tokenizer: GPT-2's byte-level split only. For StarCoder2 (model_type starcoder2) this drops
    tokenizer.json's Digits pre-tokenizer, which its vocabulary was trained with: whitespace before
    a digit then reads differently ("\\n    0" gives "\\n   ", " ", "0", not "\\n    ", "0").
    That is transformers 5's doing; delete this entry to read StarCoder2 as trained instead."""
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.add_prefix_space))
    tok.decoder = decoders.ByteLevel()


REBUILT = {"LlamaTokenizer": _llama, "CodeLlamaTokenizer": _code_llama, "Qwen2Tokenizer": _qwen2,
           "GPT2Tokenizer": _gpt2}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's fields."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
