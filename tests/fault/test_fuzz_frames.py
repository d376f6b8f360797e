"""The gateway's ZMQ front and WebSocket fuzzed with hypothesis: MessagePack and JSON frames that
are malformed, of the wrong types, with huge or non-finite numbers, invalid UTF-8, prompts past the
limits, or random bytes. Every frame is answered as the gateway's own decoder reads it: a request
ends with tokens and a finish reason or with a typed error (never a worker's "generation" error: a
request that reaches a worker must be one it can run); a malformed frame gets a validation error;
the front keeps answering, and good streams beside the fuzzing run unharmed."""

from __future__ import annotations

import itertools
import math

import msgspec
import zmq
from hypothesis import given
from hypothesis import strategies as st
from websockets.sync.client import connect

from fuzz_support import MAX_TOTAL_TOKENS, PROMPT, fuzz_settings
from splitserve.common import protocol as P
from splitserve.gateway import websocket as W

EXAMPLES = 200
# What a request may end with: a refusal of what the client sent, or the state of the server.
CLIENT_ERRORS = {"validation", "overloaded", "unavailable", "timeout", "unauthorized"}
REPLY_TIMEOUT_S = 60

# ---- values -------------------------------------------------------------------------------

INT64, UINT64 = 2**63, 2**64
EDGE_INTS = [0, -1, 2**31 - 1, 2**31, INT64 - 1, INT64, -INT64, UINT64 - 1, 50257, 10**6]
EDGE_FLOATS = [0.0, -0.0, 1e-45, 1e-30, 3.5e38, 1e308, -1e308, math.inf, -math.inf, math.nan]
edge_ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-INT64, UINT64 - 1))
edge_floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
short_texts = st.text(max_size=12)
prompts = st.one_of(st.text(min_size=1, max_size=40), st.sampled_from([
    PROMPT, "", "\x00", "😀" * 50, "x " * (2 * MAX_TOTAL_TOKENS)]))  # the last is past the limits
# MessagePack strings that are not UTF-8: raw str8 frames msgspec would never write
bad_utf8 = st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)).map(
    lambda b: msgspec.Raw(b"\xd9" + bytes([len(b)]) + b))
scalars = st.one_of(st.none(), st.booleans(), edge_ints, edge_floats, short_texts)
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
ids = st.sampled_from(["a", "b", ""])  # requests run one at a time: an id may repeat


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def wrong(binary: bool) -> st.SearchStrategy:
    """A value of any type; for MessagePack also strings that are not UTF-8."""
    return st.one_of(anything, bad_utf8) if binary else anything


# GenerateParams field -> (values a client would send, values of its type at the edges)
PARAMS = {
    "max_new_tokens": (st.integers(1, 40), edge_ints),
    "do_sample": (st.booleans(), st.booleans()),
    "temperature": (st.floats(0.1, 2.0), edge_floats),
    "top_k": (st.integers(0, 100), edge_ints),
    "top_p": (st.floats(0.05, 1.0), edge_floats),
    "typical_p": (st.floats(0.05, 1.0), edge_floats),
    "repetition_penalty": (st.floats(0.5, 2.0), edge_floats),
    "frequency_penalty": (st.floats(-2.0, 2.0), edge_floats),
    "seed": (st.one_of(st.none(), st.integers(0, INT64 - 1)), edge_ints),
    "stop": (st.lists(short_texts, max_size=4), st.lists(st.text(max_size=300), max_size=8)),
    "stop_token_ids": (st.lists(st.integers(0, 1000), max_size=8), st.lists(edge_ints, max_size=12)),
    "strip_stop": (st.booleans(), st.booleans()),
    "ignore_eos": (st.booleans(), st.booleans()),
    "logprobs": (st.booleans(), st.booleans()),
    "top_n_tokens": (st.integers(0, 5), edge_ints),
    "prompt_logprobs": (st.booleans(), st.booleans()),
    "truncate": (st.one_of(st.none(), st.integers(1, 200)), edge_ints),
    "cache_prompt": (st.booleans(), st.booleans()),
    "min_p": (st.floats(0.0, 1.0), edge_floats),
    "presence_penalty": (st.floats(-2.0, 2.0), edge_floats),
    "logit_bias": (st.lists(st.tuples(st.integers(0, 1000), st.floats(-100.0, 100.0)), max_size=4,
                            unique_by=lambda p: p[0]),
                   st.lists(st.tuples(edge_ints, edge_floats), max_size=8)),
    "penalize_prompt": (st.booleans(), st.booleans()),
    "penalty_last_n": (st.integers(0, 100), edge_ints),
}
assert list(PARAMS) == [f.name for f in msgspec.structs.fields(P.GenerateParams)]
DEFAULTS = msgspec.structs.asdict(P.GenerateParams())
FIELDS = {  # the rest of a generate request, the same way
    "prompt": (prompts, st.text(max_size=2000)),
    "prompt_ids": (st.none(), st.lists(edge_ints, max_size=2 * MAX_TOTAL_TOKENS)),
    "timeout_s": (st.one_of(st.none(), st.floats(5.0, 60.0)), edge_floats),
    "api_key": (st.none(), short_texts),
}


