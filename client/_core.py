"""What the sync and async clients share: the request message, the routing of replies to
requests, and the turning of one request's replies into events and a response."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from uuid import uuid4

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from splitserve.common import protocol as P
from splitserve.common.protocol import Error, Generate, GenerateParams, TokenBatch

from .errors import GenerationTimeout, error_from

MAX_MESSAGE_BYTES = 64 * 2**20
# Heartbeats (ZMTP's; WebSocket pings): a gateway that vanished without closing the connection
# (its host gone, its process frozen) is found within the timeout, as a closed connection is at once
HEARTBEAT_IVL_S, HEARTBEAT_TIMEOUT_S = 1.0, 3.0
# What a connection's monitor reports: up (its handshake done), or down (lost, or a connect that
# failed): its requests then end with an error, as the gateway's side let them go too
_UP, _DOWN = zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
# A request that a connection made could not take now (its pipe not ready yet, its queue full) is
# tried again after this long
HELD_RETRY_MS = 10
# A request that went again after its connection dropped (resumed after the tokens it has) waits
# this long for a connection to be made again, when none is open: its frontend may be starting
# again (serve starts one within seconds; a supervisor, or Kubernetes, one at the same address).
# A new request fails at once instead: its caller can send it again as well as this client can.
RECONNECT_WAIT_S = 10.0


@dataclass(frozen=True)
class StreamEvent:
    """One generated token. The last event of a request carries its finish reason; when the request
    ends with no token left to carry it (e.g. cancelled), that event has `token_id` None and no text."""

    token_id: int | None
    text: str
    logprob: float | None
    index: int
    finish_reason: str | None = None
    top_tokens: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class Details:
    tokens: list[StreamEvent]  # per token: logprob, and top_tokens when top_n_tokens was asked for
    seed: int | None  # the seed the gateway sampled with (it picks one when a sampled request has none)
    prompt_tokens: int
    prompt_logprobs: list[float | None] | None


@dataclass(frozen=True)
class Response:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    details: Details | None = None  # only when details, top_n_tokens or prompt_logprobs were asked for


def _given(value, default):
    return default if value is None else value


def new_generate(prompt: str | None = None, *, max_new_tokens: int = 20, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, typical_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 penalize_prompt: bool | None = None, penalty_last_n: int | None = None,
                 logit_bias: Mapping[int, float] | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, details: bool = False, top_n_tokens: int = 0,
                 ignore_eos: bool = False, strip_stop: bool = False, timeout: float | None = None,
                 prompt_ids: Sequence[int] | None = None, prompt_logprobs: bool = False,
                 truncate: int | None = None) -> Generate:
    """The Generate message of one request, under a fresh id. These are the options of
    `generate` and `stream` on both clients.

    Sampling happens when any of temperature, top_k, top_p, typical_p, min_p or seed is given, as
    in the CLI, and greedy decoding otherwise; temperature 0 is greedy. `min_p` keeps the tokens at
    least that share of the likeliest one's probability; `frequency_penalty` and `presence_penalty`
    lower each token by its count, or once, in the prompt and the answer so far (in the answer only
    with `penalize_prompt=False`, as OpenAI's; in the last `penalty_last_n` tokens only, as
    llama.cpp's repeat_last_n); `logit_bias` maps token ids to what is added to their logits (in
    [-100, 100], or -inf: never that token). `details` asks for each token's logprob.
    `timeout` (seconds) bounds the wait on the client and is the gateway's deadline too. Give
    `prompt_ids` instead of `prompt` to skip tokenization.
    """
    sampled = temperature != 0 and any(v is not None for v in (temperature, top_k, top_p, typical_p, min_p, seed))
    # the newer options only where given: a field at its default is not sent over WebSocket, so a
    # gateway older than this client takes the request
    newer = {name: value for name, value in (("min_p", min_p), ("presence_penalty", presence_penalty),
                                             ("penalize_prompt", penalize_prompt), ("penalty_last_n", penalty_last_n),
                                             ("logit_bias", None if logit_bias is None else list(logit_bias.items())))
             if value is not None}
    params = GenerateParams(
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        # a greedy request sends the default temperature, which any validator accepts
        temperature=_given(temperature, 1.0) if sampled else 1.0,
        top_k=_given(top_k, 0),
        top_p=_given(top_p, 1.0),
        typical_p=_given(typical_p, 1.0),
        repetition_penalty=_given(repetition_penalty, 1.0),
        frequency_penalty=_given(frequency_penalty, 0.0),
        seed=seed,
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        stop_token_ids=list(stop_token_ids or ()),
        strip_stop=strip_stop,
        ignore_eos=ignore_eos,
        logprobs=details,
        top_n_tokens=top_n_tokens,
        prompt_logprobs=prompt_logprobs,
        truncate=truncate,
        **newer,
    )
    return Generate(uuid4().hex, prompt, None if prompt_ids is None else list(prompt_ids), params, timeout,
                    batched_replies=True)


def dealer(ctx: zmq.Context, endpoint: str, max_message_bytes: int) -> tuple[zmq.Socket, zmq.Socket]:
    """A connection to `endpoint`, and its monitor (see Routes.watched), watching before it connects."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    # Messages go only to a connection that is made: sent while there is none, a request would wait
    # in ZMQ's queue after the client gave up on it, and reach whichever frontend came up next. The
    # client holds it instead (Routes.hold), until the connection is made or cannot be.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_S * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_S * 1000))
    watch = sock.get_monitor_socket(_UP | _DOWN)
    sock.connect(endpoint)
    return sock, watch


