"""Fill-in-the-middle layouts: each family's exact prompt ids against its reference encoder, its
end and repository-level tokens, and cutting a prompt that is too long."""

from __future__ import annotations

import pytest
import tokenizers

from splitserve.common.fim import find_fim, split_room
from splitserve.common.tokenizer import TINY_TOKENIZER_PATH, Tokenizer

PAIRS = [  # (prefix, suffix): code with indentation, leading spaces, unicode, one side empty
    ("def f(x):\n    ", "\n    return y\n"),
    (" lead", " trail"),
    ("a", "b"),
    ("x = '日本語'  # 🐍\n", "print(x)\n"),
    ("", "tail()"),
    ("y = 1", ""),
]
# The spellings of each family's markers and ends, for reading a prompt back.
LAYOUT = {"starcoder2": "starcoder", "starcoder": "starcoder", "santacoder": "santacoder", "qwen2.5-coder": "qwen",
          "qwen3": "qwen", "deepseek-coder": "deepseek", "codellama": "codellama", "codestral": "codestral",
          "stable-code": "starcoder", "granite": "starcoder"}


@pytest.fixture(scope="module")
def tokenizers_(family_dirs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_dir(d) for name, d in family_dirs.items()}


def fim_prompt(tok: Tokenizer, prefix: str, suffix: str, room: int = 1000) -> list[int]:
    fim = find_fim(tok)
    return fim.prompt(fim.prefix_ids(prefix), fim.suffix_ids(suffix), room)


def test_each_family_gets_its_layout(tokenizers_):
    found = {name: fim.layout.name if (fim := find_fim(tok)) else None for name, tok in tokenizers_.items()}
    assert found == {**LAYOUT, "llama": None, "mistral": None, "phi-3": None, "phi-4": None}


@pytest.mark.parametrize("family", ["starcoder2", "starcoder", "santacoder", "qwen2.5-coder", "qwen3",
                                    "deepseek-coder", "stable-code", "granite"])
def test_psm_layout_is_the_families_markers_around_the_code(family_dirs, tokenizers_, family):
    """<prefix>P<suffix>S<middle>, BOS first where the tokenizer adds one (DeepSeek-Coder): what the
    family's transformers tokenizer gives for the prompt text, and what its model cards write."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(family_dirs[family])
    layout = find_fim(tokenizers_[family]).layout
    for prefix, suffix in PAIRS:
        text = f"{layout.prefix[0]}{prefix}{layout.suffix[0]}{suffix}{layout.middle[0]}"
        assert fim_prompt(tokenizers_[family], prefix, suffix) == hf(text).input_ids, (prefix, suffix)


def test_deepseek_layout_exactly(tokenizers_):
    tok = tokenizers_["deepseek-coder"]
    ids = fim_prompt(tok, "a = ", "\n")
    assert [tok.id_to_token(i) for i in ids] == ["<｜begin▁of▁sentence｜>", "<｜fim▁begin｜>", "a", "Ġ=", "Ġ",
                                                 "<｜fim▁hole｜>", "Ċ", "<｜fim▁end｜>"]


def test_codellama_layout_is_its_transformers_infilling(family_dirs, tokenizers_):
    """transformers' CodeLlamaTokenizer(prefix, suffix=suffix): BOS, ▁<PRE>, " " + prefix, ▁<SUF>,
    suffix, ▁<MID>. Built with add_prefix_space=False, whose only effect here is that the suffix gets
    no dummy prefix, as in Meta's reference (encode_infilling) and the class's own docstring
    (" <PRE> {pre} <SUF>{suf} <MID>"); with the default, transformers 5 puts a ▁ before a suffix
    that does not start with a space, which Meta's does not."""
    transformers = pytest.importorskip("transformers")
    tok = tokenizers_["codellama"]
    for prefix, suffix in PAIRS:
        if not (prefix and suffix):  # transformers infills only with both; SentencePiece gives "" no dummy prefix
            continue
        hf = transformers.AutoTokenizer.from_pretrained(family_dirs["codellama"], add_prefix_space=False)
        assert fim_prompt(tok, prefix, suffix) == hf(prefix, suffix=suffix).input_ids, (prefix, suffix)
        default = transformers.AutoTokenizer.from_pretrained(family_dirs["codellama"])
        if suffix.startswith(" "):
            assert fim_prompt(tok, prefix, suffix) == default(prefix, suffix=suffix).input_ids
    ids = fim_prompt(tok, "a = ", "\n")
    assert [tok.id_to_token(i) for i in ids] == ["<s>", "▁<PRE>", "▁a", "▁=", "▁", "▁<SUF>", "\n", "▁<MID>"]
    assert [tok.id_to_token(i) for i in fim_prompt(tok, "", "b")] == ["<s>", "▁<PRE>", "▁<SUF>", "b", "▁<MID>"]


