"""The client library against a scripted fake gateway (no model, no torch in the client)."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest
import zmq
from websockets.exceptions import InvalidMessage

from polling import async_wait_for, wait_for
from splitserve.client import (AsyncClient, AsyncWebSocketClient, Client, GenerationError, GenerationTimeout,
                               OverloadedError, SplitserveError, UnauthorizedError, UnavailableError, ValidationError,
                               WebSocketClient)
from splitserve.client._core import Routes, decode_replies, new_generate
from splitserve.common import protocol as P

# ---- the wire ----------------------------------------------------------------------------

PARAMS = dict(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, typical_p=0.8,
              repetition_penalty=1.2, frequency_penalty=0.3, seed=11, stop=["\n\n"], stop_token_ids=[0, 3],
              strip_stop=True, ignore_eos=True, logprobs=True, top_n_tokens=2, prompt_logprobs=True, truncate=100,
              min_p=0.1, presence_penalty=0.2, logit_bias=[(5, -1.5), (9, 100.0)], penalize_prompt=False,
              penalty_last_n=32)
TOKEN = dict(index=3, token_id=42, text="def", logprob=-0.25, top_tokens=[(42, -0.25), (7, -1.5)])


def test_the_client_reads_what_the_gateway_sends_and_drops_the_rest():
    batch = P.TokenBatch("r1", [P.Token(**TOKEN), P.Token(4, 9, "")], "length", 12, 99, [None, -1.0])
    error = P.Error("r1", "validation", "bad")
    for msg in (batch, error):
        assert decode_replies([b"", P.encode(msg)]) == [msg]
    assert decode_replies([P.encode(batch), P.encode(error)]) == [batch, error]  # a step's replies in one message
    assert decode_replies([]) == []
    assert decode_replies([P.encode(P.Cancel("r1"))]) == []  # a client message, not a reply
    assert decode_replies([b"\xc1", P.encode(error)]) == [error]


def test_an_error_reads_the_same_in_clients_older_and_newer_than_its_gateway():
    class Older(msgspec.Struct, tag="Error", tag_field="kind", array_like=True):  # before `draining`
        id: str
        error_type: str
        message: str

    refusal = P.Error("r1", "unavailable", "shutting down", draining=True)
    assert msgspec.msgpack.decode(P.encode(refusal), type=Older) == Older("r1", "unavailable", "shutting down")
    assert decode_replies([msgspec.msgpack.encode(Older("r1", "validation", "bad"))]) == [P.Error("r1", "validation", "bad")]


def _add(routes: Routes, rid: str) -> int:
    """Route request `rid`, whose inbox is "inbox-<rid>" and Generate frame b"frame-<rid>"."""
    return routes.add(P.Generate(rid), f"inbox-{rid}", f"frame-{rid}".encode())


def _monitor(event: int) -> list[bytes]:
    return [struct.pack("=hi", event, 0), b"tcp://127.0.0.1:1"]


def test_a_request_sent_before_its_connection_is_made_waits_for_it():
    routes: Routes[str] = Routes(2)
    assert _add(routes, "a") == 0 and _add(routes, "b") == 1
    assert routes.hold("a", 0) and routes.hold("b", 1)  # the sends found no connection made
    # made: sent over it then; never made (a try failed): to another one made, or it ends
    assert routes.watched(0, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")[1:] == ([], [("a", b"frame-a", 0)])
    assert routes.watched(1, _monitor(zmq.EVENT_CONNECT_RETRIED), "tcp://127.0.0.1:2")[1:] == ([], [("b", b"frame-b", 0)])
    assert routes.pop("b") == 0  # its cancel follows it
    lone: Routes[str] = Routes(1)
    assert _add(lone, "x") == 0 and lone.hold("x", 0)
    assert lone.watched(0, _monitor(zmq.EVENT_CONNECT_RETRIED), "tcp://127.0.0.1:1")[1:] == (["inbox-x"], [])
    # (another still being made: it waits for that one; so does one whose send's outcome has not
    # come yet, which once it comes does not hold it for the connection it left)
    pair: Routes[str] = Routes(2)
    assert _add(pair, "y") == 0 and pair.hold("y", 0) and _add(pair, "z") == 1
    assert _add(pair, "w") == 0
    assert pair.watched(0, _monitor(zmq.EVENT_CONNECT_RETRIED), "tcp://127.0.0.1:1")[1:] == ([], [])
    assert not pair.hold("w", 0) and pair.hold("z", 1)
    again = pair.watched(1, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:2")[2]
    assert sorted(again) == [("w", b"frame-w", 1), ("y", b"frame-y", 1), ("z", b"frame-z", 1)]
    # a connection made that could not take it now: tried again shortly; a cancelled one is not held
    assert routes.held_up() == [] and routes.hold("a", 0) and routes.held_up() == [0]
    assert routes.take_held(0) == [("a", b"frame-a")] and routes.held_up() == []
    routes.pop("a")
    assert not routes.hold("a", 1)


def test_a_request_a_dropped_connection_carried_goes_again_once():
    """... to another open connection, or over its own once made again: as it was if it had no
    answer, else resumed after the tokens it has, with the seed the gateway reported and what is
    left of its timeout (the gateway streams the rest, as the one answer it would have given)."""
    routes: Routes[str] = Routes(2)
    for c in range(2):
        routes.watched(c, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")
    ran = P.Generate("ran", "def f():", params=P.GenerateParams(max_new_tokens=9, do_sample=True), timeout_s=30.0)
    assert routes.add(ran, "inbox-ran", P.encode(ran)) == 0
    assert [_add(routes, r) for r in ("new", "lone")] == [1, 0]
    # its replies, the second with a token sent twice (only each index's first counts)
    for batch in (P.TokenBatch("ran", [P.Token(0, 5, "a"), P.Token(1, 6, "b")], None, 3, 1234),
                  P.TokenBatch("ran", [P.Token(1, 6, "b"), P.Token(2, 7, "c")], None, 0, 1234)):
        assert routes.deliver(batch, 0) == ["inbox-ran"]
    down, ended, again = routes.watched(0, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:1")
    assert ended == [] and [(rid, c) for rid, _, c in again] == [("ran", 1), ("lone", 1)]
    assert again[1][1] == b"frame-lone"
    resumed = msgspec.msgpack.decode(again[0][1], type=P.Generate)
    assert resumed.resume == [5, 6, 7] and resumed.params.seed == 1234 and 29 < resumed.timeout_s <= 30
    assert msgspec.structs.replace(resumed, resume=[], timeout_s=30.0,
                                   params=msgspec.structs.replace(resumed.params, seed=None)) == ran
    # with no other connection open, held for its own; and only once ("ran" and "lone" went again already)
    down, ended, again = routes.watched(1, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:2")
    assert sorted(ended) == ["inbox-lone", "inbox-ran"] and again == []
    assert routes.watched(1, _monitor(zmq.EVENT_CONNECT_RETRIED), "tcp://127.0.0.1:2")[1] == []  # (scheduled)
    again = routes.watched(1, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:2")[2]
    assert again == [("new", b"frame-new", 1)]
    down, ended, again = routes.watched(1, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:2")
    assert ended == ["inbox-new"] and again == []


def test_a_request_its_dropped_connection_carried_waits_for_it_to_be_made_again(monkeypatch):
    """A lone connection drops (its frontend died, and may be starting again): a request it
    carried goes again over it once it is made again, however many tries fail meanwhile, for up to
    RECONNECT_WAIT_S; a new request sent while it is down ends at the first try that fails."""
    lone: Routes[str] = Routes(1)
    lone.watched(0, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")
    _add(lone, "a")
    assert lone.watched(0, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:1")[1:] == ([], [])
    assert _add(lone, "new") == 0 and lone.hold("new", 0)
    ended = [lone.watched(0, _monitor(zmq.EVENT_CONNECT_RETRIED), "tcp://127.0.0.1:1")[1] for _ in range(4)]
    assert ended == [[], ["inbox-new"], [], []]  # (the first: ZMQ telling when it will try again)
    assert lone.watched(0, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")[2] == [("a", b"frame-a", 0)]
    lone.pop("a")
    # past RECONNECT_WAIT_S it ends
    monkeypatch.setattr("splitserve.client._core.RECONNECT_WAIT_S", 0.0)
    _add(lone, "b")
    lone.watched(0, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:1")
    ended = [lone.watched(0, _monitor(zmq.EVENT_CONNECT_RETRIED), "tcp://127.0.0.1:1")[1] for _ in range(2)]
    assert ended == [[], ["inbox-b"]]


def test_a_request_a_frontend_refuses_as_it_shuts_down_goes_to_another():
    routes: Routes[str] = Routes(3)
    for c in range(3):
        routes.watched(c, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")
    assert [_add(routes, r) for r in "ab"] == [0, 1]
    # refused over connection 1: sent again over the open one with the fewest in flight
    assert routes.redirect(P.Error("b", "unavailable", "shutting down", draining=True), 1) == (b"frame-b", 2)
    assert _add(routes, "c") == 0  # 1 takes nothing new; 0 and 2 carry one each
    assert routes.pop("b") == 2  # its cancel follows it
    # a request that has had a reply runs: never sent again, its refusal is its answer
    assert routes.deliver(P.TokenBatch("a", [], None), 0) == ["inbox-a"]
    refused_a = P.Error("a", "unavailable", "shutting down", draining=True)
    assert routes.redirect(refused_a, 0) is None and routes.deliver(refused_a, 0) == ["inbox-a"]
    # with no other connection open, it waits for its own: the frontend leaves, and once the
    # connection is up anew (a load balancer's next frontend) it goes over it again
    routes.watched(2, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:1")
    assert _add(routes, "d") in (0, 1)  # every connection left or down: it goes somewhere
    routes.pop("d")
    refused_c = P.Error("c", "unavailable", "shutting down", draining=True)
    assert routes.redirect(refused_c, 0) is None and routes.deliver(refused_c, 0) == []
    down, ended, again = routes.watched(0, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:1")
    assert ended == [] and again == [] and down.error_type == "unavailable"
    assert routes.watched(0, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")[1:] == ([], [("c", b"frame-c", 0)])
    assert routes.pop("c") == 0  # its cancel follows it
    # ... unless nothing listens there any more: then it ends
    assert _add(routes, "g") == 0
    refused_g = P.Error("g", "unavailable", "shutting down", draining=True)
    assert routes.redirect(refused_g, 0) is None and routes.deliver(refused_g, 0) == []
    assert routes.watched(0, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:1")[1] == []
    # (ZMQ tells when it will connect again, then that the try failed)
    assert routes.watched(0, _monitor(zmq.EVENT_CONNECT_RETRIED), "tcp://127.0.0.1:1")[1] == []
    assert routes.watched(0, _monitor(zmq.EVENT_CONNECT_RETRIED), "tcp://127.0.0.1:1")[1] == ["inbox-g"]
    # a connection made anew (a new frontend) is open again
    routes.watched(1, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")
    assert _add(routes, "e") == 1
    # any other error is delivered as it is, and leaves its connection open
    assert routes.redirect(P.Error("e", "overloaded", "busy"), 1) is None and _add(routes, "f") == 1


def test_a_request_refused_as_draining_with_no_other_connection_open_takes_a_spare():
    """One endpoint (a load balancer): a new connection to it, the spare, takes the refused request
    and the new ones, while the old connection's streams finish; a spare refusing too has none of
    its own: the request waits for it to be made anew. (Given several endpoints, a client has
    no spare: each endpoint is a frontend of its own, whose new connection reaches it again.)"""
    routes: Routes[str] = Routes(1)
    routes.watched(0, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")
    assert [_add(routes, r) for r in "ab"] == [0, 0]
    assert routes.deliver(P.TokenBatch("a", [P.Token(0, 5, "x")], None), 0) == ["inbox-a"]  # a streams there
    refused = P.Error("b", "unavailable", "shutting down", draining=True)
    assert routes.redirect(refused, 0) == (b"frame-b", 1)
    assert routes.connections == 2  # the client opens connection 1 to its endpoint
    assert not routes.hold("a", 1) and routes.hold("b", 1)  # not made yet: b waits for it
    assert _add(routes, "c") == 1  # new requests too
    assert routes.watched(1, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")[2] == [("b", b"frame-b", 1)]
    assert _add(routes, "d") == 1
    # the spare reached the same frontend (no load balancer): refused there too, held for it
    assert routes.redirect(P.Error("d", "unavailable", "shutting down", draining=True), 1) is None
    assert routes.connections == 2
    assert routes.deliver(P.Error("d", "unavailable", "shutting down", draining=True), 1) == []
    down, ended, again = routes.watched(1, _monitor(zmq.EVENT_DISCONNECTED), "tcp://127.0.0.1:1")
    assert ended == [] and again == []  # b and c, unanswered, go again once: held for it, as d is
    again = routes.watched(1, _monitor(zmq.EVENT_HANDSHAKE_SUCCEEDED), "tcp://127.0.0.1:1")[2]
    assert sorted(again) == [("b", b"frame-b", 1), ("c", b"frame-c", 1), ("d", b"frame-d", 1)]


def test_websocket_messages_carry_the_zmq_ones_by_name():
    msg = P.Generate("r1", "def f():", [1, 2], P.GenerateParams(**PARAMS), 2.5, "key")
    ws = msgspec.json.decode(msgspec.json.encode(P.WsGenerate.of(msg)))
    assert ws["type"] == "generate" and ws["parameters"]["top_n_tokens"] == 2
    assert msgspec.json.decode(msgspec.json.encode(ws), type=P.WsGenerate).generate() == msg
    # a field at its default is not sent: a gateway older than its client takes the request
    assert "resume" not in ws and "timeout_s" not in msgspec.json.decode(msgspec.json.encode(P.WsGenerate("r2")))
    newer = {"min_p": 0.2, "presence_penalty": 0.5, "logit_bias": {5: 2.0}, "penalize_prompt": False,
             "penalty_last_n": 64}
    for options in ({}, newer):
        ws = msgspec.json.decode(msgspec.json.encode(P.WsGenerate.of(new_generate("x", temperature=0.5, **options))))
        assert newer.keys() & ws["parameters"].keys() == options.keys()
    assert ws["parameters"]["logit_bias"] == [[5, 2.0]]
    resumed = msgspec.structs.replace(msg, resume=[4, 5])
    assert msgspec.json.decode(msgspec.json.encode(P.WsGenerate.of(resumed)), type=P.WsGenerate).generate() == resumed
    batch = P.TokenBatch("r1", [P.Token(**TOKEN)], "stop_sequence", 3, None, None)
    assert P.from_ws_reply(msgspec.json.decode(msgspec.json.encode(P.ws_reply(batch)), type=P.WsReply)) == batch


@pytest.fixture
def held_listener(monkeypatch):
    """A WebSocket server that holds unanswered the handshakes numbered in its `held` set, as the
    listening socket of a frozen frontend does (the kernel took the connection; nobody reads it)
    -> (its URL, how many handshakes it has read, the held set). The clients' tries get 0.3 s
    each here, not 3 s."""
    from websockets.sync.server import serve

    import splitserve.client.websocket as ws_client

    monkeypatch.setattr(ws_client, "TRY_TIMEOUT_S", 0.3)
    seen, held, release = [0], set(), threading.Event()

    def process_request(connection, request):
        seen[0] += 1
        if seen[0] in held:
            release.wait(10)

    with serve(lambda ws: ws.recv(), "127.0.0.1", 0, process_request=process_request) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}/ws", seen, held
        release.set()
        server.shutdown()


def test_a_websocket_handshake_held_unanswered_is_tried_again_on_a_new_connection(held_listener):
    """A try to connect that gets no answer within TRY_TIMEOUT_S is made again, from a new
    connection (which the kernel may give to another frontend's listening socket on a shared
    port), within open_timeout; once that has passed, the client says it cannot connect."""
    url, seen, held = held_listener

    async def connect_async() -> None:
        client = await AsyncWebSocketClient.connect(url)
        await client.close()

    held.update((1, 3))
    WebSocketClient(url).close()
    assert seen[0] == 2  # the first try held, the second answered
    asyncio.run(connect_async())
    assert seen[0] == 4
    held.update(range(5, 50))
    t0 = time.monotonic()
    with pytest.raises(UnavailableError, match="cannot connect"):
        WebSocketClient(url, open_timeout=1.0)
    assert time.monotonic() - t0 >= 1.0 and seen[0] - 4 >= 3  # tries of 0.3 s until open_timeout


def test_the_sync_websocket_client_makes_a_connection_again_without_holding_up_its_callers(held_listener):
    """A request whose connection was lost goes again over a new one, tried for up to
    RECONNECT_WAIT_S while no frontend answers. A thread of its own makes it: a new request's
    caller and close() do not wait for it (before: it was made under the client's lock, and
    close(), a new request and the other connections' streams waited up to 10 s)."""
    url, seen, held = held_listener  # its handler reads one request, then closes the connection
    held.update(range(2, 100))
    client = WebSocketClient(url)
    outcome: list = []

    def generate() -> None:
        try:
            client.generate("def f():", max_new_tokens=1, timeout=60)
        except Exception as e:  # noqa: BLE001 (what it raised is the test's)
            outcome.append(e)

    caller = threading.Thread(target=generate)
    caller.start()
    wait_for(lambda: seen[0] >= 3, 10, "the client to try connecting again")  # a try held, and the next
    t0 = time.monotonic()
    second = client.stream("def g():", max_new_tokens=1)  # waits for the same new connection
    client.close()
    assert time.monotonic() - t0 < 1.0
    caller.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], UnavailableError)
    with pytest.raises(UnavailableError):
        list(second)