@st.composite
def fields(draw, choices: dict, binary: bool, all_given: bool) -> dict:
    """Sane values, except for up to two fields that are at the edges of their type or of another
    type altogether; `all_given`: every field has a value (else some are left out)."""
    names = list(choices)
    given = names if all_given else draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    n = draw(st.sampled_from([0, 1, 1, 2]))
    odd = draw(st.lists(st.sampled_from(names), unique=True, min_size=n, max_size=n))
    wrong_type = draw(st.integers(0, 2)) == 2  # hypothesis leans to small draws: the rare case is the large one
    out = {}
    for name in [*given, *(n for n in odd if n not in given)]:
        sane, edge = choices[name]
        out[name] = draw((wrong(binary) if wrong_type else edge) if name in odd else sane)
    return out


KINDS = st.sampled_from(["generate"] * 7 + ["cancel", "garbage", "raw"])  # the first is the likeliest


# ---- ZMQ: array-like, tagged MessagePack ----------------------------------------------------


@st.composite
def zmq_frames(draw) -> bytes:
    kind = draw(KINDS)
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "garbage":
        return msgspec.msgpack.encode(draw(st.one_of(anything, st.lists(anything).map(lambda a: ["Generate", *a]))))
    rid = draw(wrong(True) if draw(st.integers(0, 9)) == 9 else ids)
    if kind == "cancel":
        return msgspec.msgpack.encode(["Cancel", rid])
    given = draw(fields(PARAMS, True, all_given=False))
    params = [given.get(name, DEFAULTS[name]) for name in PARAMS]  # positional: defaults for the rest
    params = params[: draw(st.integers(0, len(params)))] if draw(st.integers(0, 9)) == 9 else params
    top = draw(fields(FIELDS, True, all_given=True))
    message = ["Generate", rid, top["prompt"], top["prompt_ids"], params, top["timeout_s"], top["api_key"]]
    return msgspec.msgpack.encode(message[: draw(st.sampled_from([2, 3, 7, 7, 7, 7]))])


class ZmqFront:
    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.decoder = P.decoder(P.GatewayToClient)

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def receive(self) -> P.TokenBatch | P.Error:
        assert self.sock.poll(REPLY_TIMEOUT_S * 1000), "the ZMQ front stopped answering"
        return P.decode(self.decoder, self.sock.recv())

    def close(self) -> None:
        self.ctx.destroy(linger=0)


# ---- WebSocket: JSON or MessagePack objects by name -----------------------------------------


@st.composite
def ws_frames(draw) -> bytes | str:
    binary = draw(st.booleans())
    kind = draw(KINDS)
    if kind == "raw":
        return draw(st.binary(max_size=200)) if binary else draw(st.text(max_size=200))
    rid = draw(wrong(binary) if draw(st.integers(0, 9)) == 9 else ids)
    if kind == "garbage":
        message = draw(st.one_of(anything, st.dictionaries(st.text(max_size=8), anything).map(
            lambda d: {**d, "type": "generate"})))
    elif kind == "cancel":
        message = {"type": "cancel", "id": rid}
    else:
        parameters = draw(wrong(binary) if draw(st.integers(0, 5)) == 5 else fields(PARAMS, binary, all_given=False))
        message = {"type": "generate", "id": rid, **draw(fields(FIELDS, binary, all_given=True))}
        if draw(st.integers(0, 4)) != 4:
            message["parameters"] = parameters
    if binary:
        return msgspec.msgpack.encode(message)
    text = msgspec.json.encode(message).decode()
    # a lone surrogate escape, which no JSON encoder writes but a client may send
    return text.replace("fibonacci", "\\ud800", 1) if draw(st.integers(0, 9)) == 9 else text