_replies = P.decoder(P.GatewayToClient)


def decode_replies(frames: list) -> list[TokenBatch | Error]:
    """The replies in a message: one, or several in a Replies (the gateway sends the replies to this
    client's requests that are ready together as one, since the client asks with `batched_replies`).
    Empty frames (a delimiter some gateways put first) and malformed ones are dropped, never fatal."""
    out = []
    for frame in frames:
        if len(frame):
            try:
                msg = P.decode(_replies, frame)
            except P.DecodeError:
                continue
            if isinstance(msg, P.Replies):
                out += msg.replies
            else:
                out.append(msg)
    return out


Inbox = TypeVar("Inbox")


@dataclass(slots=True)
class _Flight(Generic[Inbox]):
    """A request in flight."""

    inbox: Inbox
    connection: int
    msg: Generate
    since: float  # time.monotonic() when it was sent: its timeout counts from there
    # its replies so far: should its connection drop, it goes on elsewhere after their tokens
    replies: list[TokenBatch] = field(default_factory=list)
    # sent again after a connection dropped with it: never twice, so that a request that kills
    # frontends cannot take them all
    resent: bool = False

    def resumed(self) -> Generate:
        """The request as it goes on over another connection: the tokens it has as `resume`, the
        seed the gateway reported (a sampled request then draws what it would have), what is
        left of its timeout."""
        got = {t.index: t.token_id for r in self.replies for t in r.tokens}
        resume: list[int] = []
        while len(resume) in got:
            resume.append(got[len(resume)])
        seed = next((r.seed for r in self.replies if r.seed is not None), self.msg.params.seed)
        left = None
        if self.msg.timeout_s:  # 0: none
            left = max(self.msg.timeout_s - (time.monotonic() - self.since), 1e-3)
        return msgspec.structs.replace(self.msg, params=msgspec.structs.replace(self.msg.params, seed=seed),
                                       timeout_s=left, resume=resume)


def endpoints(endpoint: str | Sequence[str]) -> list[str]:
    """One endpoint, or several: a gateway's frontends, each with a client port of its own."""
    found = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    if not found:
        raise ValueError("give at least one endpoint")
    return found