def test_codellama_markers_may_be_spelled_without_the_space():
    specials = ["<unk>", "<s>", "</s>", "<PRE>", "<SUF>", "<MID>", "<EOT>"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    fim = find_fim(Tokenizer(tok))
    assert fim.layout.name == "codellama"
    assert [fim.prefix_id, fim.suffix_id, fim.middle_id, fim.end_ids] == [4, 5, 6, (7, 3)]  # <EOT>, </s>


def test_codegemma_takes_qwens_markers_and_ends_at_its_file_separator():
    """CodeGemma's markers are spelled as Qwen2.5-Coder's; its middle ends with <|file_separator|>
    (or <eos>, the config's end of sequence)."""
    specials = ["<pad>", "<eos>", "<bos>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    fim = find_fim(Tokenizer(tok))
    assert fim.layout.name == "qwen"
    assert [fim.prefix_id, fim.suffix_id, fim.middle_id, fim.end_ids, fim.repo_ids] == [5, 7, 6, (8,), {}]


def test_codestral_layout_is_mistrals_suffix_first(family_dirs, tokenizers_):
    """mistral_common's encode_fim: BOS, [SUFFIX], the suffix without dummy prefix, [PREFIX], the
    prefix with it; Mistral's documentation writes it "<s>[SUFFIX]suffix[PREFIX] prefix"."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(family_dirs["codestral"])
    tok = tokenizers_["codestral"]
    for prefix, suffix in PAIRS:
        if prefix:  # SentencePiece gives an empty text no dummy prefix
            assert fim_prompt(tok, prefix, suffix) == hf(f"[SUFFIX]{suffix}[PREFIX] {prefix}").input_ids
    ids = fim_prompt(tok, "a = ", "\n")
    assert [tok.id_to_token(i) for i in ids] == ["<s>", "[SUFFIX]", "\n", "[PREFIX]", "▁a", "▁=", "▁"]


@pytest.mark.parametrize("family, ends, repo", [
    ("starcoder2", ["<|endoftext|>", "<file_sep>"], ["<repo_name>", "<file_sep>"]),
    ("starcoder", ["<|endoftext|>"], []),
    ("santacoder", ["<|endoftext|>"], []),
    ("qwen2.5-coder", ["<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"],
     ["<|repo_name|>", "<|file_sep|>"]),
    ("deepseek-coder", ["<｜end▁of▁sentence｜>"], []),
    ("codellama", ["▁<EOT>", "</s>"], []),
    ("codestral", ["</s>"], []),
])
def test_end_and_repository_tokens(tokenizers_, family, ends, repo):
    tok = tokenizers_[family]
    fim = find_fim(tok)
    assert [tok.id_to_token(i) for i in fim.end_ids] == ends
    assert list(fim.repo_ids) == repo and all(tok.token_to_id(t) == i for t, i in fim.repo_ids.items())


def test_no_fim_tokens_no_layout(tokenizers_):
    assert find_fim(tokenizers_["llama"]) is None
    assert find_fim(Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a")))) is None


def test_tiny_keeps_starcoders_layout():
    tok = Tokenizer.from_file(TINY_TOKENIZER_PATH)
    fim = find_fim(tok)
    assert (fim.layout.name, fim.prefix_id, fim.suffix_id, fim.middle_id, fim.end_ids) == ("starcoder", 1, 3, 2, (0,))
    assert fim_prompt(tok, "def f", "\n") == [1, *tok.encode("def f"), 3, *tok.encode("\n"), 2]


@pytest.mark.parametrize("family", ["starcoder2", "deepseek-coder", "codestral"])
def test_too_long_loses_the_far_ends_and_keeps_bos_and_markers(tokenizers_, family):
    tok = tokenizers_[family]
    fim = find_fim(tok)
    prefix, suffix = list(range(100, 160)), list(range(200, 260))
    ids = fim.prompt(prefix, suffix, room=20 + fim.overhead)
    pre, suf = [fim.prefix_id, *range(150, 160)], [fim.suffix_id, *range(200, 210)]  # nearest the cursor
    middle = [] if fim.middle_id is None else [fim.middle_id]
    body = suf + pre if fim.layout.suffix_first else pre + suf
    assert ids == [*tok.leading_special_ids, *body, *middle] and len(ids) == 20 + fim.overhead
    markers_only = fim.prompt(prefix, suffix, room=2)  # the limit check then refuses
    assert len(markers_only) == fim.overhead and set(markers_only).isdisjoint(prefix + suffix)


@pytest.mark.parametrize("n_prefix, n_suffix, room, kept", [
    (5, 5, 20, (5, 5)),  # everything fits
    (50, 4, 20, (16, 4)),  # a short suffix leaves the rest to the prefix
    (4, 50, 20, (4, 16)),  # and a short prefix to the suffix
    (50, 50, 21, (11, 10)),  # both long: the suffix gets at most half
    (50, 50, 0, (0, 0)),
])
def test_split_room(n_prefix, n_suffix, room, kept):
    assert split_room(n_prefix, n_suffix, room) == kept
    assert sum(kept) <= room
