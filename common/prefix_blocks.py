"""Prompts cut into fixed blocks of token ids, each named by a hash of every id up to its end: the
keys of the prefill workers' prefix caches, and of the gateway's index of what each worker holds.
Stable across processes and machines (blake2b over the ids as little-endian int32, never Python's
salted `hash()`); imports no torch. The frontends hash a prompt's blocks as the prefill workers
do, namespace included (block_namespace), so that the router's index names what the workers keep."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from .model_config import ModelConfig, long_rope_prompt
from .request import GenerateRequest

DEFAULT_BLOCK_TOKENS = 32
_DIGEST = 16


def block_hashes(ids: Sequence[int], block_tokens: int, namespace: bytes = b"") -> list[bytes]:
    """The hash of each full block of `ids`: block i's covers ids[: (i + 1) * block_tokens], as
    the hash of block i - 1's and the block's own ids. A trailing partial block has none. Blocks of
    another `namespace` (the first block's "previous") never match: K/V that differ for the same ids
    (a long LongRoPE prompt's)."""
    hashes, previous = [], namespace
    pack = struct.Struct(f"<{block_tokens}i").pack
    for end in range(block_tokens, len(ids) + 1, block_tokens):
        previous = hashlib.blake2b(previous + pack(*ids[end - block_tokens : end]), digest_size=_DIGEST).digest()
        hashes.append(previous)
    return hashes


def block_namespace(cfg: ModelConfig, request: GenerateRequest) -> bytes:
    """Where `request`'s prompt blocks belong: apart from other prompts' where their K/V differ for
    the same ids (a long prompt's under LongRoPE; a resumed request's as its first attempt's)."""
    return b"long-rope" if long_rope_prompt(cfg, len(request.prompt_ids) - request.resumed) else b""