class Routes(Generic[Inbox]):
    """The requests in flight: each one's inbox, the connection it went over, and until its first
    reply its Generate message as sent (a frame). With several connections (a gateway's
    frontends) a new request takes the one up (or still being made) with the fewest in flight,
    avoiding a frontend that is shutting down (any one, when none is up), and its cancel follows
    it there.

    A request that never ran goes again, to another connection made, or over its own once that is
    made (anew: through a load balancer, another frontend), and ends only when none can be: one
    sent while its connection was not made (hold), one a frontend shutting down refused
    (redirect, deliver; given one endpoint, over a second connection to it, the spare). A
    request whose connection dropped goes again once (watched; the frontend exited, or died): as
    it was if it had no answer yet (the frontend took it or not: the client gets one answer
    either way), else resumed after the tokens it has, so that its stream goes on where it
    stopped, as the one it would have been."""

    def __init__(self, connections: int = 1, encode: Callable[[Generate], bytes | str] = P.encode):
        self._encode = encode  # a Generate as the connections carry it
        self._requests: dict[str, _Flight[Inbox]] = {}
        # request id -> its Generate message (a ZMQ frame, a WebSocket one), until its first reply
        self._unanswered: dict[str, bytes | str] = {}
        self._load = [0] * connections
        self.up = [False] * connections  # as each connection's monitor said last (up: its handshake done)
        # its frontend refused a request as it shuts down: none goes there until it connects again
        self.leaving = [False] * connections
        # request id -> connection: sent while that was not made, or refused as `draining` with no
        # other connection open, it waits to go over it once that is made (again: through a load
        # balancer, to another frontend), and fails if that cannot be
        self._held: dict[str, int] = {}
        # its connection dropped: the CONNECT_RETRIED that follows a DISCONNECTED is ZMQ saying when
        # it will connect again, not that a try failed
        self._dropped = [False] * connections
        self._heard = [False] * connections  # whether its monitor has said anything yet
        self._down_since = [time.monotonic()] * connections  # when it was last lost
        # Given one endpoint (a load balancer), a second connection to it, the spare, opened when
        # the frontend on the first refused a request as it shuts down and no other connection
        # was open: reaching another frontend, it takes that request and the new ones at once,
        # rather than after the old frontend's last stream.
        self._one_endpoint = connections == 1

    def add(self, msg: Generate, inbox: Inbox, frame: bytes | str) -> int:
        """Route a new request; -> the connection to send it over. `frame`: `msg` encoded, kept
        until the request's first reply, should it have to go over another connection."""
        # connections still being made count as open: a request sent there waits for it (hold)
        up = [c for c, is_up in enumerate(self.up) if is_up]
        connection = min(self._open(-1) + self._unheard() or up or range(len(self._load)), key=self._load.__getitem__)
        self._load[connection] += 1
        self._requests[msg.id] = _Flight(inbox, connection, msg, time.monotonic())
        self._unanswered[msg.id] = frame
        return connection

    def _open(self, besides: int) -> list[int]:
        """The connections up whose frontend is not shutting down, but `besides`."""
        return [c for c, is_up in enumerate(self.up) if is_up and not self.leaving[c] and c != besides]

    def redirect(self, msg: TokenBatch | Error, connection: int | None) -> tuple[bytes | str, int] | None:
        """Where a request goes that a frontend shutting down refused (`msg`, over `connection`):
        -> (its Generate, the connection to send it over again), when another one is open; None
        otherwise, or for any other message: then `deliver` it."""
        if not (isinstance(msg, Error) and msg.draining and connection is not None):
            return None
        self.leaving[connection] = True
        frame = self._unanswered.get(msg.id)
        if msg.id not in self._requests or frame is None:
            return None
        again = self._move(msg.id, connection)
        if again is None and self._one_endpoint and connection == 0:
            again = self._move(msg.id, 0, [self._spare_connection()])
        return None if again is None else (frame, again)

    def _spare_connection(self) -> int:
        """The spare (connection 1), added now if it is not there yet."""
        if len(self._load) == 1:
            for row, value in ((self._load, 0), (self.up, False), (self.leaving, False), (self._dropped, False),
                               (self._heard, False), (self._down_since, time.monotonic())):
                row.append(value)
        return 1

    @property
    def connections(self) -> int:
        """How many connections there are, the spare included: the client opens one it has not yet
        (to its one endpoint)."""
        return len(self._load)

    def watched(self, connection: int, event: list[bytes], endpoint: str) \
            -> tuple[Error, list[Inbox], list[tuple[str, bytes | str, int]]]:
        """A message of `connection`'s monitor; -> (the error that its requests end with when it went
        down, their inboxes, the requests to send again now: (id, Generate, connection)).

        Up: what was held for it goes. Dropped: each of its requests goes again (once; see the
        class) to another open connection, or is held for this one; those sent again before end.
        A try to connect that fails sends its requests to another connection, or ends them, but
        those sent again after a drop, which wait for this one for up to RECONNECT_WAIT_S."""
        kind = parse_monitor_message(event)["event"]
        self.up[connection] = not kind & _DOWN
        self._heard[connection] = True
        down = Error("", "unavailable", f"the connection to {endpoint} was lost, or could not be made: its "
                                        "requests ended")
        if self.up[connection]:
            self.leaving[connection] = False  # connected anew: a new frontend
            return down, [], [(rid, frame, connection) for rid, frame in self.take_held(connection)]
        again = []
        if kind & zmq.EVENT_CONNECT_RETRIED and not self._dropped[connection]:
            # A try failed, nothing listens there now, and nothing went over it since it was last
            # made (a send finds no connection: ZMQ_IMMEDIATE): each of its requests, held or not
            # yet (its send's outcome may still be on its way), goes to another connection made, or
            # waits for one still being made, or ends.
            patient = time.monotonic() - self._down_since[connection] < RECONNECT_WAIT_S
            for rid in [r for r, f in self._requests.items() if f.connection == connection and r in self._unanswered]:
                self._held.pop(rid, None)
                if (target := self._move(rid, connection)) is not None:
                    again.append((rid, self._unanswered[rid], target))
                elif (target := self._move(rid, connection, self._unheard())) is not None:
                    self._held[rid] = target
                elif patient and self._requests[rid].resent:
                    self._held[rid] = connection
        elif kind & zmq.EVENT_DISCONNECTED:
            self._down_since[connection] = time.monotonic()
            again = self._elsewhere(connection)
        self._dropped[connection] = bool(kind & zmq.EVENT_DISCONNECTED)
        return down, self.deliver(down, connection, keep=self._held), again

    def _elsewhere(self, connection: int) -> list[tuple[str, bytes | str, int]]:
        """The requests `connection` dropped that were not sent again before, each as it goes again
        (see lost_once): -> those that go to another open connection (id, Generate, connection);
        the rest are held for this one."""
        ours = [rid for rid, f in self._requests.items() if f.connection == connection and rid not in self._held]
        moved = []
        for rid, frame in self._again_once(ours).items():
            target = self._move(rid, connection)
            if target is None:
                self._held[rid] = connection
            else:
                moved.append((rid, frame, target))
        return moved

    def _again_once(self, rids: Collection[str]) -> dict[str, bytes | str]:
        """Request id -> its Generate as it goes again, for those of `rids` not sent again before
        (they are marked so now, and have no answer over the new connection yet)."""
        again = {}
        for rid in rids:
            flight = self._requests[rid]
            if flight.resent:
                continue
            flight.resent = True
            again[rid] = self._unanswered[rid] = self._unanswered.get(rid) or self._encode(flight.resumed())
        return again

    def _unheard(self) -> list[int]:
        """The connections whose monitor has said nothing yet: being made."""
        return [c for c, heard in enumerate(self._heard) if not heard]

    def _move(self, rid: str, connection: int, among: list[int] | None = None) -> int | None:
        """Route a request of `connection` to the open one (or the one `among`) with the fewest in
        flight; -> it, or None."""
        others = [c for c in among if c != connection] if among is not None else self._open(connection)
        if not others:
            return None
        target = min(others, key=self._load.__getitem__)
        self._load[connection] -= 1
        self._load[target] += 1
        self._requests[rid].connection = target
        return target

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def hold(self, request_id: str, connection: int) -> bool:
        """A request that could not be sent over `connection` (no connection made, or, made,
        not ready yet or its queue full): held for it, if it is still running there (not ended, nor
        sent elsewhere meanwhile); -> whether it is. It goes once the connection is made
        (watched), or, made already, at the client's next try (held_up)."""
        found = self._requests.get(request_id)
        if request_id not in self._unanswered or found is None or found.connection != connection:
            return False
        self._held[request_id] = connection
        return True

    def held_up(self) -> list[int]:
        """The connections that are up with requests held for them: to try again shortly."""
        return sorted({c for c in self._held.values() if self.up[c]})

    def take_held(self, connection: int) -> list[tuple[str, bytes | str]]:
        """The requests held for `connection` (see deliver), no longer held: (id, Generate)."""
        taken = [rid for rid, c in self._held.items() if c == connection]
        for rid in taken:
            del self._held[rid]
        return [(rid, self._unanswered[rid]) for rid in taken]

    def pop(self, request_id: str) -> int | None:
        """Forget a request; -> its connection, or None if it had already ended."""
        self._unanswered.pop(request_id, None)
        self._held.pop(request_id, None)
        found = self._requests.pop(request_id, None)
        if found is None:
            return None
        self._load[found.connection] -= 1
        return found.connection

    def hand_over(self, request_id: str) -> _Flight[Inbox]:
        """Forget a running request, which goes on over a connection that other Routes keep (a
        WebSocket client's next connection: see take_over); -> what it needs there."""
        flight = self._requests[request_id]
        self.pop(request_id)
        return flight

    def take_over(self, flight: _Flight[Inbox], frame: bytes | str) -> None:
        """Route a request that other Routes handed over, to go as `frame`: what it had there (its
        replies, whether it went again once) it keeps."""
        flight.connection = self.add(flight.msg, flight.inbox, frame)
        self._requests[flight.msg.id] = flight

    def lost_once(self) -> dict[str, bytes | str]:
        """Request id -> Generate message of the requests lost with their connection (the only
        one) that were not sent again before, each as it goes again over a new one: as it was
        if it had no answer, else resumed after the tokens it has (they are marked so now: never
        twice)."""
        return self._again_once(list(self._requests))

    def unanswered(self) -> dict[str, bytes | str]:
        """Request id -> Generate message of the requests that have had no reply."""
        return dict(self._unanswered)

    def deliver(self, msg: TokenBatch | Error, connection: int | None = None, keep: Collection[str] = ()) -> list[Inbox]:
        """The inboxes that get `msg`, which came over `connection` (None: every one). A request is
        forgotten with its last message, so that replies after it (or for requests this client
        never made) are dropped. An error about the connection itself ends its requests but those
        to `keep`."""
        if isinstance(msg, Error) and not msg.id:  # about the connection itself: its requests fail
            ended = [(rid, f.inbox) for rid, f in self._requests.items()
                     if (connection is None or f.connection == connection) and rid not in keep]
            for rid, _ in ended:
                self.pop(rid)
            return [inbox for _, inbox in ended]
        found = self._requests.get(msg.id)
        if found is None:
            return []
        if isinstance(msg, Error) and msg.draining and msg.id in self._unanswered and connection is not None:
            self._held[msg.id] = connection  # it never started, and redirect found no other way
            return []
        if isinstance(msg, Error) or msg.finish_reason is not None:
            self.pop(msg.id)
        else:
            self._unanswered.pop(msg.id, None)  # it runs: should it go again, it goes on after its tokens
            found.replies.append(msg)
        return [found.inbox]


