"""Fill-in-the-middle prompts in each code-model family's own layout, found from the special
tokens of the checkpoint's tokenizer. Torch-free: the gateway builds these prompts (OpenAI's
`suffix`, the editor endpoint).

A prompt too long for the room left is cut at its far ends, the code nearest the cursor kept: the
prefix loses its start, the suffix its end, and the markers always stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class _Tokenizer(Protocol):
    leading_special_ids: tuple[int, ...]

    def token_to_id(self, token: str) -> int | None: ...

    def encode_continuation(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class FimLayout:
    """A family's FIM prompt; each marker lists the spellings vocabularies use for it."""

    name: str
    prefix: tuple[str, ...]
    suffix: tuple[str, ...]
    middle: tuple[str, ...]  # empty: the prompt ends with the prefix (Codestral)
    ends: tuple[str, ...]  # tokens that end the answer, those the vocabulary has
    repo: tuple[str, ...] = ()  # repository-level tokens (repository name, file separator)
    suffix_first: bool = False  # suffix, then prefix
    # SentencePiece-era layouts encode the prefix as a text's start, with SentencePiece's dummy
    # prefix (a space; none for an empty text), and the suffix as a continuation, without it, as
    # Meta's and Mistral's reference encoders do.
    dummy_prefix: bool = False


LAYOUTS = (
    # StarCoder, StarCoder2: <fim_prefix>P<fim_suffix>S<fim_middle>
    FimLayout("starcoder", ("<fim_prefix>",), ("<fim_suffix>",), ("<fim_middle>",),
              ends=("<|endoftext|>",  # the end of the file: training documents end with it
                    "<file_sep>"),  # StarCoder2: a repository-level sample goes on to its next file
              repo=("<repo_name>", "<file_sep>")),
    # SantaCoder spells StarCoder's markers with hyphens.
    FimLayout("santacoder", ("<fim-prefix>",), ("<fim-suffix>",), ("<fim-middle>",),
              ends=("<|endoftext|>",)),  # the end of the file
    # Qwen2.5-Coder, and CodeGemma, which spells its markers alike: <|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>
    FimLayout("qwen", ("<|fim_prefix|>",), ("<|fim_suffix|>",), ("<|fim_middle|>",),
              ends=("<|endoftext|>",  # the end of the file: the FIM samples' own end
                    "<|fim_pad|>",  # padding of FIM samples: nothing of the answer follows
                    "<|file_sep|>", "<|repo_name|>",  # a repository-level sample's next file or repository
                    "<|file_separator|>"),  # CodeGemma: the end of the file (and the start of the next)
              repo=("<|repo_name|>", "<|file_sep|>")),
    # DeepSeek-Coder: <｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜> (fullwidth bars, ▁ for spaces)
    FimLayout("deepseek", ("<｜fim▁begin｜>",), ("<｜fim▁hole｜>",), ("<｜fim▁end｜>",),
              ends=("<｜end▁of▁sentence｜>",)),  # the end of the document
    # CodeLlama: "<PRE> P <SUF>S <MID>", as transformers' CodeLlamaTokenizer documents it (the spaces
    # are part of its ▁<PRE>, ▁<SUF>, ▁<MID> tokens and the prefix's dummy prefix).
    FimLayout("codellama", ("▁<PRE>", "<PRE>"), ("▁<SUF>", "<SUF>"), ("▁<MID>", "<MID>"),
              ends=("▁<EOT>", "<EOT>",  # the end of the infilled middle
                    "</s>"),  # the end of the text
              dummy_prefix=True),
    # Codestral: [SUFFIX]S[PREFIX] P, as mistral_common's encode_fim builds it; no middle marker.
    FimLayout("codestral", ("[PREFIX]",), ("[SUFFIX]",), (),
              ends=("</s>",),  # the end of the text: Codestral ends its middle with it
              suffix_first=True, dummy_prefix=True),
)


@dataclass(frozen=True)
class Fim:
    """A layout bound to one tokenizer's ids."""

    layout: FimLayout
    tokenizer: _Tokenizer
    prefix_id: int
    suffix_id: int
    middle_id: int | None
    end_ids: tuple[int, ...]
    repo_ids: dict[str, int]  # repository-level token -> its id, those the vocabulary has

    @property
    def overhead(self) -> int:
        """Ids a prompt holds besides the code: the BOS (where the tokenizer adds one) and the markers."""
        return len(self.tokenizer.leading_special_ids) + 2 + (self.middle_id is not None)

    def prefix_ids(self, text: str) -> list[int]:
        """The code before the cursor, encoded as the family's prompt holds it."""
        return self.tokenizer.encode_continuation(" " + text if self.layout.dummy_prefix and text else text)

    def suffix_ids(self, text: str) -> list[int]:
        """The code after the cursor, encoded as the family's prompt holds it."""
        return self.tokenizer.encode_continuation(text)

    def prompt(self, prefix: list[int], suffix: list[int], room: int) -> list[int]:
        """The prompt's ids: at most `room` of them, or just the BOS and markers when even those don't
        fit (the request's limit check then says why)."""
        keep_prefix, keep_suffix = split_room(len(prefix), len(suffix), max(room - self.overhead, 0))
        pre = [self.prefix_id, *prefix[len(prefix) - keep_prefix:]]
        suf = [self.suffix_id, *suffix[:keep_suffix]]
        body = suf + pre if self.layout.suffix_first else pre + suf
        middle = [] if self.middle_id is None else [self.middle_id]
        return [*self.tokenizer.leading_special_ids, *body, *middle]


def find_fim(tokenizer: _Tokenizer) -> Fim | None:
    """The first layout whose markers the tokenizer has, bound to it; None if it has none."""
    for layout in LAYOUTS:
        prefix, suffix = _first_id(tokenizer, layout.prefix), _first_id(tokenizer, layout.suffix)
        middle = _first_id(tokenizer, layout.middle)
        if prefix is None or suffix is None or (layout.middle and middle is None):
            continue
        ends = tuple(dict.fromkeys(i for t in layout.ends if (i := tokenizer.token_to_id(t)) is not None))
        repo = {t: i for t in layout.repo if (i := tokenizer.token_to_id(t)) is not None}
        return Fim(layout, tokenizer, prefix, suffix, middle, ends, repo)
    return None


def split_room(n_prefix: int, n_suffix: int, room: int) -> tuple[int, int]:
    """How many prefix and suffix tokens fit in `room`: all when they can; otherwise the suffix gets
    at most half (less when the prefix leaves more), the prefix the rest."""
    if n_prefix + n_suffix <= room:
        return n_prefix, n_suffix
    keep_suffix = min(n_suffix, max(room // 2, room - n_prefix))
    return min(n_prefix, room - keep_suffix), keep_suffix


def _first_id(tokenizer: _Tokenizer, spellings: tuple[str, ...]) -> int | None:
    return next((i for t in spellings if (i := tokenizer.token_to_id(t)) is not None), None)
