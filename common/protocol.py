"""The wire protocol: MessagePack via msgspec typed structs. Never pickle: unpickling a frame runs
whatever code its sender put in it.

Every message is a tagged, array-like struct: the first element of the encoded array is the
type tag, so a peer decodes with one typed decoder and unknown or malformed frames fail
decoding (and are dropped) instead of crashing a process. Tensors travel as raw extra frames
after the message frame.

The gateway is one router and N frontends. The router keeps the fleet's books (workers,
reservations, routing, resume, drain) and never sees a token; frontends own the clients and
receive their requests' tokens straight from the workers.

Sockets and who speaks on them:
- client front (a frontend's ROUTER, `--zmq-port`) <-> client DEALER:
  client: Generate, Cancel;  frontend: Token (batched per request as TokenBatch), Error; to a client
  that asks (Generate.batched_replies), the replies ready together as one Replies.
- WebSocket (/ws on the frontends' HTTP port): the same as objects, WsGenerate, WsCancel;
  WsTokens, WsError.
- worker link (router ROUTER, `--worker-port`) <-> each worker's DEALER:
  worker: Register, Heartbeat, Prefilled (prefill), Finished (every end), WorkerError, Goodbye;
  router: Registered, Reregister, Heartbeat, Prefill (to prefill workers), Cancel, Drain.
- token link (a frontend's PULL, its token endpoint) <- workers' PUSH: FirstToken (prefill),
  StepTokens (decode: one message per step per frontend). A request names its frontend's
  endpoint (GenerateRequest.reply_to).
- frontend link (router ROUTER, `--frontend-port`) <-> each frontend's DEALER:
  frontend: Hello, Heartbeat, Admit, Cancel, Done;  router: Welcome, Fleet (also its heartbeat),
  Refused, Lost, Finished / WorkerError (ends that carry no token).
- KV link (decode worker ROUTER, its KV endpoint) <-> prefill DEALERs:
  prefill: KvStaging, KvReady (+ KV frames on the tcp transport);  decode: KvRelease. On nixl the
  KV itself moves outside ZMQ: the decode worker reads it from the prefill worker's registered
  staging (the agent metadata and integers to do so came in KvStaging).
"""

from __future__ import annotations

from typing import Literal, Union, get_args

import msgspec

from .params import FinishReason
from .request import GenerateRequest

# 4: router and frontends: tokens go from workers to the request's frontend (reply_to), the worker
# link carries per-request events only (Prefilled, Finished for every end) and a registering worker
# lists what it holds (a restarted router adopts it). 5: the router's heartbeat to a worker says
# whether it knows the worker drains (a draining worker waits for that before it exits). 6: Prefilled
# goes once the decode worker has the KV, and Held lists no `prefilled`. 7: a drained worker says
# Goodbye as it exits. 8: requests carry min_p and presence_penalty (an older worker would drop them).
# 9: and logit_bias, penalize_prompt and penalty_last_n. 10: Admit carries the namespace of its
# prompt's blocks (an older frontend would leave a long LongRoPE prompt's hashes in the plain one).
PROTOCOL_VERSION = 11

# Maximum message sizes per socket kind (ZMQ_MAXMSGSIZE): control traffic is small; a KV frame
# over tcp carries a whole prompt's cache.
MAX_CONTROL_BYTES = 16 * 2**20
MAX_KV_BYTES = 4 * 2**30

_STRUCT = dict(tag=True, tag_field="kind", array_like=True)

# Why a request failed, as clients see it: the client library raises one exception class per type,
# the HTTP APIs answer with a status per type.
ErrorType = Literal["validation", "overloaded", "timeout", "unauthorized", "generation", "unavailable"]

# How KV moves from a prefill worker to a decode worker, fastest first: CUDA IPC between GPUs of one
# node, a /dev/shm file between CPU workers of one host, a one-sided NIXL read (UCX: RDMA, NVLink,
# TCP, shared memory) or ZMQ frames between hosts.
Transport = Literal["cuda_ipc", "shm", "nixl", "tcp"]
TRANSPORTS: tuple[Transport, ...] = get_args(Transport)
TransportChoice = Literal["auto", "cuda_ipc", "shm", "nixl", "tcp"]  # the --kv-transport flag


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
    # false: compute every prompt token, none taken from the prefill workers' prefix cache (llama.cpp's
    # `cache_prompt`); the answer is the same either way
    cache_prompt: bool = True
    # last, with defaults: the arrays of older clients, which lack them, still decode
    min_p: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: list[tuple[int, float]] = []  # (token id, added to its logit; -inf: never)
    # false: the frequency and presence penalties count the answer's tokens only, as OpenAI's
    penalize_prompt: bool = True
    penalty_last_n: int = 0  # > 0: the penalties count the last this many tokens only (llama.cpp's repeat_last_n)


