"""Train the built-in `tiny` model's byte-level BPE tokenizer on the standard library's Python source.

Run once; its output is committed so every machine shares one tokenizer:

    python -m splitserve.common.builtin.train_tokenizer [--out DIR]
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 8192  # special tokens included
SPECIAL_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
# Enough code to learn useful merges while training stays well under a minute on two cores.
MAX_CORPUS_BYTES = 12_000_000
# Test suites, IDLE and 2to3 fixtures are unrepresentative (or huge); installed packages vary per machine.
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
DEFAULT_OUT = Path(__file__).parent / "tiny"


def stdlib_sources(root: Path, skipped_dirs: set[str] = SKIPPED_DIRS) -> list[Path]:
    """The stdlib's .py files in a fixed order, so the same interpreter always yields the same corpus."""
    return sorted(
        path
        for path in root.rglob("*.py")
        if not skipped_dirs.intersection(path.relative_to(root).parts[:-1])
    )


def corpus(paths: list[Path], max_bytes: int) -> Iterator[str]:
    """File texts in order until the byte budget is spent; files that are not UTF-8 are skipped."""
    used = 0
    for path in paths:
        data = path.read_bytes()
        if used + len(data) > max_bytes:
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        used += len(data)
        yield text


def build_tokenizer() -> Tokenizer:
    """An untrained tokenizer with StarCoder's byte-level pipeline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    return tok


def train(texts: list[str]) -> Tokenizer:
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so any input (emoji, CJK, control characters) has an encoding.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory to write tokenizer.json into")
    parser.add_argument("--max-bytes", type=int, default=MAX_CORPUS_BYTES, help="corpus size cap")
    args = parser.parse_args(argv)

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = list(corpus(stdlib_sources(root), args.max_bytes))
    print(f"training on {len(texts)} files, {sum(map(len, texts)):,} characters from {root}")
    start = time.perf_counter()
    tok = train(texts)
    print(f"trained in {time.perf_counter() - start:.1f} s, vocab size {tok.get_vocab_size()}")

    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "tokenizer.json"
    tok.save(str(out_file), pretty=False)
    print(f"wrote {out_file} ({out_file.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
