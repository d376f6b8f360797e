"""The gateway's heart, independent of any front end: admit requests, reserve a decode slot
before prefill, route, put each request's token events in order, and release reservations on
every path (finish, cancel, error, worker death, deadline).

Every request ends with exactly one terminal message from a worker: the prefill worker's when
the request never reaches decode (finished at the first token, cancelled in its queue, failed),
otherwise the decode worker's. The reservation is held until then, so a slot is never promised
twice, even while a cancelled request's slot is still being freed.

A worker that dies (or hands its work back when its drain times out) costs no request its
output: each affected request is resumed as a new attempt, under a new worker-facing id, by
prefilling its prompt plus the tokens the client already has. Sampling noise depends only on the
seed and the position, so the resumed attempt draws the tokens the lost one would have, and
messages still in flight for the old id are simply unknown.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

from splitserve.common import protocol as P
from splitserve.common.fim import find_fim
from splitserve.common.params import Limits, ValidationError
from splitserve.common.prefix_blocks import block_hashes
from splitserve.common.request import GenerateRequest
from splitserve.common.tokenizer import Tokenizer

from .validation import build_request
from .workers import NoTransport, Worker, WorkerRegistry

log = logging.getLogger(__name__)

Sink = Callable[[object], None]  # receives P.TokenBatch and P.Error for one request
CLOSING_GRACE_S = 120.0  # how long a stream ended at the gateway waits for its worker's terminal
# A request that keeps losing its workers is likely what kills them: give up on it after this many.
MAX_ATTEMPTS = 3


@dataclass
class Stream:
    gid: str  # the id front ends know; `request.id` is the current attempt's
    client_id: str
    original: GenerateRequest
    sink: Sink
    deadline: float | None  # time.time()
    request: GenerateRequest = None  # the current attempt
    prefill: str | None = None
    decode: str | None = None
    awaiting_first: bool = True  # its prompt tokens count in the prefill worker's queue
    next_index: int = 0
    pending: dict[int, tuple[P.Token, str | None]] = field(default_factory=dict)
    generated: list[int] = field(default_factory=list)  # token ids the client has, in order
    client_done: bool = False  # the client has its final message; only the worker's terminal is awaited
    closed_at: float = 0.0
    prompt_logprobs: list | None = None
    attempts: int = 1
    # OpenAI's `n`: choices with one prompt share one prefill. While waiting, the first holds the
    # others' attempt ids and each of those names it; once dispatched, the others hold no queue share.
    forks: list[str] = field(default_factory=list)
    fork_of: str | None = None
    queued_tokens: int = 0  # what the current attempt adds to its prefill worker's queue (0 for a fork)
    cached_tokens: int = 0  # of the prompt, what the prefill worker's prefix cache held
    hashes: dict[int, list[bytes]] = field(default_factory=dict)  # the attempt's blocks, by block size

    def __post_init__(self):
        self.request = self.request or self.original

    @property
    def prompt_tokens(self) -> int:
        return len(self.original.prompt_ids)

    def block_hashes(self, block_tokens: int) -> list[bytes]:
        if block_tokens not in self.hashes:
            self.hashes[block_tokens] = block_hashes(self.request.prompt_ids, block_tokens)
        return self.hashes[block_tokens]


class GatewayCore:
    def __init__(self, tokenizer: Tokenizer, limits: Limits, registry: WorkerRegistry,
                 send: Callable[[Worker, object], None], max_concurrent: int):
        self.tokenizer, self.limits, self.registry = tokenizer, limits, registry
        fim = find_fim(tokenizer)
        # A fill-in-the-middle prompt's request also stops at its layout's end tokens.
        self.server_stop_ids = frozenset(fim.end_ids if fim is not None else ())
        self.send = send
        self.max_concurrent = max_concurrent
        self.streams: dict[str, Stream] = {}  # by the current attempt's id
        self.attempt_of: dict[str, str] = {}  # gateway id -> current attempt's id
        self.waiting: deque[str] = deque()  # attempts admitted, waiting for a free decode slot
        self.draining = False
        # Ids differ across gateway processes, so a worker still holding an earlier process's
        # request (or its cancel) can never mistake it for a new one.
        self._ids = itertools.count()
        self._id_prefix = f"g{secrets.token_hex(3)}-"

    # ---- admission ----------------------------------------------------------------------

    def submit(self, client_id: str, msg: P.Generate, sink: Sink, fork_of: str | None = None,
               dispatch: bool = True) -> str | None:
        """Validate and queue a request; errors go to the sink. Returns the gateway's id.

        `fork_of`: the id of a request submitted just before with `dispatch=False`; when both
        have the same prompt, they share its prefill."""
        reject = self.rejection()
        if reject:
            sink(P.Error(client_id, *reject))
            return None
        gid = f"{self._id_prefix}{next(self._ids)}"
        try:
            request = build_request(gid, msg, self.tokenizer, self.limits, self.server_stop_ids)
        except ValidationError as e:
            sink(P.Error(client_id, "validation", str(e)))
            return None
        deadline = time.time() + msg.timeout_s if msg.timeout_s else None
        stream = self.streams[gid] = Stream(gid, client_id, request, sink, deadline)
        self.attempt_of[gid] = gid
        leader = self.streams.get(self.attempt_of.get(fork_of, ""))
        if leader is not None and leader.decode is None and leader.fork_of is None \
                and leader.request.prompt_ids == request.prompt_ids and len(leader.forks) + 2 <= self._largest_pool():
            leader.forks.append(gid)
            stream.fork_of = leader.request.id
        else:
            self.waiting.append(gid)
        if dispatch:
            self.dispatch()
        return gid

    def _largest_pool(self) -> int:
        """A group must fit one decode worker's slots, or it would wait forever."""
        return max((w.info.capacity for w in self.registry.of_role("decode")), default=0)

    def running(self, gid: str) -> bool:
        """Whether the request is still in the core (not answered in full, not refused)."""
        return gid in self.attempt_of

    def rejection(self) -> tuple[str, str] | None:
        """(error type, message) of the refusal a request arriving now would get, or None."""
        if self.draining:
            return "unavailable", "the server is shutting down"
        for role in ("prefill", "decode"):
            if not self.registry.of_role(role):
                return "unavailable", f"no {role} worker is available"
        live = len(self.streams) - sum(s.client_done for s in self.streams.values())
        if live >= self.max_concurrent:
            return "overloaded", f"{live} requests in flight; the limit is {self.max_concurrent} (max_concurrent_requests)"
        return None

    def dispatch(self) -> None:
        """Send waiting requests to prefill while some decode worker has a free slot."""
        while self.waiting:
            stream = self.streams[self.waiting[0]]
            forks = [self.streams[attempt] for attempt in stream.forks]
            try:
                # a prompt whose logprobs need every position computed, or whose client asked for no
                # cached prefix (cache_prompt), meets none: no worker holds it
                request = stream.request
                hashes = (lambda _: []) if request.prompt_logprobs or not request.cache_prompt else stream.block_hashes
                route = self.registry.route(1 + len(forks), len(request.prompt_ids), hashes)
            except NoTransport as e:  # the workers that have room cannot hand KV to each other
                log.error("%s", e)
                self.waiting.popleft()
                for s in (stream, *forks):
                    s.sink(P.Error(s.client_id, "unavailable", str(e)))
                    del self.streams[s.request.id], self.attempt_of[s.gid]
                continue
            if route is None:
                return
            self.waiting.popleft()
            stream.forks = []
            stream.queued_tokens = route.compute
            route.prefill.queued_tokens += route.compute
            route.prefill.remember(route.hashes)
            for s in (stream, *forks):
                route.decode.assigned.add(s.request.id)  # the reservation, before any prefill work
                s.decode, s.prefill, s.fork_of = route.decode.id, route.prefill.id, None
            decode = route.decode.info
            self.send(route.prefill, P.Prefill(stream.request, decode.worker_id, decode.kv_endpoint, route.transport,
                                               stream.deadline, [f.request for f in forks], decode.kv_public_key))

    # ---- cancellation and deadlines -----------------------------------------------------

    def cancel(self, gid: str, reason: str | None = None, error: P.Error | None = None) -> None:
        """End a request from the gateway side (client gone, deadline); workers are told to stop."""
        attempt = self.attempt_of.get(gid)
        stream = self.streams.get(attempt)
        if stream is None or stream.client_done:
            return
        if error is not None:
            stream.sink(error)
        elif reason is not None:
            stream.sink(P.TokenBatch(stream.client_id, [], reason))
        stream.client_done, stream.closed_at = True, time.monotonic()
        if stream.decode is None:  # never dispatched: nothing holds a reservation
            self._leave_queue(stream)
            self._release(attempt)
            return
        self._cancel_at_workers(stream)

    def _leave_queue(self, stream: Stream) -> None:
        """Take a waiting request out of line; its first fork, if any, takes its place."""
        attempt = stream.request.id
        if stream.fork_of is not None:
            self.streams[stream.fork_of].forks.remove(attempt)
            return
        place = self.waiting.index(attempt)
        if not stream.forks:
            del self.waiting[place]
            return
        heir = self.streams[stream.forks[0]]
        heir.fork_of, heir.forks = None, stream.forks[1:]
        for other in heir.forks:
            self.streams[other].fork_of = heir.request.id
        self.waiting[place] = heir.request.id

    def _cancel_at_workers(self, stream: Stream) -> None:
        for worker_id in (stream.prefill, stream.decode):
            worker = self.registry.workers.get(worker_id)
            if worker is not None:
                self.send(worker, P.Cancel(stream.request.id))

    def tick(self) -> None:
        """Periodic: dead workers, deadlines, streams whose worker terminal never came."""
        for worker in self.registry.expire():
            self.worker_left(worker)
        now, mono = time.time(), time.monotonic()
        for attempt, s in list(self.streams.items()):
            if s.client_done and mono - s.closed_at > CLOSING_GRACE_S:
                self._release(attempt)
            elif not s.client_done and s.deadline is not None and s.deadline < now:
                self.cancel(s.gid, error=P.Error(s.client_id, "timeout", "the request's deadline passed"))
        self.dispatch()

    def worker_left(self, worker: Worker) -> None:
        """A worker is gone (silent past its heartbeat timeout): resume its unfinished work."""
        for attempt, s in list(self.streams.items()):
            if s.decode == worker.id or (s.prefill == worker.id and s.awaiting_first):
                self._resume(attempt, f"{worker.info.role} worker {worker.id} stopped responding")

    def _resume(self, attempt: str, why: str) -> None:
        """Run the rest of a request as a new attempt: its prompt plus the tokens the client has,
        prefilled again, then decoded wherever a slot is free."""
        stream = self.streams.get(attempt)
        if stream is None:
            return
        self._cancel_at_workers(stream)  # the survivor of the pair frees what it holds
        if stream.client_done:
            self._release(attempt)
            return
        role_left = all(self.registry.of_role(role) for role in ("prefill", "decode"))
        if not role_left or stream.attempts >= MAX_ATTEMPTS:
            detail = "no worker is left to resume it" if not role_left else f"given up after {stream.attempts} attempts"
            stream.sink(P.Error(stream.client_id, "generation", f"{why}; {detail}"))
            self._release(attempt)
            return
        log.warning("%s: resuming %s after %d tokens", why, stream.gid, stream.next_index)
        self._free_reservation(stream)
        del self.streams[attempt]
        stream.attempts += 1
        stream.pending.clear()
        stream.awaiting_first, stream.prefill, stream.decode, stream.queued_tokens = True, None, None, 0
        stream.request = resumed_request(stream.original, f"{stream.gid}.{stream.attempts}", stream.generated)
        stream.hashes.clear()
        self.streams[stream.request.id] = stream
        self.attempt_of[stream.gid] = stream.request.id
        self.waiting.appendleft(stream.request.id)  # it was admitted long ago: first in line

    # ---- worker events ------------------------------------------------------------------

    def on_worker(self, worker: Worker, msg) -> None:
        if isinstance(msg, P.FirstToken):
            self._on_first(worker, msg)
        elif isinstance(msg, P.StepTokens):
            for e in msg.entries:
                self._deliver(worker, e.id, e.token, e.finish_reason)
        elif isinstance(msg, P.Finished):
            self._on_finished(msg)
        elif isinstance(msg, P.WorkerError):
            stream = self.streams.get(msg.id)
            if stream is not None:
                if not stream.client_done:
                    stream.sink(P.Error(stream.client_id, "generation", msg.message))
                self._release(msg.id)

    def _on_first(self, worker: Worker, msg: P.FirstToken) -> None:
        stream = self.streams.get(msg.id)
        if stream is None:
            return
        self._prefilled(stream)
        stream.prompt_logprobs = msg.prompt_logprobs
        stream.cached_tokens = msg.cached_tokens
        self._deliver(worker, msg.id, msg.token, msg.finish_reason)

    def _prefilled(self, stream: Stream) -> None:
        if stream.awaiting_first:
            stream.awaiting_first = False
            prefill = self.registry.workers.get(stream.prefill)
            if prefill is not None:
                prefill.queued_tokens -= stream.queued_tokens

    def _on_finished(self, msg: P.Finished) -> None:
        stream = self.streams.get(msg.id)
        if stream is None:
            return
        if msg.reason == "shutdown":  # a draining worker hands back what it could not finish in time
            self._resume(msg.id, "a worker shut down before finishing it")
            self.dispatch()
            return
        if not stream.client_done:
            self._flush(stream)
            if msg.reason == "timeout":
                stream.sink(P.Error(stream.client_id, "timeout", "the request's deadline passed"))
            else:
                stream.sink(P.TokenBatch(stream.client_id, [], msg.reason))
        self._release(msg.id)

    def _deliver(self, worker: Worker, attempt: str, token: P.Token, finish: str | None) -> None:
        stream = self.streams.get(attempt)
        if stream is None:
            if worker.info.role == "decode":  # a request we no longer know: free its slot
                self.send(worker, P.Cancel(attempt))
            return
        if stream.client_done:
            if finish is not None:
                self._release(attempt)
            return
        if token.index >= stream.next_index and token.index not in stream.pending:
            stream.pending[token.index] = (token, finish)
        if self._flush(stream):
            self._release(attempt)

    def _flush(self, stream: Stream) -> bool:
        """Send the tokens that are next in order; True once the final one has gone out."""
        tokens, finish = [], None
        while stream.next_index in stream.pending and finish is None:
            token, finish = stream.pending.pop(stream.next_index)
            tokens.append(token)
            stream.next_index += 1
        if tokens:
            stream.generated.extend(t.token_id for t in tokens)
            first = tokens[0].index == 0
            stream.sink(P.TokenBatch(
                stream.client_id, tokens, finish, prompt_tokens=stream.prompt_tokens if first else 0,
                seed=stream.request.sampling.seed if stream.request.sampling.do_sample else None,
                prompt_logprobs=stream.prompt_logprobs if first else None,
                cached_tokens=stream.cached_tokens if first else 0,
            ))
        if finish is not None:
            stream.client_done = True
        return finish is not None

    def _release(self, attempt: str) -> None:
        stream = self.streams.pop(attempt, None)
        if stream is None:
            return
        self.attempt_of.pop(stream.gid, None)
        self._free_reservation(stream)
        self.dispatch()

    def _free_reservation(self, stream: Stream) -> None:
        self._prefilled(stream)
        decode = self.registry.workers.get(stream.decode)
        if decode is not None:
            decode.assigned.discard(stream.request.id)


def resumed_request(original: GenerateRequest, attempt_id: str, generated: list[int]) -> GenerateRequest:
    """The rest of `original` after the client received `generated`. The prompt may now exceed
    max_input_tokens; that is fine, as the request's total was checked against max_total_tokens."""
    if not generated:
        return replace(original, id=attempt_id)
    return replace(original, id=attempt_id, prompt_ids=original.prompt_ids + tuple(generated),
                   max_new_tokens=original.max_new_tokens - len(generated), prompt_logprobs=False,
                   resumed=len(generated))