class Generate(msgspec.Struct, **_STRUCT):
    id: str  # the client's id, unique per connection
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: GenerateParams = msgspec.field(default_factory=GenerateParams)
    timeout_s: float | None = None  # deadline, relative to arrival at the gateway
    api_key: str | None = None
    # the client reads Replies: replies to its requests that are ready together (one decode
    # step's) come as one message, encoded at once
    batched_replies: bool = False
    # The token ids the client already has of this request, streamed by a frontend it lost: the
    # frontend streams the rest, from output index len(resume), as it resumes a request whose worker
    # died (a sampled request's `seed` is the one reported). Last, with a default: a gateway older
    # than its client ignores it, and streams the whole answer again.
    resume: list[int] = []


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
    # A FinishReason, or an ErrorType for Error: plain strings on the messages clients read, so that
    # a client older than its gateway still reads a value it does not know (its library raises
    # the base error class for an unknown error type).
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seed: int | None = None
    prompt_logprobs: list[float | None] | None = None
    cached_tokens: int = 0  # on the first batch: prompt tokens the prefix cache spared computing


class Error(msgspec.Struct, **_STRUCT):
    id: str  # the request's id ("" for an error about the connection itself)
    error_type: str
    message: str
    # Refused by a frontend that is shutting down: never started, so another frontend may take it
    # (the client library sends it there). Last, with a default: a client older than its gateway
    # reads this message without it, and a newer one reads an older gateway's.
    draining: bool = False


ClientMessage = Union[Generate, Cancel]
class Replies(msgspec.Struct, **_STRUCT):
    """Replies to one client connection's requests that are ready together, in order."""

    replies: list[Union[TokenBatch, Error]]


GatewayToClient = Union[TokenBatch, Error, Replies]


# ---- client <-> gateway over WebSocket (/ws) -----------------------------------------------
# The same requests and replies as objects tagged by "type" (JSON text or MessagePack binary
# frames), for clients that speak JSON; the ZMQ messages above are arrays, cheaper to encode.


def _by_name(cls: type[msgspec.Struct], tag: str | None = None, strict: bool = False,
             **types) -> type[msgspec.Struct]:
    """`cls` with the same fields and defaults, encoded as an object (tagged by "type" when `tag` is
    given); `types` replaces some fields' types. `strict`: unknown fields are refused (requests: a
    misspelt parameter is an error, not a default) and fields at their defaults are not sent (so a
    gateway older than its client takes every request that uses none of the newer fields), else
    ignored (replies: an older client reads a newer gateway's)."""
    fields = []
    for f in msgspec.structs.fields(cls):
        default = f.default if f.default is not msgspec.NODEFAULT else msgspec.field(default_factory=f.default_factory)
        fields.append((f.name, types.get(f.name, f.type), default))
    return msgspec.defstruct(f"Ws{cls.__name__}", fields, kw_only=True, forbid_unknown_fields=strict,
                             omit_defaults=strict, tag=tag, tag_field="type" if tag else None)


WsParameters = _by_name(GenerateParams, strict=True)


