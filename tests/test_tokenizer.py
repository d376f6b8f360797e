"""The tiny model's tokenizer and its transformers-loadable copy, each code-model family's ids
against transformers' AutoTokenizer, and streaming detokenization."""

from __future__ import annotations

import json

import pytest
import tokenizers

from splitserve.common.builtin.train_tokenizer import corpus, stdlib_sources
from splitserve.common.tokenizer import TINY_TOKENIZER_PATH, IncrementalDetokenizer, Tokenizer, write_tokenizer_files
from splitserve.common.tokenizer_files import transformers_class
from tokenizer_families import FAMILIES

TEXTS = [
    "def f(x):\n\treturn x + 1\n",
    "class A:\n    def m(self):\n\tpass  # mixed\n  \t  indentation\n\n\n",
    'print("🐍🎉")  # snake party\n',
    "变量 = '日本語'\nprint(变量)\n",
    "  leading spaces, trailing tab\t\r\n\x00\x7f control bytes",
    "s = '<fim_prefix>' + '<|endoftext|>'\n",
    "",
]
SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(TINY_TOKENIZER_PATH)


def stream(tok: Tokenizer, ids: list[int], chunk: int, prompt_ids=(), skip_special_tokens=False) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [detok.flush()]


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 8192
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3, 4]
    assert [tok.encode(s) for s in SPECIALS] == [[0], [1], [2], [3], [4]]
    assert tok.eos_token_id == 0
    assert tok.id_to_token(1) == "<fim_prefix>"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_every_byte_encodes(tok):
    text = bytes(range(256)).decode("latin-1") + "\U0001f600"
    assert tok.decode(tok.encode(text)) == text


