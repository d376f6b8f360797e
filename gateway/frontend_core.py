"""A frontend's heart, independent of sockets: validate and admit its clients' requests through
the router, put each request's token events (which come straight from the workers) in order,
and end every stream exactly once (last token, error, cancel, deadline).

A request whose worker is lost costs it no output: the router reports the attempt Lost and the
frontend, which knows what its client already has, admits the rest as a new attempt under a new
worker-facing id, prefilling its prompt plus the tokens the client has. Sampling noise depends
only on the seed and the position, so the resumed attempt draws the tokens the lost one would
have, and messages still in flight for the old id are simply unknown.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from splitserve.common import protocol as P
from splitserve.common.fim import find_fim
from splitserve.common.params import Limits, ValidationError
from splitserve.common.prefix_blocks import block_hashes
from splitserve.common.request import GenerateRequest
from splitserve.common.tokenizer import Tokenizer

from . import off_loop
from .validation import build_request

log = logging.getLogger(__name__)

Sink = Callable[[object], None]  # receives P.TokenBatch and P.Error for one request
# A request that keeps losing its workers is likely what kills them: give up on it after this many.
MAX_ATTEMPTS = 3


@dataclass
class Stream:
    gid: str  # the id front ends know; `request.id` is the current attempt's
    client_id: str
    original: GenerateRequest
    sink: Sink
    deadline: float | None  # time.time()
    request: GenerateRequest = field(init=False)  # the current attempt
    next_index: int = field(init=False, default=0)  # of the next token to send the client
    pending: dict[int, tuple[P.Token, str | None]] = field(default_factory=dict)
    generated: list[int] = field(default_factory=list)  # token ids the client has, in order
    prompt_logprobs: list | None = None
    cached_tokens: int = 0  # of the prompt, what the prefill worker's prefix cache held
    attempts: int = 1
    lost_why: str = ""  # why the current attempt is a resumed one
    # OpenAI's `n`: requests with one prompt are admitted together and share one prefill; until
    # then the first holds the others' gateway ids
    forks: list[str] = field(default_factory=list)
    admitted: bool = False

    def __post_init__(self):
        # a client that lost the frontend streaming it resumes it here (Generate.resume): it has
        # `generated` already
        self.request = resumed_request(self.original, self.gid, self.generated)
        self.next_index = len(self.generated)

    @property
    def prompt_tokens(self) -> int:
        return len(self.original.prompt_ids)


class FrontendCore:
    def __init__(self, tokenizer: Tokenizer, limits: Limits, send_router: Callable[[object], None],
                 token_endpoint: str, namespace: Callable[[GenerateRequest], bytes]):
        self.tokenizer, self.limits, self.send_router = tokenizer, limits, send_router
        self.namespace = namespace  # of a prompt's blocks, as the prefill workers keep them (block_namespace)
        self.token_endpoint = token_endpoint
        fim = find_fim(tokenizer)
        # A fill-in-the-middle prompt's request also stops at its layout's end tokens.
        self.server_stop_ids = frozenset(fim.end_ids if fim is not None else ())
        self.streams: dict[str, Stream] = {}  # by the current attempt's id
        # gateway id -> (client id, sink) of a request whose long prompt text the tokenizer thread has
        self.tokenizing: dict[str, tuple[str, Sink]] = {}
        self.attempt_of: dict[str, str] = {}  # gateway id -> current attempt's id
        self.unsent: list[str] = []  # submitted with dispatch=False, admitted by the next dispatch()
        self.fleet: P.Fleet | None = None  # None while the router is out of reach
        self.draining = False  # this frontend is shutting down: its streams finish, new requests go elsewhere
        # Ids differ across frontend processes, so a worker or router still holding an earlier
        # process's attempt (or its cancel) can never mistake it for a new one.
        self._ids = itertools.count()
        self._id_prefix = f"f{secrets.token_hex(4)}-"

    # ---- admission ----------------------------------------------------------------------

    def submit(self, client_id: str, msg: P.Generate, sink: Sink, fork_of: str | None = None,
               dispatch: bool = True) -> str | None:
        """Validate and admit a request; errors go to the sink. Returns the gateway's id.

        `fork_of`: the id of a request submitted just before with `dispatch=False`; when both
        have the same prompt, they share its prefill. A long prompt text is tokenized on the
        tokenizer thread (off_loop): its id is returned at once, and the request admitted when it
        is done; errors still go to the sink."""
        reject = self.rejection(resumed=bool(msg.resume))
        if reject:
            sink(P.Error(client_id, *reject, draining=self.draining))  # rejection() names draining first
            return None
        gid = f"{self._id_prefix}{next(self._ids)}"
        deadline = time.time() + msg.timeout_s if msg.timeout_s else None
        build = (gid, msg, self.tokenizer, self.limits, self.server_stop_ids, self.token_endpoint)
        if msg.prompt is not None and off_loop.is_long(len(msg.prompt)):
            # admitted once the tokenizer thread is done with it, unless it was cancelled meanwhile
            self.tokenizing[gid] = client_id, sink
            off_loop.start(build_request, *build).add_done_callback(
                lambda built: self._built(gid, built, deadline, fork_of, msg.resume))
            return gid
        try:
            request = build_request(*build)
        except ValidationError as e:
            sink(P.Error(client_id, "validation", str(e)))
            return None
        self._open(gid, client_id, request, sink, deadline, fork_of, dispatch, msg.resume)
        return gid

    def _built(self, gid: str, built: asyncio.Future, deadline: float | None, fork_of: str | None,
               resume: list[int]) -> None:
        """A long prompt's request, built on the tokenizer thread: admitted (at once, as the dispatch
        its front end asked for may have run meanwhile), or its error to the client."""
        waiting = self.tokenizing.pop(gid, None)
        if waiting is None:  # cancelled while it was tokenized
            return
        client_id, sink = waiting
        try:
            request = built.result()
        except ValidationError as e:
            sink(P.Error(client_id, "validation", str(e)))
            return
        except Exception as e:
            log.exception("preparing %s failed", gid)
            sink(P.Error(client_id, "generation", f"the gateway could not prepare it: {e}"))
            return
        self._open(gid, client_id, request, sink, deadline, fork_of, True, resume)

    def _open(self, gid: str, client_id: str, request: GenerateRequest, sink: Sink, deadline: float | None,
              fork_of: str | None, dispatch: bool, resume: list[int]) -> None:
        self.streams[gid] = Stream(gid, client_id, request, sink, deadline, generated=list(resume))
        self.attempt_of[gid] = gid
        leader = self.streams.get(fork_of) if fork_of is not None else None
        if leader is not None and not leader.admitted and leader.request.prompt_ids == request.prompt_ids:
            leader.forks.append(gid)
        else:
            self.unsent.append(gid)
        if dispatch:
            self.dispatch()

    def running(self, gid: str) -> bool:
        """Whether the request is still streaming (not answered in full, not refused)."""
        return gid in self.attempt_of or gid in self.tokenizing

    def live(self) -> int:
        return len(self.streams) + len(self.tokenizing)

    def rejection(self, resumed: bool = False) -> tuple[str, str] | None:
        """(error type, message) of the refusal a request arriving now would get, or None. The
        router has the last word (it admits for every frontend); this spares it what it would refuse.
        A request its client resumes (`resumed`) waits for workers that may be registering yet (a
        router just started, or a role's last worker just lost: see P.Fleet.starting): its stream
        was running before."""
        if self.draining:
            return "unavailable", "this frontend is shutting down: send the request to another one"
        fleet = self.fleet
        if fleet is None:
            return "unavailable", "the router is out of reach"
        if fleet.draining:
            return "unavailable", "the server is shutting down"
        for role, count in (("prefill", fleet.prefill_workers), ("decode", fleet.decode_workers)):
            if not count and not (resumed and fleet.starting):
                return "unavailable", f"no {role} worker is available"
        live = fleet.in_flight + self.live()
        if live >= fleet.max_concurrent:
            return "overloaded", f"{live} requests in flight; the limit is {fleet.max_concurrent} (max_concurrent_requests)"
        return None

    def dispatch(self) -> None:
        """Admit what was submitted: one Admit per prompt group."""
        unsent, self.unsent = self.unsent, []
        for gid in unsent:
            stream = self.streams.get(gid)
            if stream is None:  # cancelled before it was sent
                continue
            group = [stream, *(self.streams[g] for g in stream.forks if g in self.streams)]
            stream.forks = []
            self._admit(group, resume=False)

    def _admit(self, group: list[Stream], resume: bool) -> None:
        for s in group:
            s.admitted = True
        first = group[0].request
        sizes = self.fleet.block_sizes if self.fleet is not None else []
        namespace = self.namespace(first)
        hashes = {} if first.prompt_logprobs or not first.cache_prompt else \
            {b: block_hashes(first.prompt_ids, b, namespace) for b in sizes}
        self.send_router(P.Admit([s.request for s in group], group[0].deadline, resume, hashes, namespace))

    # ---- ends from this side --------------------------------------------------------------

    def cancel(self, gid: str, reason: str | None = None, error: P.Error | None = None) -> None:
        """End a request from the frontend side (client gone, deadline); the router stops its workers."""
        waiting = self.tokenizing.pop(gid, None)
        if waiting is not None:  # nothing admitted yet
            _tell_end(*waiting, reason, error)
            return
        stream = self.streams.get(self.attempt_of.get(gid, ""))
        if stream is None:
            return
        _tell_end(stream.client_id, stream.sink, reason, error)
        self._end(stream)
        if stream.admitted:
            self.send_router(P.Cancel(stream.request.id))
        else:  # a fork still waiting for its leader's dispatch; or a leader whose forks go on alone
            for gid2 in stream.forks:
                self.unsent.append(gid2)
            for s in self.streams.values():
                if gid in s.forks:
                    s.forks.remove(gid)

    def end_all(self, error_type: str, message: str) -> None:
        """End every request still running with this error (a frontend that stops)."""
        for gid, (client_id, _) in list(self.tokenizing.items()):
            self.cancel(gid, error=P.Error(client_id, error_type, message))
        for stream in list(self.streams.values()):
            self.cancel(stream.gid, error=P.Error(stream.client_id, error_type, message))

    def _end(self, stream: Stream) -> None:
        self.streams.pop(stream.request.id, None)
        self.attempt_of.pop(stream.gid, None)

    def tick(self) -> None:
        """Periodic: deadlines."""
        now = time.time()
        for s in list(self.streams.values()):
            if s.deadline is not None and s.deadline < now:
                self.cancel(s.gid, error=P.Error(s.client_id, "timeout", "the request's deadline passed"))

    # ---- the router's word ----------------------------------------------------------------

    def on_router(self, msg) -> None:
        if isinstance(msg, P.Fleet):
            self.fleet = msg
        elif isinstance(msg, P.Refused):
            for attempt in msg.ids:
                stream = self.streams.get(attempt)
                if stream is None:
                    continue
                if stream.lost_why and msg.error_type == "unavailable":  # it was running: a generation error
                    self._fail(stream, "generation", f"{stream.lost_why}; no worker is left to resume it")
                else:
                    self._fail(stream, msg.error_type, msg.message)
        elif isinstance(msg, P.Lost):
            self._resume(msg.id, msg.why)
        elif isinstance(msg, P.Finished):
            stream = self.streams.get(msg.id)
            if stream is None:
                return
            # what is in order of the worker's last tokens goes out first; one of them may be the end
            if self._flush(stream) is not None:
                self._end(stream)
            elif msg.reason == "timeout":
                self._fail(stream, "timeout", "the request's deadline passed")
            else:
                stream.sink(P.TokenBatch(stream.client_id, [], msg.reason))
                self._end(stream)
        elif isinstance(msg, P.WorkerError):
            stream = self.streams.get(msg.id)
            if stream is not None:
                self._fail(stream, "generation", msg.message)

    def _fail(self, stream: Stream, error_type: str, message: str) -> None:
        stream.sink(P.Error(stream.client_id, error_type, message))
        self._end(stream)

    def _resume(self, attempt: str, why: str) -> None:
        """Run the rest of a request as a new attempt: its prompt plus the tokens the client has,
        prefilled again, then decoded wherever a slot is free."""
        stream = self.streams.get(attempt)
        if stream is None:
            return
        if stream.attempts >= MAX_ATTEMPTS:
            self._fail(stream, "generation", f"{why}; given up after {stream.attempts} attempts")
            return
        log.warning("%s: resuming %s after %d tokens", why, stream.gid, stream.next_index)
        del self.streams[attempt]
        stream.attempts += 1
        stream.pending.clear()
        stream.lost_why = why
        stream.request = resumed_request(stream.original, f"{stream.gid}.{stream.attempts}", stream.generated)
        self.streams[stream.request.id] = stream
        self.attempt_of[stream.gid] = stream.request.id
        self._admit([stream], resume=True)

    # ---- tokens from the workers ----------------------------------------------------------

    def on_tokens(self, msg) -> None:
        if isinstance(msg, P.StepTokens):
            for e in msg.entries:
                self._deliver(e.id, e.token, e.finish_reason)
        elif isinstance(msg, P.FirstToken):
            stream = self.streams.get(msg.id)
            if stream is None:
                return
            stream.prompt_logprobs = msg.prompt_logprobs
            stream.cached_tokens = msg.cached_tokens
            self._deliver(msg.id, msg.token, msg.finish_reason)

    def _deliver(self, attempt: str, token: P.Token, finish: str | None) -> None:
        stream = self.streams.get(attempt)
        if stream is None:  # ended here already, or an attempt resumed since
            return
        if token.index == stream.next_index and not stream.pending:  # in order, as nearly always
            stream.next_index += 1
            stream.generated.append(token.token_id)
            self._emit(stream, [token], finish)
        else:
            if token.index >= stream.next_index and token.index not in stream.pending:
                stream.pending[token.index] = (token, finish)
            finish = self._flush(stream)
        if finish is not None:
            self._end(stream)
            self.send_router(P.Done(attempt))

    def _flush(self, stream: Stream) -> str | None:
        """Send the tokens that are next in order; the finish reason once the final one has gone out."""
        tokens, finish = [], None
        while stream.next_index in stream.pending and finish is None:
            token, finish = stream.pending.pop(stream.next_index)
            tokens.append(token)
            stream.next_index += 1
            stream.generated.append(token.token_id)
        if tokens:
            self._emit(stream, tokens, finish)
        return finish

    @staticmethod
    def _emit(stream: Stream, tokens: list[P.Token], finish: str | None) -> None:
        seed = stream.request.sampling.seed if stream.request.sampling.do_sample else None
        if tokens[0].index:
            stream.sink(P.TokenBatch(stream.client_id, tokens, finish, 0, seed))
        else:  # the first batch says what the request's prompt was
            stream.sink(P.TokenBatch(stream.client_id, tokens, finish, stream.prompt_tokens, seed,
                                     stream.prompt_logprobs, stream.cached_tokens))


def _tell_end(client_id: str, sink: Sink, reason: str | None, error: P.Error | None) -> None:
    """What a request ended from the frontend side tells its client: the error, or the finish reason
    (none when the client itself is gone)."""
    if error is not None:
        sink(error)
    elif reason is not None:
        sink(P.TokenBatch(client_id, [], reason))


def resumed_request(original: GenerateRequest, attempt_id: str, generated: list[int]) -> GenerateRequest:
    """The rest of `original` after the client received `generated`. The prompt may now exceed
    max_input_tokens; that is fine, as the request's total was checked against max_total_tokens."""
    if not generated:
        return replace(original, id=attempt_id)
    return replace(original, id=attempt_id, prompt_ids=original.prompt_ids + tuple(generated),
                   max_new_tokens=original.max_new_tokens - len(generated), prompt_logprobs=False,
                   resumed=len(generated))
