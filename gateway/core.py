"""The gateway's heart, independent of any front end: admit requests, reserve a decode slot
before prefill, route, put each request's token events in order, and release reservations on
every path (finish, cancel, error, worker death, deadline).

Every request ends with exactly one terminal message from a worker: the prefill worker's when
the request never reaches decode (finished at the first token, cancelled in its queue, failed),
otherwise the decode worker's. The reservation is held until then, so a slot is never promised
twice, even while a cancelled request's slot is still being freed.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from splitserve.common import protocol as P
from splitserve.common.limits import Limits, ValidationError
from splitserve.common.request import GenerateRequest
from splitserve.common.tokenizer import Tokenizer

from .validation import build_request
from .workers import Worker, WorkerRegistry

log = logging.getLogger(__name__)

Sink = Callable[[object], None]  # receives P.TokenBatch and P.Error for one request
CLOSING_GRACE_S = 120.0  # how long a stream ended at the gateway waits for its worker's terminal


@dataclass
class Stream:
    client_id: str
    request: GenerateRequest
    sink: Sink
    deadline: float | None  # time.time()
    prefill: str | None = None
    decode: str | None = None
    awaiting_first: bool = True  # its prompt tokens count in the prefill worker's queue
    next_index: int = 0
    pending: dict[int, tuple[P.Token, str | None]] = field(default_factory=dict)
    client_done: bool = False  # the client has its final message; only the worker's terminal is awaited
    closed_at: float = 0.0
    prompt_logprobs: list | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)


class GatewayCore:
    def __init__(self, tokenizer: Tokenizer, limits: Limits, registry: WorkerRegistry,
                 send: Callable[[Worker, object], None], max_concurrent: int):
        self.tokenizer, self.limits, self.registry = tokenizer, limits, registry
        self.send = send
        self.max_concurrent = max_concurrent
        self.streams: dict[str, Stream] = {}
        self.waiting: deque[str] = deque()  # admitted, waiting for a free decode slot
        self.draining = False
        self._ids = itertools.count()

    # ---- admission ----------------------------------------------------------------------

    def submit(self, client_id: str, msg: P.Generate, sink: Sink) -> str | None:
        """Validate and queue a request; errors go to the sink. Returns the gateway's id."""
        reject = self._rejection()
        if reject:
            sink(P.Error(client_id, *reject))
            return None
        gid = f"g{next(self._ids)}"
        try:
            request = build_request(gid, msg, self.tokenizer, self.limits)
        except ValidationError as e:
            sink(P.Error(client_id, "validation", str(e)))
            return None
        deadline = time.time() + msg.timeout_s if msg.timeout_s else None
        self.streams[gid] = Stream(client_id, request, sink, deadline)
        self.waiting.append(gid)
        self.dispatch()
        return gid

    def _rejection(self) -> tuple[str, str] | None:
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
            decode, prefill = self.registry.pick_decode(), self.registry.pick_prefill()
            if decode is None or prefill is None:
                return
            stream = self.streams[self.waiting.popleft()]
            decode.assigned.add(stream.request.id)  # the reservation, before any prefill work
            prefill.queued_tokens += stream.prompt_tokens
            stream.decode, stream.prefill = decode.id, prefill.id
            transport = self.registry.transport(prefill, decode)
            self.send(prefill, P.Prefill(stream.request, decode.id, decode.info.kv_endpoint, transport,
                                         stream.deadline))

    # ---- cancellation and deadlines -----------------------------------------------------

    def cancel(self, gid: str, reason: str | None = None, error: P.Error | None = None) -> None:
        """End a request from the gateway side (client gone, deadline); workers are told to stop."""
        stream = self.streams.get(gid)
        if stream is None or stream.client_done:
            return
        if error is not None:
            stream.sink(error)
        elif reason is not None:
            stream.sink(P.TokenBatch(stream.client_id, [], reason))
        stream.client_done, stream.closed_at = True, time.monotonic()
        if stream.decode is None:  # never dispatched: nothing holds a reservation
            self.waiting.remove(gid)
            del self.streams[gid]
            return
        for wid in (stream.prefill, stream.decode):
            worker = self.registry.workers.get(wid)
            if worker is not None:
                self.send(worker, P.Cancel(gid))

    def tick(self) -> None:
        """Periodic: dead workers, deadlines, streams whose worker terminal never came."""
        for worker in self.registry.expire():
            self._worker_gone(worker)
        now, mono = time.time(), time.monotonic()
        for gid, s in list(self.streams.items()):
            if s.client_done and mono - s.closed_at > CLOSING_GRACE_S:
                self._release(gid)
            elif not s.client_done and s.deadline is not None and s.deadline < now:
                self.cancel(gid, error=P.Error(s.client_id, "timeout", "the request's deadline passed"))
        self.dispatch()

    def _worker_gone(self, worker: Worker) -> None:
        for gid, s in list(self.streams.items()):
            lost = s.decode == worker.id or (s.prefill == worker.id and s.awaiting_first)
            if lost:
                if not s.client_done:
                    s.sink(P.Error(s.client_id, "generation", f"{worker.info.role} worker {worker.id} stopped responding"))
                self._release(gid)
                other = self.registry.workers.get(s.prefill if s.decode == worker.id else s.decode)
                if other is not None:
                    self.send(other, P.Cancel(gid))

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
        self._deliver(worker, msg.id, msg.token, msg.finish_reason)

    def _prefilled(self, stream: Stream) -> None:
        if stream.awaiting_first:
            stream.awaiting_first = False
            prefill = self.registry.workers.get(stream.prefill)
            if prefill is not None:
                prefill.queued_tokens -= stream.prompt_tokens

    def _on_finished(self, msg: P.Finished) -> None:
        stream = self.streams.get(msg.id)
        if stream is None:
            return
        if not stream.client_done:
            self._flush(stream)
            if msg.reason == "timeout":
                stream.sink(P.Error(stream.client_id, "timeout", "the request's deadline passed"))
            else:
                stream.sink(P.TokenBatch(stream.client_id, [], msg.reason))
        self._release(msg.id)

    def _deliver(self, worker: Worker, gid: str, token: P.Token, finish: str | None) -> None:
        stream = self.streams.get(gid)
        if stream is None:
            if worker.info.role == "decode":  # a request we no longer know: free its slot
                self.send(worker, P.Cancel(gid))
            return
        if stream.client_done:
            if finish is not None:
                self._release(gid)
            return
        if token.index >= stream.next_index and token.index not in stream.pending:
            stream.pending[token.index] = (token, finish)
        if self._flush(stream):
            self._release(gid)

    def _flush(self, stream: Stream) -> bool:
        """Send the tokens that are next in order; True once the final one has gone out."""
        tokens, finish = [], None
        while stream.next_index in stream.pending and finish is None:
            token, finish = stream.pending.pop(stream.next_index)
            tokens.append(token)
            stream.next_index += 1
        if tokens:
            first = tokens[0].index == 0
            stream.sink(P.TokenBatch(
                stream.client_id, tokens, finish, prompt_tokens=stream.prompt_tokens if first else 0,
                seed=stream.request.sampling.seed if stream.request.sampling.do_sample else None,
                prompt_logprobs=stream.prompt_logprobs if first else None,
            ))
        if finish is not None:
            stream.client_done = True
        return finish is not None

    def _release(self, gid: str) -> None:
        stream = self.streams.pop(gid, None)
        if stream is None:
            return
        self._prefilled(stream)
        decode = self.registry.workers.get(stream.decode)
        if decode is not None:
            decode.assigned.discard(gid)
        self.dispatch()