def test_literal_special_tokens_in_text(tok):
    ids = tok.encode("<fim_prefix>a<fim_suffix>b<fim_middle>")
    assert ids[0] == 1 and ids[-1] == 2 and 3 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_from_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no tokenizer.json.*copy it from the model's"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")  # a slow (SentencePiece) tokenizer only
    with pytest.raises(FileNotFoundError, match=r"slow tokenizer's files \(tokenizer.model\).*"
                                                r"AutoTokenizer as T; T.from_pretrained\('.*'\).save_pretrained"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        Tokenizer.from_dir(tmp_path)


def test_tiny_ids_are_its_tokenizer_json_s(tok, tiny_dir):
    raw = tokenizers.Tokenizer.from_file(str(TINY_TOKENIZER_PATH))
    for text in TEXTS:
        assert tok.encode(text) == tok.encode(text, add_special_tokens=False) == raw.encode(text).ids
        assert Tokenizer.from_dir(tiny_dir).encode(text) == raw.encode(text).ids
    ids = [484, 804, 12, 69, 16, 311, 312, 270, 346, 275, 482, 311, 203]
    assert tok.encode("def add(a, b):\n    return a + b\n") == ids
    assert tok.leading_special_ids == ()
    assert tok.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                  "unk_token": "<|endoftext|>"}


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_concatenates_to_decode(tok, text, chunk):
    ids = tok.encode(text)
    deltas = stream(tok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("chunk", [1, 3])
def test_detokenizer_skips_special_tokens(tok, chunk):
    ids = tok.encode("<fim_prefix>def f():<fim_suffix>\n<fim_middle>  return 1<|endoftext|>")
    assert "".join(stream(tok, ids, chunk, skip_special_tokens=True)) == "def f():\n  return 1"


def test_detokenizer_streams_leading_spaces(tok):
    ids = tok.encode("def f")
    assert len(ids) == 2
    assert stream(tok, ids, 1) == ["def", " f", ""]


def test_detokenizer_with_prompt_context(tok):
    prompt = tok.encode("import os\nx =")
    generated = tok.encode(" 1  # 🐍")
    assert "".join(stream(tok, generated, 1, prompt_ids=prompt)) == " 1  # 🐍"


def test_detokenizer_holds_back_split_character(tok):
    ids = tok.encode("🐍")
    assert len(ids) > 1  # byte pieces, so the character spans several tokens
    deltas = stream(tok, ids, 1)
    assert deltas[:-2] == [""] * (len(ids) - 1)
    assert deltas[-2:] == ["🐍", ""]


def test_detokenizer_flushes_incomplete_character(tok):
    ids = tok.encode("a🐍")
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:1]) == "a"
    assert detok.add(ids[1:2]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_detokenizer_prompt_ending_mid_character(tok):
    ids = tok.encode("日本")
    generated = ids[1:]
    assert "".join(stream(tok, generated, 1, prompt_ids=ids[:1])) == tok.decode(generated)


def test_detokenizer_window_stays_small(tok):
    ids = tok.encode("def f(x):\n    return x\n" * 200)
    detok = IncrementalDetokenizer(tok)
    for i in ids:
        detok.add([i])
        assert len(detok._ids) <= 2


def test_transformers_loads_written_files(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    write_tokenizer_files(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    code = "".join(TEXTS[:5]) + "async def main() -> None:\n\tawait asyncio.sleep(0.1)\n"
    assert hf(code, add_special_tokens=True)["input_ids"] == tok.encode(code)
    assert hf.eos_token == hf.bos_token == hf.unk_token == "<|endoftext|>"
    assert hf.model_max_length == 2048
    assert set(SPECIALS[1:]) <= set(hf.all_special_tokens)
    assert Tokenizer.from_dir(tmp_path).encode(code) == tok.encode(code)


def test_stdlib_sources_skip_tests_and_respect_budget(tmp_path):
    for rel in ["a.py", "b/c.py", "test/t.py", "idlelib/i.py", "pkg/tests/t.py", "site-packages/x.py", "d.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    paths = stdlib_sources(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a.py", "b/c.py"]
    assert list(corpus(paths, max_bytes=len("# a.py\n"))) == ["# a.py\n"]


# ---- the code-model families, against transformers -------------------------------------------

# Code with indentation, unicode, special tokens of each family written literally, leading spaces.
FAMILY_TEXTS = TEXTS + [
    " x", "  two leading", "a  b\n\n", "\n    0.5 + 10\n", "x = [\n    1,\n    22,\n]\n",
    "<s>x</s> y", "hello <s> world", "[PREFIX]a[SUFFIX] b", "<|im_start|>user\nhi<|im_end|>\n",
    "▁<PRE> x ▁<SUF>", "<｜fim▁begin｜>a<｜fim▁hole｜>b<｜fim▁end｜>", "<fim_prefix>x<fim_suffix>y<fim_middle>",
    "e\u0301 caf\u00e9 ﬁ", "\t\tdeep\n\t\t\tdeeper", "<|endoftext|>",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_are_autotokenizers(family_dirs, family):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(family_dirs[family])
    tok = Tokenizer.from_dir(family_dirs[family])
    for text in FAMILY_TEXTS:
        assert tok.encode(text) == hf(text).input_ids, text
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids, text
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text).input_ids), text
    assert tok.leading_special_ids == tuple(hf("").input_ids)  # the BOS, where the family adds one
    assert tok.bos_token == hf.bos_token and tok.eos_token == hf.eos_token and tok.bos_token_id == hf.bos_token_id
    assert tok.special_tokens == {k: v for k, v in hf.special_tokens_map.items() if k in tok.special_tokens}
    assert tok.eos_token_id == hf.eos_token_id is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_detokenizer_streams_each_family(family_dirs, family):
    tok = Tokenizer.from_dir(family_dirs[family])
    prompt = tok.encode("def f(x):\n")
    generated = tok.encode("    return x + 1  # 🐍 日本\n", add_special_tokens=False)
    whole = tok.decode(prompt + generated)[len(tok.decode(prompt)):]
    assert "".join(stream(tok, generated, 1, prompt_ids=prompt)) == whole


@pytest.mark.parametrize("family", ["llama", "codellama", "starcoder2"])
def test_transformers_rebuilds_these_families_pipelines(family_dirs, family):
    """transformers 5 replaces tokenizer.json's normalizer and pre-tokenizer for these classes, so the
    file taken as it is would give other ids (the test above would catch a missed rebuild)."""
    raw = tokenizers.Tokenizer.from_file(str(family_dirs[family] / "tokenizer.json"))
    tok = Tokenizer.from_dir(family_dirs[family])
    assert any(tok.encode(text) != raw.encode(text).ids for text in FAMILY_TEXTS)


def test_bos_comes_from_the_families_that_add_it(family_dirs):
    bos_first = {name for name in FAMILIES if Tokenizer.from_dir(family_dirs[name]).leading_special_ids}
    assert bos_first == {"llama", "codellama", "mistral", "codestral", "deepseek-coder", "phi-3"}


@pytest.mark.parametrize("declared, model_type, byte_level, built", [
    ("PreTrainedTokenizerFast", "gpt_bigcode", True, ""),  # the tiny model: the model type's TokenizersBackend
    ("PreTrainedTokenizerFast", "starcoder2", True, "PreTrainedTokenizer"),  # a class that rebuilds nothing
    ("GPT2Tokenizer", "gpt_bigcode", True, ""),  # StarCoder, likewise
    ("GPT2Tokenizer", "starcoder2", True, "GPT2Tokenizer"),
    ("LlamaTokenizerFast", "llama", False, "LlamaTokenizer"),
    ("LlamaTokenizerFast", "llama", True, ""),  # DeepSeek-Coder: byte-level under Llama's name
    ("LlamaTokenizerFast", "deepseek_v2", True, ""),  # DeepSeek-Coder-V2 alike
    ("LlamaTokenizer", "mistral", False, ""),
    ("CodeLlamaTokenizer", "llama", False, "CodeLlamaTokenizer"),
    ("PreTrainedTokenizerFast", "qwen2", True, "Qwen2Tokenizer"),  # Qwen2's class wins over any
    ("Qwen2TokenizerFast", "qwen3", True, "Qwen2Tokenizer"),
    (None, "qwen3_moe", True, "Qwen2Tokenizer"),  # Qwen3-Coder's, where tokenizer_config.json names none
    (None, "starcoder2", True, "GPT2Tokenizer"),
    ("LlamaTokenizer", "phi3", False, ""),  # Phi-3: transformers overrides the class the hub names
    ("GPT2Tokenizer", "phi3", True, ""),  # Phi-4
    ("GPTNeoXTokenizer", "stablelm", True, ""),  # Stable Code 3B
    ("GPT2Tokenizer", "granite", True, ""),  # Granite 3.x
    ("PreTrainedTokenizerFast", "glm4", True, ""),  # GLM-4-0414
    ("LlamaTokenizer", "mistral3", True, ""),  # Mistral Small 3.1: byte-level under Llama's name
    (None, "ministral3", True, ""),
    ("LlamaTokenizer", "iquestcoder", False, ""),  # transformers overrides the class the hub names
    (None, None, True, ""),
])
def test_transformers_class(declared, model_type, byte_level, built):
    assert transformers_class(declared, model_type, byte_level) == built


def test_special_tokens_as_strings_or_added_tokens(tmp_path):
    write_tokenizer_files(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<fim_pad>", "lstrip": False, "special": True}
    config["pad_token"] = None
    del config["unk_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # special_tokens_map.json has the last word where tokenizer_config.json has no added_tokens_decoder
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<fim_middle>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<fim_pad>", "unk_token": "<fim_middle>"}
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<fim_pad>", 4, 0)
