"""Tokenizer access (a `tokenizer.json` read with the `tokenizers` library) and streaming detokenization."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import tokenizers

TINY_TOKENIZER_PATH = Path(__file__).parent / "builtin" / "tiny" / "tokenizer.json"

EOS_TOKEN = "<|endoftext|>"

# Fill-in-the-middle markers: StarCoder's spelling, then SantaCoder's.
FIM_SPELLINGS = (
    {"prefix": "<fim_prefix>", "middle": "<fim_middle>", "suffix": "<fim_suffix>", "pad": "<fim_pad>"},
    {"prefix": "<fim-prefix>", "middle": "<fim-middle>", "suffix": "<fim-suffix>", "pad": "<fim-pad>"},
)

MODEL_MAX_LENGTH = 2048  # the tiny model's context; written into tokenizer_config.json

# Prompt tokens the detokenizer decodes ahead of the first generated token, as TGI and vLLM do.
PROMPT_CONTEXT_TOKENS = 5


class _TokenLookup(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def fim_token_ids(tok: _TokenLookup) -> dict[str, int | None] | None:
    """Ids of the FIM markers in whichever spelling `tok` knows; None if it knows neither.

    prefix, middle and suffix are required for a spelling to count; pad is optional.
    """
    for spelling in FIM_SPELLINGS:
        ids = {role: tok.token_to_id(token) for role, token in spelling.items()}
        if all(ids[role] is not None for role in ("prefix", "middle", "suffix")):
            return ids
    return None


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the defaults an inference server wants."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {path} (splitserve needs a fast tokenizer's tokenizer.json; "
                "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir) writes one)"
            )
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        return cls.from_file(Path(model_dir) / "tokenizer.json")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        """Ids for `text`; special tokens written literally in it (e.g. "<fim_prefix>") become their single id."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def write_tokenizer_files(model_dir: str | Path) -> None:
    """Put the tiny tokenizer into `model_dir` so both `Tokenizer.from_dir` and transformers'
    `AutoTokenizer.from_pretrained` load it, with identical ids."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TINY_TOKENIZER_PATH, model_dir / "tokenizer.json")
    fim = list(FIM_SPELLINGS[0].values())
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "additional_special_tokens": fim}
    config = {
        # The generic fast class takes tokenizer.json verbatim in transformers 4 and 5 alike,
        # with no model-specific rebuilding of the pipeline that could drift from our ids.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    _write_json(model_dir / "tokenizer_config.json", config)
    _write_json(model_dir / "special_tokens_map.json", special)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text deltas as they arrive.

    Each step decodes only a window: the tokens behind the last delta (the prefix) plus the tokens
    not yet emitted, and returns the part of that text beyond the prefix's own decoding. That keeps
    context-dependent spacing right and costs O(window) rather than O(sequence). While the window's
    text ends in U+FFFD a multi-byte character is still incomplete, so it is held back.
    """

    def __init__(self, tokenizer: _Decoder, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # int() so numpy or torch scalars are accepted; tokenizers wants Python ints.
        self._ids = [int(i) for i in prompt_ids[-PROMPT_CONTEXT_TOKENS:]]
        if self._decode(self._ids).endswith("\ufffd"):
            # The prompt stops inside a character: its text is no stable prefix to subtract.
            self._ids = []
        # self._ids[:self._read] is the prefix; the rest has not been emitted yet.
        self._read = len(self._ids)

    def add(self, token_ids: Iterable[int]) -> str:
        """Append generated ids and return the text they complete (possibly "")."""
        self._ids.extend(int(i) for i in token_ids)
        prefix, text = self._decode(self._ids[: self._read]), self._decode(self._ids)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        # The tokens just emitted become the next prefix.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Return whatever is held back, an incomplete character decoding to U+FFFD."""
        if self._read == len(self._ids):
            return ""
        delta = self._decode(self._ids)[len(self._decode(self._ids[: self._read])) :]
        # The held bytes were emitted as replacement characters, so they cannot prefix later tokens.
        self._ids, self._read = [], 0
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
