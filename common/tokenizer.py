"""Tokenizer access (a checkpoint's tokenizer.json, read with the `tokenizers` library the way
transformers 5 reads it) and streaming detokenization."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Protocol

import tokenizers

from .tokenizer_files import apply_config, read_config

TINY_TOKENIZER_PATH = Path(__file__).parent / "builtin" / "tiny" / "tokenizer.json"
# The tiny tokenizer's special tokens (builtin/train_tokenizer.py): StarCoder's end of text and FIM markers.
TINY_EOS = "<|endoftext|>"
TINY_FIM = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")

MODEL_MAX_LENGTH = 2048  # the tiny model's context; written into tokenizer_config.json

# Prompt tokens the detokenizer decodes ahead of the first generated token, as TGI and vLLM do.
PROMPT_CONTEXT_TOKENS = 5
# Slow (Python) tokenizers' files, from which transformers can write a tokenizer.json.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class Tokenizer:
    """A checkpoint's tokenizer: `encode` gives the ids transformers' AutoTokenizer gives."""

    def __init__(self, tok: tokenizers.Tokenizer, special_tokens: dict[str, str] | None = None):
        """`tok` as the checkpoint's tokenizer class builds it; `special_tokens`: the strings of
        bos_token, eos_token, unk_token and pad_token, those the checkpoint sets."""
        self._tok = tok
        self.special_tokens = dict(special_tokens or {})
        # What encode() puts before the text: the BOS of the tokenizers that add one.
        with_special, plain = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
        start = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain), 0)
        self.leading_special_ids: tuple[int, ...] = tuple(with_special[:start])

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json at `path`, with the tokenizer_config.json (and config.json) beside it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(_missing_tokenizer_message(path))
        try:
            text = path.read_text(encoding="utf-8")
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc
        config = read_config(path.parent, text)
        apply_config(tok, config)
        return cls(tok, config.special_tokens)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        return cls.from_file(Path(model_dir) / "tokenizer.json")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for `text`: those of `AutoTokenizer.from_pretrained(dir)(text).input_ids`, BOS included
        where the checkpoint's tokenizer adds one. Special tokens written in `text` (e.g. "<fim_prefix>")
        become their single id. `add_special_tokens=False` for a piece of a prompt, or a prompt that
        writes its own BOS (a chat template's): no BOS is added."""
        return _encode(self._tok, text, add_special_tokens)

    def encode_with_spans(self, text: str) -> list[tuple[int, tuple[int, int]]]:
        """encode(text) with each id's span of characters in `text` (an added special token's is
        empty), as the tokenizer's offsets give them."""
        enc = self._tok.encode_batch([text])[0]
        return list(zip(enc.ids, enc.offsets))

    def encode_continuation(self, text: str) -> list[int]:
        """Ids for `text` as the continuation of a text, as SentencePiece's encoders do for an infill's
        suffix: no special tokens, and no dummy prefix (the ▁ that Llama-style tokenizers put before a
        text's first word). The same as encode(text, add_special_tokens=False) for byte-level tokenizers."""
        return _encode(self._continuation, text, False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @cached_property
    def _continuation(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer without its dummy prefix: a normalizer's Prepend("▁") removed, a
        Metaspace pre-tokenizer told never to prepend."""
        text = self._tok.to_str()
        if '"Prepend"' not in text and '"Metaspace"' not in text:
            return self._tok
        spec = json.loads(text)
        spec["normalizer"] = _without_dummy_prefix(spec["normalizer"])
        spec["pre_tokenizer"] = _without_dummy_prefix(spec["pre_tokenizer"])
        return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _encode(tok: tokenizers.Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`tok`'s ids for `text`, with the GIL let go while it works: encode_batch does, encode holds it
    (tokenizers 0.23), so a long prompt on a frontend's tokenizer thread would stop its event loop
    (a 3 MB text: 1.2 s; this way 60 ms, the ids' list made under the GIL). The same speed for one
    text (measured from 16 characters to 64 KB)."""
    return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def _without_dummy_prefix(spec):
    """A normalizer or pre-tokenizer as tokenizer.json writes it, with any Prepend("▁") dropped and
    any Metaspace told never to prepend."""
    if isinstance(spec, list):
        return [_without_dummy_prefix(s) for s in spec if not (isinstance(s, dict) and s.get("type") == "Prepend")]
    if not isinstance(spec, dict):
        return spec
    if spec.get("type") == "Prepend":
        return None
    spec = {key: _without_dummy_prefix(value) for key, value in spec.items()}
    return spec | {"prepend_scheme": "never"} if spec.get("type") == "Metaspace" else spec


def _missing_tokenizer_message(path: Path) -> str:
    model_dir = path.parent
    slow = [name for name in SLOW_TOKENIZER_FILES if (model_dir / name).is_file()]
    if slow:
        how = (f"it has a slow tokenizer's files ({', '.join(slow)}), from which transformers writes one: "
               f"python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{model_dir}')"
               f".save_pretrained('{model_dir}')\"")
    else:
        how = "copy it from the model's repository, or write it with transformers' AutoTokenizer.from_pretrained(" \
              "...).save_pretrained(dir)"
    return f"{model_dir} has no tokenizer.json, the fast tokenizer file splitserve reads: {how}"


def write_tokenizer_files(model_dir: str | Path) -> None:
    """Put the tiny tokenizer into `model_dir` so both `Tokenizer.from_dir` and transformers'
    `AutoTokenizer.from_pretrained` load it, with identical ids."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TINY_TOKENIZER_PATH, model_dir / "tokenizer.json")
    special = {"bos_token": TINY_EOS, "eos_token": TINY_EOS, "unk_token": TINY_EOS,
               "additional_special_tokens": list(TINY_FIM)}
    config = {
        # The generic fast class takes tokenizer.json verbatim in transformers 4 and 5 alike (but for
        # model types whose own class transformers 5 prefers, qwen2's: Tokenizer.from_dir follows it).
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
