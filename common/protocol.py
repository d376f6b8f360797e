"""The wire protocol: MessagePack via msgspec typed structs, never pickle (DESIGN §4).

Every message is a tagged, array-like struct: the first element of the encoded array is the
type tag, so a peer decodes with one typed decoder and unknown or malformed frames fail
decoding (and are dropped) instead of crashing a process. Tensors travel as raw extra frames
after the message frame.

Sockets and who speaks on them:
- client front (gateway ROUTER, `--zmq-port`) <-> client DEALER:
  client: Generate, Cancel;  gateway: Token (batched per request as TokenBatch), Error.
- worker link (gateway ROUTER, `--worker-port`) <-> each worker's DEALER:
  worker: Register, Heartbeat, FirstToken (prefill), StepTokens (decode), Finished, Error;
  gateway: Registered, Reregister, Heartbeat, Prefill (to prefill workers), Cancel, Drain.
- KV link (decode worker ROUTER, its KV endpoint) <-> prefill DEALERs:
  prefill: KvStaging, KvReady (+ KV frames on the tcp transport);  decode: KvRelease.
"""

from __future__ import annotations

from typing import Union

import msgspec

from .request import GenerateRequest

PROTOCOL_VERSION = 1

# Maximum message sizes per socket kind (ZMQ_MAXMSGSIZE): control traffic is small; a KV frame
# over tcp carries a whole prompt's cache.
MAX_CONTROL_BYTES = 16 * 2**20
MAX_KV_BYTES = 4 * 2**30

# A decode worker's output thread connects with identity worker_id + OUTPUT_SUFFIX.
OUTPUT_SUFFIX = b"/out"

_STRUCT = dict(tag=True, tag_field="kind", array_like=True)


# ---- client <-> gateway -------------------------------------------------------------------


class GenerateParams(msgspec.Struct, array_like=True, kw_only=True):
    """What a client may ask for; the gateway validates, tokenizes and fills the defaults."""

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
    id: str  # the client's id, unique per connection
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: GenerateParams = msgspec.field(default_factory=GenerateParams)
    timeout_s: float | None = None  # deadline, relative to arrival at the gateway
    api_key: str | None = None


class Cancel(msgspec.Struct, **_STRUCT):
    id: str


class Token(msgspec.Struct, array_like=True):
    index: int  # output index, from 0
    token_id: int
    text: str
    logprob: float | None = None
    top_tokens: list[tuple[int, float]] | None = None


class TokenBatch(msgspec.Struct, **_STRUCT):
    """Consecutive tokens of one request; `finish_reason` set on the last batch."""

    id: str
    tokens: list[Token]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seed: int | None = None
    prompt_logprobs: list[float | None] | None = None


class Error(msgspec.Struct, **_STRUCT):
    id: str  # the request's id ("" for an error about the connection itself)
    error_type: str  # validation | overloaded | timeout | unauthorized | generation | unavailable
    message: str


ClientMessage = Union[Generate, Cancel]
GatewayToClient = Union[TokenBatch, Error]


# ---- workers <-> gateway ------------------------------------------------------------------


class Register(msgspec.Struct, **_STRUCT):
    role: str  # "prefill" | "decode"
    worker_id: str
    protocol: int
    host_id: str
    gpu_uuids: list[str]
    device: str
    kv_endpoint: str  # decode: where prefill workers dial for KV; prefill: ""
    kv_transports: list[str]  # what this worker can do, in order of preference
    capacity: int  # decode: KV slots; prefill: token budget
    model_fingerprint: str
    dtype: str
    slot_len: int
    pid: int
    pid_namespace: str  # CUDA IPC needs the peers to share one (`pid: host` in containers)
    # decode: the CURVE public key (Z85) of its KV endpoint, when the worker link uses CURVE: KV
    # then travels encrypted and only to whoever the gateway gave the key; "" otherwise
    kv_public_key: str = ""