class StreamBase:
    """One request's replies as StreamEvents, for the sync and async streams built on it."""

    def __init__(self, msg: Generate, cancel: Callable[[str], None]):
        self.id = msg.id
        self.events: list[StreamEvent] = []  # every event so far
        self.finish_reason: str | None = None
        self.seed: int | None = None
        self.prompt_tokens = 0
        self.prompt_logprobs: list[float | None] | None = None
        params = msg.params
        self._wants_details = params.logprobs or params.top_n_tokens > 0 or params.prompt_logprobs
        self._timeout = msg.timeout_s
        self._deadline = None if msg.timeout_s is None else time.monotonic() + msg.timeout_s
        self._cancel = cancel
        self._seen: set[int] = set()
        self._ready: deque[StreamEvent] = deque()
        self._over = False  # nothing more will come: finished, failed, timed out or closed

    def close(self) -> None:
        """Stop reading; a request still running is cancelled at the gateway."""
        self._ready.clear()
        if not self._over:
            self._over = True
            self._cancel(self.id)

    def __del__(self):
        # a loop that breaks out of the stream drops it: the gateway should stop generating too
        self.close()

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def _timed_out(self) -> GenerationTimeout:
        self.close()
        return GenerationTimeout(f"no complete answer within {self._timeout} s", self.id)

    def _take(self, msg: TokenBatch | Error) -> None:
        if isinstance(msg, Error):
            self._over = True
            raise error_from(msg)
        self._take_batch(msg)

    def _take_batch(self, batch: TokenBatch) -> None:
        if batch.seed is not None:
            self.seed = batch.seed
        if batch.prompt_tokens:
            self.prompt_tokens = batch.prompt_tokens
        if batch.prompt_logprobs is not None:
            self.prompt_logprobs = batch.prompt_logprobs
        events = []
        for t in batch.tokens:
            if t.index in self._seen:  # the gateway de-duplicates, but a resent token must never show twice
                continue
            self._seen.add(t.index)
            events.append(StreamEvent(t.token_id, t.text, t.logprob, t.index, top_tokens=t.top_tokens))
        if batch.finish_reason is not None:
            self._finish(batch.finish_reason, events)
        self.events.extend(events)
        self._ready.extend(events)

    def _finish(self, reason: str, events: list[StreamEvent]) -> None:
        self.finish_reason = reason
        self._over = True
        last = events.pop() if events else StreamEvent(None, "", None, len(self._seen))
        events.append(dataclasses.replace(last, finish_reason=reason))

    def _response(self) -> Response:
        details = None
        if self._wants_details:
            details = Details(self.events, self.seed, self.prompt_tokens, self.prompt_logprobs)
        token_ids = [e.token_id for e in self.events if e.token_id is not None]
        return Response("".join(e.text for e in self.events), token_ids, self.finish_reason, details)