class WsFront:
    def __init__(self, ws):
        self.ws = ws

    def send(self, frame: bytes | str) -> None:
        self.ws.send(frame)

    def receive(self) -> P.TokenBatch | P.Error:
        raw = self.ws.recv(timeout=REPLY_TIMEOUT_S)
        reply = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)
        if reply["type"] == "error":
            return P.Error(reply["id"], reply["error_type"], reply["message"])
        return P.TokenBatch(reply["id"], [P.Token(**t) for t in reply["tokens"]], reply["finish_reason"])


def ws_read(frame: bytes | str):
    """The message the gateway's /ws reads from a frame, or why it reads none."""
    try:
        return W.read_frame(frame, isinstance(frame, bytes))
    except W.MALFORMED as e:
        return P.DecodeError(str(e))


# ---- the checks ----------------------------------------------------------------------------


def answer(front, message, probe: int) -> None:
    """Check what one fuzz frame gets (`message`: what the gateway reads from it), then that the
    front still answers: a probe request, refused at once, gets its error."""
    expected = message.id if isinstance(message, (P.Generate, P.WsGenerate)) else None
    front.send(_probe_frame(front, probe))
    probe_id, seen_probe = f"probe{probe}", False
    done = not isinstance(message, (P.Generate, P.WsGenerate, P.DecodeError))  # a cancel gets no answer
    while not (seen_probe and done):
        reply = front.receive()
        if reply.id == probe_id:
            assert isinstance(reply, P.Error) and reply.error_type == "validation", reply
            seen_probe = True
        elif isinstance(message, P.DecodeError):
            assert isinstance(reply, P.Error) and reply.error_type == "validation" and not done, (message, reply)
            done = True
        elif reply.id == expected and isinstance(reply, P.Error):
            assert reply.error_type in CLIENT_ERRORS, (message, reply)
            done = True
        elif reply.id == expected:
            assert [t.index for t in reply.tokens] == sorted(t.index for t in reply.tokens)
            done = reply.finish_reason is not None
            assert not done or reply.finish_reason in ("length", "eos_token", "stop_sequence"), (message, reply)


def _probe_frame(front, n: int) -> bytes | str:
    params = {"max_new_tokens": 0}  # refused at once
    if isinstance(front, ZmqFront):
        return P.encode(P.Generate(f"probe{n}", PROMPT, params=P.GenerateParams(**params)))
    probe = {"type": "generate", "id": f"probe{n}", "prompt": PROMPT, "parameters": params}
    return msgspec.json.encode(probe).decode()


def test_zmq_front_answers_every_frame(fuzzed_cluster, good_traffic):
    front, probes = ZmqFront(fuzzed_cluster.endpoint), itertools.count()
    decoder = P.decoder(P.ClientMessage)

    @fuzz_settings(EXAMPLES)
    @given(frame=zmq_frames())
    def fuzz(frame):
        front.send(frame)
        try:
            message = P.decode(decoder, frame)
        except P.DecodeError as e:
            message = e
        answer(front, message, next(probes))

    try:
        fuzz()
    finally:
        front.close()
    assert all(p.poll() is None for p in fuzzed_cluster.procs)


def test_websocket_answers_every_frame(fuzzed_cluster, good_traffic):
    probes = itertools.count()
    with connect(fuzzed_cluster.url.replace("http://", "ws://") + "/ws", max_size=None) as ws:
        front = WsFront(ws)

        @fuzz_settings(EXAMPLES)
        @given(frame=ws_frames())
        def fuzz(frame):
            front.send(frame)
            answer(front, ws_read(frame), next(probes))

        fuzz()
    assert all(p.poll() is None for p in fuzzed_cluster.procs)


NUMBERS = [name for name, (_, edge) in PARAMS.items() if edge in (edge_ints, edge_floats)]


def test_every_number_at_the_edges(fuzzed_cluster, good_traffic):
    """Each numeric parameter at each edge of its type, on a sampled request that is otherwise
    sound: refused with a validation error, or run to its end; never a worker's failure."""
    front, probes = ZmqFront(fuzzed_cluster.endpoint), itertools.count()
    try:
        for name in NUMBERS:
            for value in EDGE_FLOATS if PARAMS[name][1] is edge_floats else EDGE_INTS:
                params = P.GenerateParams(**{"max_new_tokens": 4, "do_sample": True, "seed": 1, name: value})
                message = P.Generate(f"{name}={value}", PROMPT, params=params)
                front.send(P.encode(message))
                answer(front, message, next(probes))
    finally:
        front.close()