class Registered(msgspec.Struct, **_STRUCT):
    ok: bool
    reason: str = ""
    heartbeat_s: float = 0.5
    gateway_id: str = ""  # new for each gateway process: a worker that sees it change drops old work


class Reregister(msgspec.Struct, **_STRUCT):
    """Gateway -> a link it does not know (the gateway restarted): register again."""


class Heartbeat(msgspec.Struct, **_STRUCT):
    # worker -> gateway: prefill: queued prompt tokens; decode: active slots.
    # gateway -> worker: work routed to that worker and not yet done (reservations, prompts).
    load: int = 0
    draining: bool = False


class Prefill(msgspec.Struct, **_STRUCT):
    """Gateway -> prefill worker: run this request and hand its KV to `decode_worker`."""

    request: GenerateRequest
    decode_worker: str
    decode_endpoint: str
    transport: str
    deadline: float | None = None  # time.time() after which the work is dropped
    # Requests with the same prompt (OpenAI's `n`): one prefill, a first token sampled for each
    # with its own parameters, the one KV region handed to each.
    forks: list[GenerateRequest] = msgspec.field(default_factory=list)
    decode_key: str = ""  # the decode worker's kv_public_key: "" means its KV endpoint is plain


class FirstToken(msgspec.Struct, **_STRUCT):
    """Prefill worker -> gateway, straight after sampling: this is the time to first token."""

    id: str
    token: Token
    finish_reason: str | None = None  # set when the request ends here (never handed off)
    prompt_logprobs: list[float | None] | None = None


class StepEntry(msgspec.Struct, array_like=True):
    id: str
    token: Token
    finish_reason: str | None = None


class StepTokens(msgspec.Struct, **_STRUCT):
    """Decode worker -> gateway: one message per step with every active request's token."""

    entries: list[StepEntry]


class Finished(msgspec.Struct, **_STRUCT):
    """A request ended without a token to carry the reason (cancelled, dropped, expired)."""

    id: str
    reason: str


class WorkerError(msgspec.Struct, **_STRUCT):
    id: str
    message: str


class Drain(msgspec.Struct, **_STRUCT):
    """Gateway -> worker: stop taking new work, finish what is running, then exit."""

    timeout_s: float


WorkerToGateway = Union[Register, Heartbeat, FirstToken, StepTokens, Finished, WorkerError]
GatewayToWorker = Union[Registered, Reregister, Heartbeat, Prefill, Cancel, Drain]


# ---- KV link ------------------------------------------------------------------------------


class KvLocation(msgspec.Struct, array_like=True):
    """Where a prompt's KV waits in the prefill worker's staging buffer."""

    offset: int  # token offset in staging
    length: int  # tokens
    staging: str  # shm: the file path; cuda_ipc: the handle key; tcp: ""


class KvReady(msgspec.Struct, **_STRUCT):
    request: GenerateRequest
    first_token: int
    first_text: str  # what the prefill worker emitted for it (replayed by the decode side)
    location: KvLocation
    transport: str
    prefill_worker: str
    deadline: float | None = None


class KvStaging(msgspec.Struct, **_STRUCT):
    """Prefill -> decode, once per connection before any KvReady: how to open its staging."""

    prefill_worker: str
    desc: dict


class KvRelease(msgspec.Struct, **_STRUCT):
    """Decode -> prefill, after the copy out of staging has completed (or was skipped)."""

    id: str
    offset: int
    ok: bool = True
    message: str = ""


KvToDecode = Union[KvStaging, KvReady]


# ---- encoding -----------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


class DecodeError(ValueError):
    """A frame that is not a valid message of the expected kinds."""


def decoder(kinds) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kinds)


def decode(dec: msgspec.msgpack.Decoder, frame: bytes | memoryview):
    try:
        return dec.decode(frame)
    # RecursionError: a frame nested past msgspec's depth limit where a field is untyped (KvStaging.desc)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError, RecursionError) as e:
        raise DecodeError(str(e)) from None