@pytest.mark.parametrize("module", ["splitserve.client", "splitserve.common.protocol", "splitserve.gateway.server",
                                    "splitserve.gateway.frontend", "splitserve.gateway.router"])
def test_light_modules_import_no_torch(module):
    """The client, the wire protocol and the gateway (which only tokenizes and routes) start
    without PyTorch: a client machine need not have it, and the gateway starts in a fraction of
    the time."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- a scripted gateway -------------------------------------------------------------------

MANY = 8


class FakeGateway:
    """A ROUTER on a random local port, in a thread, answering each Generate by its prompt:
    "hello": junk frames, then 3 tokens over 2 batches with one token sent twice;
    "many:<i>": held until MANY arrive, then answered in reverse order, batches interleaved;
    "hang": one token, then nothing; "error:<type>": that Error."""

    def __init__(self):
        self.received: list = []
        self._changed = threading.Condition()
        self._held: list[tuple[bytes, P.Generate]] = []
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self.endpoint = f"tcp://127.0.0.1:{self._sock.bind_to_random_port('tcp://127.0.0.1')}"
        self._decoder = P.decoder(P.ClientMessage)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self):
        self._stop.set()
        self._thread.join()
        self._sock.close(linger=0)
        self._ctx.term()

    def wait_for(self, predicate, timeout=5.0):
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.received), timeout), self.received

    def cancelled(self, request_id):
        return any(isinstance(m, P.Cancel) and m.id == request_id for m in self.received)

    def generates(self, prompt):
        return [m for m in self.received if isinstance(m, P.Generate) and m.prompt == prompt]

    def _serve(self):
        while not self._stop.is_set():
            if self._sock.poll(20):
                ident, frame = self._sock.recv_multipart()
                msg = P.decode(self._decoder, frame)
                with self._changed:
                    self.received.append(msg)
                    self._changed.notify_all()
                if isinstance(msg, P.Generate):
                    self._answer(ident, msg)

    def _send(self, ident, *msgs):
        for msg in msgs:
            self._sock.send_multipart([ident, msg if isinstance(msg, bytes) else P.encode(msg)])

    def _answer(self, ident, gen):
        rid, prompt = gen.id, gen.prompt
        if prompt == "hello":
            self._send(ident, b"\xc1 not msgpack", P.encode(P.Cancel(rid)),
                       P.TokenBatch(rid, [P.Token(0, 1, "Hel", -0.1), P.Token(1, 2, "lo", -0.2)], seed=7),
                       P.TokenBatch(rid, [P.Token(1, 2, "lo", -0.2), P.Token(2, 3, "!", -0.5, [(3, -0.5), (4, -2.0)])],
                                    "length", prompt_tokens=2))
        elif prompt.startswith("many:"):
            self._held.append((ident, gen))
            if len(self._held) == MANY:
                self._answer_held()
        elif prompt == "hang":
            self._send(ident, P.TokenBatch(rid, [P.Token(0, 1, "x")]))
        elif prompt.startswith("error:"):
            self._send(ident, P.Error(rid, prompt.removeprefix("error:"), "boom"))

    def _answer_held(self):
        held = self._held[::-1]
        for ident, gen in held:
            self._send(ident, P.TokenBatch(gen.id, [P.Token(0, 10, gen.prompt)]))
        for ident, gen in held:
            n = int(gen.prompt.removeprefix("many:"))
            self._send(ident, P.TokenBatch(gen.id, [P.Token(1, n, "!")], "eos_token"))
        self._held.clear()


@pytest.fixture
def gateway():
    gw = FakeGateway()
    yield gw
    gw.close()


@pytest.fixture
def client(gateway):
    with Client(gateway.endpoint, api_key="secret") as c:
        yield c


ERRORS = {"validation": ValidationError, "overloaded": OverloadedError, "timeout": GenerationTimeout,
          "unauthorized": UnauthorizedError, "generation": GenerationError, "unavailable": UnavailableError,
          "something-new": SplitserveError}


# ---- sync client --------------------------------------------------------------------------


def test_generate_returns_text_ids_and_finish_reason(client, gateway):
    resp = client.generate("hello")
    assert (resp.text, resp.token_ids, resp.finish_reason, resp.details) == ("Hello!", [1, 2, 3], "length", None)
    (sent,) = gateway.generates("hello")
    assert sent.api_key == "secret" and sent.params.do_sample is False and sent.params.logprobs is False


def test_generate_details(client):
    details = client.generate("hello", details=True).details
    assert (details.seed, details.prompt_tokens) == (7, 2)
    assert [t.logprob for t in details.tokens] == [-0.1, -0.2, -0.5]
    assert details.tokens[2].top_tokens == [(3, -0.5), (4, -2.0)]


@pytest.mark.parametrize("options, sampled", [
    ({}, False), ({"temperature": 0.5}, True), ({"seed": 3}, True), ({"top_k": 5}, True), ({"temperature": 0}, False),
])
def test_sampling_only_when_a_sampling_option_is_given(client, gateway, options, sampled):
    client.generate("hello", **options)
    (sent,) = gateway.generates("hello")
    assert sent.params.do_sample is sampled
    assert sent.params.temperature == (options.get("temperature", 1.0) if sampled else 1.0)


def test_options_reach_the_gateway(client, gateway):
    client.generate("hello", max_new_tokens=5, stop="\n", stop_token_ids=[0], top_n_tokens=2, strip_stop=True,
                    ignore_eos=True, timeout=30, repetition_penalty=1.1)
    (sent,) = gateway.generates("hello")
    p = sent.params
    assert (p.max_new_tokens, p.stop, p.stop_token_ids, p.top_n_tokens, p.strip_stop, p.ignore_eos) == \
        (5, ["\n"], [0], 2, True, True)
    assert (p.repetition_penalty, sent.timeout_s) == (1.1, 30)


def test_stream_yields_events_in_order_without_duplicates(client):
    events = list(client.stream("hello"))
    assert [(e.index, e.token_id, e.text) for e in events] == [(0, 1, "Hel"), (1, 2, "lo"), (2, 3, "!")]
    assert [e.finish_reason for e in events] == [None, None, "length"]


def test_concurrent_requests_from_threads_share_one_client(client):
    with ThreadPoolExecutor(MANY) as pool:
        responses = list(pool.map(lambda i: client.generate(f"many:{i}", timeout=10), range(MANY)))
    assert [(r.text, r.token_ids) for r in responses] == [(f"many:{i}!", [10, i]) for i in range(MANY)]


def test_breaking_out_of_a_stream_cancels_it(client, gateway):
    for ev in client.stream("hang"):
        assert ev.text == "x"
        break
    (sent,) = gateway.generates("hang")
    gateway.wait_for(lambda _: gateway.cancelled(sent.id))


def test_closing_a_stream_cancels_it(client, gateway):
    stream = client.stream("hang")
    assert next(stream).text == "x"
    stream.close()
    gateway.wait_for(lambda _: gateway.cancelled(stream.id))
    assert list(stream) == []


def test_a_finished_request_is_not_cancelled(client, gateway):
    stream = client.stream("hello")
    list(stream)
    stream.close()
    time.sleep(0.1)  # a Cancel would have reached the gateway by now
    assert not gateway.cancelled(stream.id)


@pytest.mark.parametrize("error_type", ERRORS)
def test_errors_map_to_exceptions(client, error_type):
    with pytest.raises(ERRORS[error_type], match="boom") as caught:
        client.generate(f"error:{error_type}")
    assert caught.value.request_id is not None
    with pytest.raises(ERRORS[error_type]):
        list(client.stream(f"error:{error_type}"))


def test_timeout_raises_and_cancels(client, gateway):
    start = time.monotonic()
    with pytest.raises(GenerationTimeout):
        client.generate("hang", timeout=0.3)
    assert 0.25 < time.monotonic() - start < 3
    (sent,) = gateway.generates("hang")
    assert sent.timeout_s == 0.3
    gateway.wait_for(lambda _: gateway.cancelled(sent.id))


def test_closing_the_client_fails_running_requests(gateway):
    c = Client(gateway.endpoint)
    stream = c.stream("hang")
    next(stream)
    c.close()
    with pytest.raises(UnavailableError):
        next(stream)
    with pytest.raises(UnavailableError):
        c.generate("hello")


# ---- async client -------------------------------------------------------------------------


async def test_async_generate(gateway):
    async with AsyncClient(gateway.endpoint) as c:
        resp = await c.generate("hello", details=True)
        many = await asyncio.gather(*(c.generate(f"many:{i}", timeout=10) for i in range(MANY)))
    assert (resp.text, resp.token_ids, resp.finish_reason, resp.details.seed) == ("Hello!", [1, 2, 3], "length", 7)
    assert [r.text for r in many] == [f"many:{i}!" for i in range(MANY)]


async def test_async_stream(gateway):
    async with AsyncClient(gateway.endpoint) as c:
        events = [ev async for ev in c.stream("hello")]
        stream = c.stream("hang")
        async for _ in stream:
            break
        await stream.aclose()
        await async_wait_for(lambda: gateway.cancelled(stream.id), 5, "the cancel")
        async for _ in c.stream("hang"):
            break  # and the stream is dropped
        await async_wait_for(lambda: gateway.cancelled(gateway.generates("hang")[-1].id), 5, "the cancel")
    assert [(e.index, e.text, e.finish_reason) for e in events] == [(0, "Hel", None), (1, "lo", None), (2, "!", "length")]


async def test_async_errors_and_timeout(gateway):
    async with AsyncClient(gateway.endpoint) as c:
        with pytest.raises(OverloadedError, match="boom"):
            await c.generate("error:overloaded")
        with pytest.raises(GenerationTimeout):
            await c.generate("hang", timeout=0.3)
        (sent,) = gateway.generates("hang")
        await async_wait_for(lambda: gateway.cancelled(sent.id), 5, "the cancel")


# ---- several endpoints (a gateway's frontends) ------------------------------------------------


@pytest.fixture
def two_gateways():
    gateways = [FakeGateway(), FakeGateway()]
    yield gateways
    for g in gateways:
        g.close()


def test_requests_spread_over_endpoints_and_cancels_follow_them(two_gateways):
    a, b = two_gateways
    with Client([a.endpoint, b.endpoint]) as c:
        hanging = [c.stream("hang") for _ in range(4)]
        for s in hanging:
            next(s)
        assert len(a.generates("hang")) == len(b.generates("hang")) == 2  # fewest in flight first
        for s in hanging:
            s.close()
        for g in (a, b):
            g.wait_for(lambda _, g=g: all(g.cancelled(m.id) for m in g.generates("hang")))
        assert c.generate("hello").text == "Hello!"


async def test_async_requests_spread_over_endpoints(two_gateways):
    a, b = two_gateways
    async with AsyncClient([a.endpoint, b.endpoint]) as c:
        # each gateway holds its "many:" requests until MANY arrive: only an even spread answers
        many = await asyncio.gather(*(c.generate(f"many:{i}", timeout=10) for i in range(2 * MANY)))
        stream = c.stream("hang")
        await stream.__anext__()
        await stream.aclose()
        owner = a if a.generates("hang") else b
        await async_wait_for(lambda: owner.cancelled(stream.id), 5, "the cancel")
    assert [r.text for r in many] == [f"many:{i}!" for i in range(2 * MANY)]


def test_the_websocket_fast_path_writes_what_the_protocol_does():
    """The gateway's WebSocket replies skip P.ws_reply's per-token dicts: every field, set, must still come out."""
    from splitserve.gateway.websocket import encode, ws_reply

    batch = P.TokenBatch("a", [P.Token(3, 7, "x", -0.5, [(7, -0.5), (9, -1.0)]), P.Token(4, 8, "y")], "length",
                         prompt_tokens=5, seed=11, prompt_logprobs=[None, -1.5], cached_tokens=2)
    for binary in (True, False):
        assert encode(ws_reply(batch), binary) == encode(P.ws_reply(batch), binary)
    assert {f.name for f in msgspec.structs.fields(P.TokenBatch)} == {"id", "tokens", "finish_reason", "prompt_tokens",
                                                                      "seed", "prompt_logprobs", "cached_tokens"}, \
        "a new TokenBatch field: gateway/websocket.py's ws_reply must carry it"


class ScriptedWebSocket:
    """A /ws server whose n-th connection plays the n-th script: given each request, "close 1012"
    or "close 1011" (close without an answer), "drain" (refuse it as `draining`, then close
    normally, 1000), or "answer" (one token and the end)."""

    def __init__(self, scripts: list[str]):
        from websockets.sync.server import serve

        self.scripts, self.connections = list(scripts), 0
        self.server = serve(self._handle, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}/ws"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handle(self, ws) -> None:
        script = self.scripts[self.connections]
        self.connections += 1
        request = msgspec.json.decode(ws.recv())  # the JSON encoding, so that the test reads it
        if script == "answer":
            batch = P.TokenBatch(request["id"], [P.Token(0, 5, "ok")], "length", 3)
            ws.send(msgspec.json.encode(P.ws_reply(batch)).decode())
        elif script == "drain":
            refusal = P.Error(request["id"], "unavailable", "shutting down", draining=True)
            ws.send(msgspec.json.encode(P.ws_reply(refusal)).decode())
            ws.close(1000)
        else:
            ws.close(int(script.split()[1]))

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("scripts, sent", [(["close 1012", "answer"], 2), (["drain", "answer"], 2),
                                           (["close 1011", "answer"], 2), (["close 1011", "close 1011"], 2),
                                           (["close 1012", "close 1012", "answer"], 3)])
async def test_a_websocket_request_that_never_started_goes_over_a_new_connection(scripts, sent):
    """A request left unanswered by a close with 1012 (its frontend shut down with nothing of the
    connection running), or refused as `draining`, is sent again over a new connection, as often
    as that happens, by both WebSocket clients; one left unanswered by any other close, once (the
    next such close ends it with UnavailableError)."""
    from splitserve.client import AsyncWebSocketClient, WebSocketClient

    def sync_run():
        with WebSocketClient(server.url, encoding="json") as client:
            return client.generate("def f():", max_new_tokens=1, timeout=10)

    async def async_run():
        async with AsyncWebSocketClient(server.url, encoding="json") as client:
            return await client.generate("def f():", max_new_tokens=1, timeout=10)

    for run in (sync_run, async_run):
        server = ScriptedWebSocket(scripts)
        try:
            if scripts[-1] == "answer":
                got = await run() if run is async_run else await asyncio.to_thread(run)
                assert (got.text, got.token_ids, got.finish_reason) == ("ok", [5], "length")
            else:
                with pytest.raises(UnavailableError, match="closed"):
                    await run() if run is async_run else await asyncio.to_thread(run)
            assert server.connections == sent
        finally:
            server.close()



def test_a_websocket_connection_cut_as_it_is_made_is_made_again(monkeypatch):
    """Refused, reset, cut before an HTTP answer: made again after a short wait; the sync client
    says ConnectionClosed for a connection reset before its request went (found in a storm of
    killed frontends: it gave up at once). Timed out: made again at once. Anything else, or past
    open_timeout: an error. One that carries requests resumed after their connection was lost is
    made again, refused or not, for up to RECONNECT_WAIT_S (a frontend starting again)."""
    from websockets.exceptions import ConnectionClosedError, InvalidURI

    from splitserve.client.websocket import CONNECT_RETRIES_S, TRY_TIMEOUT_S, _Tries

    tries = _Tries("ws://x", 10.0)
    cut = [ConnectionRefusedError(), ConnectionClosedError(None, None), InvalidMessage("no HTTP answer")]
    assert [tries.wait_after(e) for e in cut[:2]] == list(CONNECT_RETRIES_S)
    assert tries.wait_after(TimeoutError()) == 0.0
    with pytest.raises(UnavailableError, match="cannot connect to ws://x"):
        tries.wait_after(cut[2])  # the retries after cuts are spent
    with pytest.raises(UnavailableError):
        _Tries("ws://x", 10.0).wait_after(InvalidURI("ws://x", "bad"))
    with pytest.raises(UnavailableError):
        _Tries("ws://x", 0.0).wait_after(TimeoutError())
    # a connection for requests resumed after theirs was lost: tried for up to RECONNECT_WAIT_S
    patient = _Tries("ws://x", 1.0, patient=True)
    assert [patient.wait_after(cut[0]) for _ in range(6)] == [*CONNECT_RETRIES_S, *[CONNECT_RETRIES_S[-1]] * 4]
    assert patient.timeout() == TRY_TIMEOUT_S
    monkeypatch.setattr("splitserve.client.websocket.RECONNECT_WAIT_S", 0.0)
    spent = _Tries("ws://x", 1.0, patient=True)
    assert [spent.wait_after(cut[0]) for _ in range(2)] == list(CONNECT_RETRIES_S)
    with pytest.raises(UnavailableError):
        spent.wait_after(cut[0])