# omit_defaults: a field left at its default is not sent, so that a gateway older than its client,
# which refuses the fields it does not know, takes every request that uses none of the new ones
class WsGenerate(msgspec.Struct, tag="generate", tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    parameters: WsParameters = msgspec.field(default_factory=WsParameters)
    timeout_s: float | None = None
    api_key: str | None = None
    resume: list[int] = []  # see Generate.resume

    def generate(self) -> Generate:
        params = GenerateParams(**msgspec.structs.asdict(self.parameters))
        return Generate(self.id, self.prompt, self.prompt_ids, params, self.timeout_s, self.api_key,
                        resume=self.resume)

    @classmethod
    def of(cls, msg: Generate) -> WsGenerate:
        return cls(msg.id, msg.prompt, msg.prompt_ids, WsParameters(**msgspec.structs.asdict(msg.params)),
                   msg.timeout_s, msg.api_key, msg.resume)


class WsCancel(msgspec.Struct, tag="cancel", tag_field="type"):
    id: str


WsToken = _by_name(Token)
WsTokens = _by_name(TokenBatch, tag="tokens", tokens=list[WsToken])
WsError = _by_name(Error, tag="error")
WsRequest = Union[WsGenerate, WsCancel]
WsReply = Union[WsTokens, WsError]
# The close code (RFC 6455's "service restart") of a frontend that shuts down: it closes a
# WebSocket once none of its requests runs, so a request still unanswered there never started
# and the client sends it again over a new connection.
WS_RESTART = 1012


def ws_reply(out: TokenBatch | Error) -> msgspec.Struct:
    """The WebSocket form (WsTokens or WsError) of a reply."""
    fields = msgspec.structs.asdict(out)
    if isinstance(out, Error):
        return WsError(**fields)
    return WsTokens(**fields | {"tokens": [WsToken(**msgspec.structs.asdict(t)) for t in out.tokens]})


def from_ws_reply(reply) -> TokenBatch | Error:
    """The reply a WsTokens or WsError carries."""
    fields = msgspec.structs.asdict(reply)
    if isinstance(reply, WsError):
        return Error(**fields)
    return TokenBatch(**fields | {"tokens": [Token(**msgspec.structs.asdict(t)) for t in reply.tokens]})


# ---- workers <-> gateway ------------------------------------------------------------------


Role = Literal["prefill", "decode"]


class Held(msgspec.Struct, array_like=True):
    """A request a worker holds, listed when it registers: a restarted router rebuilds its books
    from these (the reservation on `decode_worker`; a prefill worker's: the prompt tokens it has
    still to compute, and that its death loses the request)."""

    id: str
    decode_worker: str  # where its KV goes or is
    queued_tokens: int = 0  # prefill: prompt tokens still to compute (0 once its KV waits for the decode worker)


class Register(msgspec.Struct, **_STRUCT):
    role: Role
    worker_id: str
    protocol: int
    host_id: str
    gpu_uuids: list[str]
    device: str
    kv_endpoint: str  # decode: where prefill workers dial for KV; prefill: ""
    kv_transports: list[Transport]  # what this worker can do, in order of preference
    capacity: int  # decode: KV slots; prefill: token budget
    model_fingerprint: str
    dtype: str
    slot_len: int
    pid: int
    pid_namespace: str  # CUDA IPC needs the peers to share one (`pid: host` in containers)
    # decode: the CURVE public key (Z85) of its KV endpoint, when the worker link uses CURVE: KV
    # then travels encrypted and only to whoever the gateway gave the key; "" otherwise
    kv_public_key: str = ""
    # prefill: its prefix cache, in blocks of prefix_block_tokens (0: none), for the gateway to
    # send a prompt where its start is likely cached
    prefix_blocks: int = 0
    prefix_block_tokens: int = 0
    holding: list[Held] = msgspec.field(default_factory=list)


class Registered(msgspec.Struct, **_STRUCT):
    ok: bool
    reason: str = ""
    heartbeat_s: float = 0.5


class Reregister(msgspec.Struct, **_STRUCT):
    """Gateway -> a link it does not know (the gateway restarted): register again."""


class Heartbeat(msgspec.Struct, **_STRUCT):
    # worker -> gateway: prefill: queued prompt tokens; decode: active slots.
    # gateway -> worker: work routed to that worker and not yet done (reservations, prompts).
    # frontend -> router: the requests it streams.
    load: int = 0
    # the sender is shutting down: it finishes what it has and takes nothing new. Gateway -> worker:
    # the gateway knows that the worker drains, and routes nothing more to it.
    draining: bool = False


class Prefill(msgspec.Struct, **_STRUCT):
    """Gateway -> prefill worker: run this request and hand its KV to `decode_worker`."""

    request: GenerateRequest
    decode_worker: str
    decode_endpoint: str
    transport: Transport
    deadline: float | None = None  # time.time() after which the work is dropped
    # Requests with the same prompt (OpenAI's `n`): one prefill, a first token sampled for each
    # with its own parameters, the one KV region handed to each.
    forks: list[GenerateRequest] = msgspec.field(default_factory=list)
    decode_key: str = ""  # the decode worker's kv_public_key: "" means its KV endpoint is plain


class FirstToken(msgspec.Struct, **_STRUCT):
    """Prefill worker -> frontend, straight after sampling: this is the time to first token."""

    id: str
    token: Token
    finish_reason: FinishReason | None = None  # set when the request ends here (never handed off)
    prompt_logprobs: list[float | None] | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class StepEntry(msgspec.Struct, array_like=True):
    id: str
    token: Token
    finish_reason: FinishReason | None = None


class StepTokens(msgspec.Struct, **_STRUCT):
    """Decode worker -> frontend: one message per step with the token of each of its requests."""

    entries: list[StepEntry]


class Prefilled(msgspec.Struct, **_STRUCT):
    """Prefill worker -> router: a request's KV is with its decode worker (its queue share is
    free, and the prefill worker's death no longer touches it), or, with a finish reason, the
    request ended at its first token."""

    id: str
    finish_reason: FinishReason | None = None


class Finished(msgspec.Struct, **_STRUCT):
    """Worker -> router, for every end of a request on a worker (its slot is free); the router
    passes the ends that carry no token (cancelled, timeout) on to the request's frontend."""

    id: str
    reason: FinishReason


class WorkerError(msgspec.Struct, **_STRUCT):
    id: str
    message: str


class Drain(msgspec.Struct, **_STRUCT):
    """Gateway -> worker: stop taking new work, finish what is running, then exit."""

    timeout_s: float


class Goodbye(msgspec.Struct, **_STRUCT):
    """Worker -> router: drained (what it could not finish was handed back), and exiting now: off
    the books at once, not at its heartbeat timeout, taken for a silent worker."""


WorkerToGateway = Union[Register, Heartbeat, Prefilled, Finished, WorkerError, Goodbye]
GatewayToWorker = Union[Registered, Reregister, Heartbeat, Prefill, Cancel, Drain]
WorkerToFrontend = Union[FirstToken, StepTokens]


# ---- frontends <-> router -----------------------------------------------------------------


class Hello(msgspec.Struct, **_STRUCT):
    """Frontend -> router, on connecting and whenever the router does not know it: who it is and
    the attempts it still streams (a restarted router re-attaches the work its workers hold)."""

    frontend_id: str
    protocol: int
    model_fingerprint: str
    token_endpoint: str
    zmq_endpoint: str  # its client port, for /info's list
    live: list[str] = msgspec.field(default_factory=list)


class Welcome(msgspec.Struct, **_STRUCT):
    ok: bool
    reason: str = ""
    router_id: str = ""
    heartbeat_s: float = 0.5


class Fleet(msgspec.Struct, **_STRUCT):
    """Router -> every frontend, each heartbeat and on changes: what the frontends' health, /info
    and refusals read."""

    prefill_workers: int = 0
    decode_workers: int = 0
    draining: bool = False
    in_flight: int = 0
    max_concurrent: int = 0
    zmq_endpoints: list[str] = msgspec.field(default_factory=list)
    block_sizes: list[int] = msgspec.field(default_factory=list)  # the prefill workers' prefix blocks
    dtype: str | None = None
    device: str | None = None
    # Workers may be registering yet (the router started moments ago, or a role lost its last
    # worker moments ago, which serve starts again): a request a client resumes (its frontend or
    # gateway lost) waits for them rather than be refused.
    starting: bool = False


class Admit(msgspec.Struct, **_STRUCT):
    """Frontend -> router: requests to route (several: OpenAI's `n` choices of one prompt, sharing
    its prefill). `resume`: attempts of requests whose worker was lost, first in line."""

    requests: list[GenerateRequest]
    deadline: float | None = None
    resume: bool = False
    # the prompt's block hashes per prefix block size the fleet uses (Fleet.block_sizes), computed
    # here so that the router's per-request work stays small
    hashes: dict[int, list[bytes]] = msgspec.field(default_factory=dict)
    namespace: bytes = b""  # of those blocks (prefix_blocks.block_namespace): for the sizes not sent


class Refused(msgspec.Struct, **_STRUCT):
    """Router -> frontend: these attempts were not admitted."""

    ids: list[str]
    error_type: str
    message: str


class Done(msgspec.Struct, **_STRUCT):
    """Frontend -> router: the attempt's client has its last token. It no longer counts against
    the concurrency limit; its slot stays reserved until its worker's end arrives."""

    id: str


class Lost(msgspec.Struct, **_STRUCT):
    """Router -> frontend: the attempt's worker died or handed it back; the frontend resumes it."""

    id: str
    why: str


FrontendToRouter = Union[Hello, Heartbeat, Admit, Cancel, Done]
RouterToFrontend = Union[Welcome, Fleet, Refused, Lost, Finished, WorkerError, Reregister]


# ---- KV link ------------------------------------------------------------------------------


class KvLocation(msgspec.Struct, array_like=True):
    """Where a prompt's KV waits in the prefill worker's staging buffer."""

    offset: int  # token offset in staging
    length: int  # tokens
    staging: str  # the key of the staging's description (KvStaging) for the handoff's transport


class KvReady(msgspec.Struct, **_STRUCT):
    request: GenerateRequest
    first_token: int
    first_text: str  # what the prefill worker emitted for it (replayed by the decode side)
    location: KvLocation
    transport: Transport
    prefill_worker: str
    deadline: float | None = None
    # tcp: the tokens of each layer's K/V the frames hold, its last ones (a windowed layer's last
    # ring: the decode worker keeps no more); empty: `location.length` in every layer
    kept: tuple[int, ...] = ()


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
