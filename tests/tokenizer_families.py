"""Small tokenizers trained here, written out as each code-model family ships its tokenizer files.

Each family's directory holds what the Hub checkpoint has for its tokenizer: tokenizer.json with the
family's pipeline (normalizer, pre-tokenizer, post-processor, decoder) and special tokens,
tokenizer_config.json with its tokenizer_class, special tokens and flags, and a config.json that
carries only model_type (transformers 5 picks the tokenizer class from it as well). The vocabulary is
a BPE of a few hundred merges learned from the standard library's Python source: SentencePiece-like
(the ▁ metaspace, byte fallback) for Llama, CodeLlama and Mistral, byte-level for the others.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

VOCAB_SIZE = 700
CORPUS_FILES = ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "keyword.py")
CORPUS_LINES = 400
# Text the corpus lacks, so that merges cover some non-ASCII words too.
EXTRA_TEXT = "变量 = '日本語'  # 名前\nprint(\"🐍 naïve café\")\n" * 5
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass(frozen=True)
class Family:
    model_type: str
    tokenizer_class: str
    metaspace: bool  # SentencePiece-like (▁, byte fallback); else byte-level
    special: tuple[str, ...]  # added tokens, special=True, in id order after the learned vocabulary
    bos: str | None
    eos: str
    unk: str | None = None
    plain_added: tuple[str, ...] = ()  # added tokens that are not special (Qwen's FIM tokens are not)
    config: dict = field(default_factory=dict)  # further tokenizer_config.json entries
    legacy_normalizer: bool = True  # metaspace only: Prepend+Replace normalizer (Llama 2 era), else Metaspace
    digits: bool = False  # byte-level only: StarCoder's Digits pre-tokenizer before ByteLevel
    bos_in_post_processor: bool = False  # byte-level only: DeepSeek-Coder's TemplateProcessing with BOS


SPM_SPECIALS = ("<unk>", "<s>", "</s>")
STARCODER2_SPECIALS = ("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>",
                       "<file_sep>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_FIM = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")

FAMILIES = {
    "llama": Family("llama", "LlamaTokenizer", True, SPM_SPECIALS, "<s>", "</s>", "<unk>",
                    config={"add_bos_token": True, "add_eos_token": False, "legacy": False}),
    "codellama": Family("llama", "CodeLlamaTokenizer", True, SPM_SPECIALS + ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"),
                        "<s>", "</s>", "<unk>",
                        config={"add_bos_token": True, "add_eos_token": False, "legacy": None,
                                "prefix_token": "▁<PRE>", "middle_token": "▁<MID>", "suffix_token": "▁<SUF>",
                                "eot_token": "▁<EOT>", "fill_token": "<FILL_ME>"}),
    "mistral": Family("mistral", "LlamaTokenizer", True, SPM_SPECIALS, "<s>", "</s>", "<unk>",
                      config={"add_bos_token": True, "add_eos_token": False, "legacy": True}),
    "codestral": Family("mistral", "LlamaTokenizer", True,
                        SPM_SPECIALS + ("[INST]", "[/INST]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]"), "<s>", "</s>",
                        "<unk>", config={"add_bos_token": True, "add_eos_token": False, "legacy": False},
                        legacy_normalizer=False),
    "deepseek-coder": Family("llama", "LlamaTokenizerFast", False, ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
                             "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                             plain_added=("<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<pad>", "<|EOT|>"),
                             config={"add_bos_token": True, "add_eos_token": False, "legacy": True},
                             bos_in_post_processor=True),
    "qwen2.5-coder": Family("qwen2", "Qwen2Tokenizer", False, QWEN_SPECIALS, None, "<|endoftext|>",
                            plain_added=QWEN_FIM, config={"add_prefix_space": False, "pad_token": "<|endoftext|>",
                                                          "errors": "replace", "split_special_tokens": False}),
    "qwen3": Family("qwen3", "Qwen2Tokenizer", False, QWEN_SPECIALS, None, "<|im_end|>",
                    plain_added=QWEN_FIM + ("<think>", "</think>"),
                    config={"add_prefix_space": False, "pad_token": "<|endoftext|>", "errors": "replace"}),
    "starcoder2": Family("starcoder2", "GPT2Tokenizer", False, STARCODER2_SPECIALS, "<|endoftext|>", "<|endoftext|>",
                         "<|endoftext|>", config={"add_prefix_space": False}, digits=True),
    "starcoder": Family("gpt_bigcode", "GPT2Tokenizer", False, STARCODER2_SPECIALS[:5], "<|endoftext|>",
                        "<|endoftext|>", "<|endoftext|>", config={"add_prefix_space": False}, digits=True),
    # transformers 5 takes tokenizer.json as it is for these model types, whatever class the hub names
    "phi-3": Family("phi3", "LlamaTokenizer", True, SPM_SPECIALS + ("<|endoftext|>", "<|assistant|>", "<|end|>"),
                    "<s>", "<|endoftext|>", "<unk>",
                    config={"add_bos_token": False, "add_eos_token": False, "legacy": False},
                    legacy_normalizer=False),
    "phi-4": Family("phi3", "GPT2Tokenizer", False, ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"),
                    "<|endoftext|>", "<|im_end|>", "<|endoftext|>"),
    "stable-code": Family("stablelm", "GPTNeoXTokenizer", False, STARCODER2_SPECIALS[:5], "<|endoftext|>",
                          "<|endoftext|>", "<|endoftext|>"),
    "granite": Family("granite", "GPT2Tokenizer", False, ("<|end_of_text|>",) + STARCODER2_SPECIALS[1:5],
                      "<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>", config={"add_prefix_space": False}),
    "santacoder": Family("gpt_bigcode", "GPT2TokenizerFast", False,
                         ("<|endoftext|>", "<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"),
                         "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
}


@cache
def corpus() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for name in CORPUS_FILES for line in (root / name).read_text().splitlines(keepends=True)]
    return (*lines[:CORPUS_LINES], EXTRA_TEXT)


@cache
def learned(pre_tokenizer: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a BPE trained on the corpus, split as the family splits text:
    "metaspace" (words with their ▁), "qwen" (Qwen2's regex), "digits" (StarCoder's single digits)
    or "byte_level" (GPT-2's regex)."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre_tokenizer != "qwen")
    tok.pre_tokenizer = {
        "metaspace": pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        "qwen": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_REGEX), "isolated"), byte_level]),
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "byte_level": byte_level,
    }[pre_tokenizer]
    alphabet = (sorted({c for text in corpus() for c in text.replace(" ", "▁")} - {"\n", "\t"})
                if pre_tokenizer == "metaspace" else pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def build(family: Family) -> Tokenizer:
    qwen = family.tokenizer_class == "Qwen2Tokenizer"
    kind = "metaspace" if family.metaspace else "qwen" if qwen else "digits" if family.digits else "byte_level"
    vocab, merges = learned(kind)
    # SentencePiece vocabularies start with <unk> <s> </s> and the 256 byte pieces, byte-level ones
    # with the learned tokens; added tokens follow, as in the released files.
    head = [*family.special[:3], *BYTE_TOKENS] if family.metaspace else []
    ordered = head + [t for t in sorted(vocab, key=vocab.get) if t not in head]
    ids = {t: i for i, t in enumerate(ordered)}
    if family.metaspace:
        tok = Tokenizer(models.BPE(ids, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        if family.legacy_normalizer:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in family.special])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    else:
        tok = Tokenizer(models.BPE(ids, merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not qwen)
        if qwen:
            tok.normalizer = normalizers.NFC()
            split = pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated")
            tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        elif family.digits:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in family.special])
        if family.bos_in_post_processor:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
                special_tokens=[(family.bos, tok.token_to_id(family.bos))])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in family.plain_added])
    return tok


def write(family_name: str, model_dir: Path) -> Path:
    family = FAMILIES[family_name]
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = build(family)
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"tokenizer_class": family.tokenizer_class, "bos_token": family.bos, "eos_token": family.eos,
              "unk_token": family.unk, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "additional_special_tokens": [t for t in family.special if t not in (family.bos, family.eos, family.unk)],
              "chat_template": CHAT_TEMPLATE, **family.config}
    if family.tokenizer_class == "Qwen2Tokenizer":  # as save_pretrained writes it since transformers 4.34
        config["added_tokens_decoder"] = {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": t in family.special}
            for t in (*family.special, *family.plain_added)}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (model_dir / "config.json").write_text(json.dumps({"model_type": family.model_type}))
    return model_dir
