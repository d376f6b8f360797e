"""The client <-> gateway messages, repeated from `splitserve.common.protocol`.

protocol.py imports the engine's request types and, through them, torch; a client must stay
light, so it keeps its own copy of the structs it speaks, field for field and with the same tag
settings. tests/test_client_unit.py checks that both sides encode and decode each other.
"""

from __future__ import annotations

from typing import Union

import msgspec

_STRUCT = dict(tag=True, tag_field="kind", array_like=True)


class GenerateParams(msgspec.Struct, array_like=True, kw_only=True):
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    strip_stop: bool = False
    ignore_eos: bool = False
    logprobs: bool = False
    top_n_tokens: int = 0
    prompt_logprobs: bool = False
    truncate: int | None = None


class Generate(msgspec.Struct, **_STRUCT):
    id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: GenerateParams = msgspec.field(default_factory=GenerateParams)
    timeout_s: float | None = None
    api_key: str | None = None


class Cancel(msgspec.Struct, **_STRUCT):
    id: str


class Token(msgspec.Struct, array_like=True):
    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_tokens: list[tuple[int, float]] | None = None


class TokenBatch(msgspec.Struct, **_STRUCT):
    id: str
    tokens: list[Token]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seed: int | None = None
    prompt_logprobs: list[float | None] | None = None


class Error(msgspec.Struct, **_STRUCT):
    id: str  # "" for an error about the connection itself
    error_type: str
    message: str


GatewayToClient = Union[TokenBatch, Error]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(GatewayToClient)


def encode(msg: Generate | Cancel) -> bytes:
    return _encoder.encode(msg)


def decode(frames: list) -> TokenBatch | Error | None:
    """The message in a multipart frame list, or None for anything malformed (dropped, never fatal).

    The message is the last frame, so a gateway that puts an empty delimiter first still works."""
    if not frames:
        return None
    try:
        return _decoder.decode(frames[-1])
    except (msgspec.DecodeError, TypeError, ValueError):
        return None
