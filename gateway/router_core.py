"""The router's books, independent of sockets: the frontends and workers it knows, the attempts it
admitted, decode slot reservations made before any prefill work, routing, and every path that
frees a reservation (a worker's end, a cancel, a worker's or a frontend's death).

The router never sees a token. Frontends admit attempts and cancel them; workers report each
attempt's end (Prefilled, Finished, WorkerError) and stream its tokens to the frontend it names.
An attempt whose worker dies is freed here and reported Lost to its frontend, which knows what its
client already has and admits the rest as a new attempt.

A restarted router starts with empty books and rebuilds them: workers register with what they
hold (adopted here), frontends say hello with the attempts they still stream (claimed). Adopted
work that no frontend claims is cancelled; claimed work that no worker holds is reported Lost.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from splitserve.common import protocol as P
from splitserve.common.prefix_blocks import block_hashes
from splitserve.common.request import GenerateRequest

from .workers import NoTransport, Worker, WorkerRegistry

log = logging.getLogger(__name__)

CLOSING_GRACE_S = 120.0  # how long a cancelled attempt waits for its worker's end before it is freed
# Ends that carry no token: the router tells the attempt's frontend (the others come with the last token).
TOKENLESS_ENDS = frozenset({"cancelled", "timeout"})


@dataclass
class Frontend:
    id: str
    identity: bytes  # its link's ROUTER identity
    token_endpoint: str
    zmq_endpoint: str
    last_seen: float
    draining: bool = False  # shutting down: its streams run to their end, and no client is sent to it


@dataclass
class Attempt:
    id: str
    frontend: str | None  # None: adopted from a worker and not yet claimed by a frontend
    request: GenerateRequest | None  # None when adopted: it is never dispatched again
    deadline: float | None = None
    prefill: str | None = None
    decode: str | None = None
    # not yet Prefilled: its prompt counts in the prefill worker's queue, and that worker's death loses it
    at_prefill: bool = True
    queued_tokens: int = 0  # what it adds to that queue (0 for a fork)
    # OpenAI's `n`: attempts with one prompt share one prefill; while waiting the leader holds the others
    forks: list[str] = field(default_factory=list)
    hashes: dict[int, list[bytes]] = field(default_factory=dict)  # the prompt's blocks by block size
    namespace: bytes = b""  # of those blocks, as its frontend named it (prefix_blocks.block_namespace)
    closed_at: float = 0.0  # when its frontend let go (cancel, death): only the worker's end is awaited
    adopted_at: float = 0.0

    def block_hashes(self, block_tokens: int) -> list[bytes]:
        if block_tokens not in self.hashes:
            self.hashes[block_tokens] = block_hashes(self.request.prompt_ids, block_tokens, self.namespace)
        return self.hashes[block_tokens]


class RouterCore:
    def __init__(self, registry: WorkerRegistry, send_worker: Callable[[Worker, object], None],
                 send_frontend: Callable[[Frontend, object], None], max_concurrent: int, heartbeat_timeout: float,
                 fingerprint: str, restart_wait: float = 0.0):
        self.registry, self.send_worker, self.send_frontend = registry, send_worker, send_frontend
        self.max_concurrent, self.timeout, self.fingerprint = max_concurrent, heartbeat_timeout, fingerprint
        self.frontends: dict[str, Frontend] = {}
        self.attempts: dict[str, Attempt] = {}  # changed only through _add, _remove, _close and _claim
        # attempts admitted and not let go, by frontend: each admission checks the total
        self.open: dict[str, int] = {}
        self.open_total = 0
        self.waiting: deque[str] = deque()  # leaders admitted, waiting for a free decode slot
        self.claims: dict[str, tuple[str, float]] = {}  # attempt -> (frontend, when): streamed, not (yet) held
        self.draining = False
        self.started = time.monotonic()
        # long enough for every worker and frontend to come back to a new router
        self.settle = 2 * heartbeat_timeout
        self.unstaffed_since: float | None = None  # since when a role has had no worker taking work
        # how long what a role's last worker ran waits for one started again (--worker-restart-timeout)
        self.restart_wait = max(self.settle, restart_wait)

    # ---- frontends ----------------------------------------------------------------------

    def hello(self, identity: bytes, msg: P.Hello) -> str:
        """A frontend joins (or joins again); returns the reason for refusing it, or ""."""
        if msg.protocol != P.PROTOCOL_VERSION:
            return f"protocol version {msg.protocol}, the router speaks {P.PROTOCOL_VERSION}"
        if msg.model_fingerprint != self.fingerprint:
            return f"model fingerprint {msg.model_fingerprint} differs from the router's {self.fingerprint}"
        self.frontends[msg.frontend_id] = Frontend(msg.frontend_id, identity, msg.token_endpoint, msg.zmq_endpoint,
                                                   time.monotonic())
        now = time.monotonic()
        for attempt_id in msg.live:
            attempt = self.attempts.get(attempt_id)
            if attempt is None:
                self.claims[attempt_id] = (msg.frontend_id, now)
            elif attempt.frontend is None:
                self._claim(attempt, msg.frontend_id)
        log.info("frontend %s joined (clients at %s)", msg.frontend_id, msg.zmq_endpoint)
        return ""

    def seen_frontend(self, identity: bytes) -> Frontend | None:
        front = next((f for f in self.frontends.values() if f.identity == identity), None)
        if front is not None:
            front.last_seen = time.monotonic()
        return front

    def frontend_left(self, front: Frontend) -> None:
        """Its clients are gone with it: their attempts stop and free what they hold."""
        self.frontends.pop(front.id, None)
        for attempt in [a for a in self.attempts.values() if a.frontend == front.id]:
            self.cancel(attempt.id)

    def live(self, frontend: str | None = None) -> int:
        """Attempts admitted and not let go (of one frontend, or of all)."""
        return self.open_total if frontend is None else self.open.get(frontend, 0)

    # The open counts follow every change of an attempt's state, here alone: counting them over
    # the books instead cost ~25 µs per admission at a thousand attempts in flight.

    @staticmethod
    def _is_open(a: Attempt) -> bool:
        return not a.closed_at and a.frontend is not None

    def _count(self, a: Attempt, step: int) -> None:
        if self._is_open(a):
            n = self.open.get(a.frontend, 0) + step
            if n:
                self.open[a.frontend] = n
            else:
                del self.open[a.frontend]
            self.open_total += step

    def _add(self, a: Attempt) -> None:
        self.attempts[a.id] = a
        self._count(a, 1)

    def _remove(self, attempt_id: str) -> Attempt | None:
        a = self.attempts.pop(attempt_id, None)
        if a is not None:
            self._count(a, -1)
        return a

    def _close(self, a: Attempt) -> None:
        self._count(a, -1)
        a.closed_at = time.monotonic()

    def _claim(self, a: Attempt, frontend: str) -> None:
        a.frontend = frontend
        self._count(a, 1)

    def client_endpoints(self) -> list[str]:
        """The ZMQ client ports of the frontends that take new requests (/info's zmq_endpoints)."""
        return sorted(f.zmq_endpoint for f in self.frontends.values() if not f.draining)

    def fleet(self, front: Frontend) -> P.Fleet:
        """What `front` reads: in_flight counts the other frontends' attempts (it knows its own)."""
        workers = self.registry.workers.values()
        return P.Fleet(
            prefill_workers=len(self.registry.of_role("prefill")), decode_workers=len(self.registry.of_role("decode")),
            draining=self.draining, in_flight=self.live() - self.live(front.id), max_concurrent=self.max_concurrent,
            zmq_endpoints=self.client_endpoints(),
            block_sizes=sorted({w.info.prefix_block_tokens for w in self.registry.of_role("prefill")
                                if w.info.prefix_blocks}),
            dtype=self.registry.dtype, device=next((w.info.device for w in workers), None), starting=self.starting())

    # ---- admission ----------------------------------------------------------------------

    def starting(self) -> bool:
        """Whether workers may be registering yet: this router started lately (a restarted
        router's come back), or a role lost its last worker lately (serve starts it again)."""
        now = time.monotonic()
        return now - self.started < self.settle or (
            self.unstaffed_since is not None and now - self.unstaffed_since < self.restart_wait)

    def _unstaffed(self) -> list[str]:
        """The roles without a worker taking work, noting since when one has been so."""
        missing = [r for r in ("prefill", "decode") if not self.registry.of_role(r)]
        self.unstaffed_since = (self.unstaffed_since or time.monotonic()) if missing else None
        return missing

    def rejection(self, extra: int = 0, resume: bool = False) -> tuple[str, str] | None:
        """(error type, message) of the refusal `extra` more attempts would get now, or None. A
        resumed attempt was admitted long ago: only a missing worker stops it. While starting, a
        missing worker stops nothing: the attempt waits for one (the frontends let through only
        what they or their clients resume: see P.Fleet.starting), up to --worker-restart-timeout,
        at least the settle time (tick)."""
        if self.draining and not resume:
            return "unavailable", "the server is shutting down"
        for role in ("prefill", "decode"):
            if not self.registry.of_role(role) and not self.starting():
                return "unavailable", f"no {role} worker is available"
        live = self.live()
        if not resume and live + extra > self.max_concurrent:
            return "overloaded", f"{live} requests in flight; the limit is {self.max_concurrent} (max_concurrent_requests)"
        return None

    def admit(self, front: Frontend, msg: P.Admit) -> None:
        ids = [r.id for r in msg.requests]
        reject = self.rejection(len(ids), msg.resume) if ids else None
        if reject:
            self.send_frontend(front, P.Refused(ids, *reject))
            return
        attempts = [Attempt(r.id, front.id, r, msg.deadline, hashes=msg.hashes, namespace=msg.namespace)
                    for r in msg.requests if r.id not in self.attempts]
        for a in attempts:
            self._add(a)
            self.claims.pop(a.id, None)
        # a group must fit one decode worker's slots, or it would wait forever (none known yet: one each)
        size = max((w.info.capacity for w in self.registry.of_role("decode")), default=1)
        groups = [attempts[i:i + size] for i in range(0, len(attempts), size)]
        for group in groups if not msg.resume else reversed(groups):
            group[0].forks = [a.id for a in group[1:]]
            (self.waiting.appendleft if msg.resume else self.waiting.append)(group[0].id)
        self.dispatch()

    def dispatch(self) -> None:
        """Send waiting attempts to prefill while some decode worker has a free slot."""
        while self.waiting:
            leader = self.attempts.get(self.waiting[0])
            if leader is None:
                self.waiting.popleft()
                continue
            group = self._group(leader)
            request = leader.request
            try:
                # a prompt whose logprobs need every position computed, or whose client asked for no
                # cached prefix (cache_prompt), meets none: no worker holds it
                hashes = (lambda _: []) if request.prompt_logprobs or not request.cache_prompt else leader.block_hashes
                route = self.registry.route(len(group), len(request.prompt_ids), hashes)
            except NoTransport as e:  # the workers that have room cannot hand KV to each other
                log.error("%s", e)
                self.waiting.popleft()
                self._refuse(group, "unavailable", str(e))
                continue
            if route is None:
                return
            self.waiting.popleft()
            leader.forks = []
            leader.queued_tokens = route.compute
            route.prefill.queued_tokens += route.compute
            route.prefill.remember(route.hashes)
            for a in group:
                route.decode.assigned.add(a.id)  # the reservation, before any prefill work
                a.decode, a.prefill = route.decode.id, route.prefill.id
            decode = route.decode.info
            self.send_worker(route.prefill, P.Prefill(request, decode.worker_id, decode.kv_endpoint, route.transport,
                                                      leader.deadline, [a.request for a in group[1:]],
                                                      decode.kv_public_key))

    def _group(self, leader: Attempt) -> list[Attempt]:
        """A waiting leader and the forks still with it (OpenAI's `n`: one prefill for all)."""
        return [leader, *(self.attempts[a] for a in leader.forks if a in self.attempts)]

    def _refuse_waiting(self, error_type: str, message: str) -> None:
        while self.waiting:
            leader = self.attempts.get(self.waiting.popleft())
            if leader is not None:
                self._refuse(self._group(leader), error_type, message)

    def _refuse(self, attempts: list[Attempt], error_type: str, message: str) -> None:
        for a in attempts:
            self._remove(a.id)
        by_front: dict[str, list[str]] = {}
        for a in attempts:
            by_front.setdefault(a.frontend, []).append(a.id)
        for fid, ids in by_front.items():
            if fid in self.frontends:
                self.send_frontend(self.frontends[fid], P.Refused(ids, error_type, message))

    # ---- ends -----------------------------------------------------------------------------

    def on_frontend(self, front: Frontend, msg) -> None:
        """A joined frontend's Admit, Cancel, Done or Heartbeat."""
        if isinstance(msg, P.Heartbeat):
            front.draining = msg.draining
        elif isinstance(msg, P.Admit):
            self.admit(front, msg)
        elif isinstance(msg, P.Cancel):
            self.cancel(msg.id)
        elif isinstance(msg, P.Done):
            self.done(msg.id)

    def done(self, attempt_id: str) -> None:
        """Its client has the last token: only the worker's end is awaited (it may have come already)."""
        attempt = self.attempts.get(attempt_id)
        if attempt is not None and not attempt.closed_at:
            self._close(attempt)

    def cancel(self, attempt_id: str) -> None:
        """The frontend let go (its client left, a deadline passed): workers are told to stop, and
        the reservation is held until their end arrives."""
        attempt = self.attempts.get(attempt_id)
        if attempt is None or attempt.closed_at:
            return
        if attempt.decode is None:  # still waiting: nothing holds a reservation
            self._leave_queue(attempt)
            self._remove(attempt_id)
            return
        self._close(attempt)
        self._cancel_at_workers(attempt)

    def _leave_queue(self, attempt: Attempt) -> None:
        """Take a waiting attempt out of line; its first fork, if any, takes its place."""
        if attempt.id not in self.waiting:  # a fork: its leader holds it
            for leader in self.attempts.values():
                if attempt.id in leader.forks:
                    leader.forks.remove(attempt.id)
            return
        place = self.waiting.index(attempt.id)
        if not attempt.forks:
            del self.waiting[place]
            return
        heir = self.attempts[attempt.forks[0]]
        heir.forks = attempt.forks[1:]
        self.waiting[place] = heir.id

    def _cancel_at_workers(self, attempt: Attempt) -> None:
        for worker_id in (attempt.prefill, attempt.decode):
            worker = self.registry.workers.get(worker_id)
            if worker is not None:
                self.send_worker(worker, P.Cancel(attempt.id))

    def on_worker(self, worker: Worker, msg) -> None:
        attempt = self.attempts.get(msg.id)
        if attempt is None:  # freed already (its worker was taken for dead, a cancel's grace ran out)
            return
        front = self.frontends.get(attempt.frontend) if not attempt.closed_at else None
        if isinstance(msg, P.Prefilled):
            self._prefilled(attempt)
            if msg.finish_reason is not None:
                self.release(msg.id)
        elif isinstance(msg, P.Finished):
            if msg.reason == "shutdown":  # a draining worker hands back what it could not finish in time
                self.lost(msg.id, "a worker shut down before finishing it")
                return
            if front is not None and msg.reason in TOKENLESS_ENDS:
                self.send_frontend(front, msg)
            self.release(msg.id)
        elif isinstance(msg, P.WorkerError):
            if front is not None:
                self.send_frontend(front, msg)
            self.release(msg.id)

    def _prefilled(self, attempt: Attempt) -> None:
        if attempt.at_prefill:
            attempt.at_prefill = False
            prefill = self.registry.workers.get(attempt.prefill)
            if prefill is not None:
                prefill.queued_tokens -= attempt.queued_tokens

    def release(self, attempt_id: str) -> None:
        attempt = self._remove(attempt_id)
        if attempt is None:
            return
        self._prefilled(attempt)
        decode = self.registry.workers.get(attempt.decode)
        if decode is not None:
            decode.assigned.discard(attempt_id)
        self.dispatch()

    def lost(self, attempt_id: str, why: str) -> None:
        """Its worker is gone: the survivor of the pair frees what it holds, the frontend resumes it."""
        attempt = self.attempts.get(attempt_id)
        if attempt is None:
            return
        self._cancel_at_workers(attempt)
        front = self.frontends.get(attempt.frontend) if not attempt.closed_at else None
        self.release(attempt_id)
        if front is not None:
            self.send_frontend(front, P.Lost(attempt_id, why))

    # ---- workers ------------------------------------------------------------------------------

    def registered(self, worker: Worker, holding: list[P.Held]) -> None:
        """A worker (re)joined: its reservations stand, and what it holds that these books do not
        (a restarted router, a worker that was taken for dead) is adopted. Once this router has
        settled, what a worker holds that these books do not and no frontend claims was freed here
        already (its worker taken for dead, its end heard): nobody streams it, and it is cancelled
        at once, its reservation held until the workers' end says it is free."""
        now = time.monotonic()
        if worker.info.role == "decode":
            worker.assigned.update(a.id for a in self.attempts.values() if a.decode == worker.id)
        stale = []
        for held in holding:
            attempt = self.attempts.get(held.id)
            if attempt is None:
                claim = self.claims.pop(held.id, None)
                attempt = Attempt(held.id, claim[0] if claim else None, None, decode=held.decode_worker,
                                  at_prefill=False, adopted_at=now)
                self._add(attempt)
                if claim is None and now - self.started > self.settle:
                    stale.append(attempt.id)
            if worker.info.role == "prefill" and not attempt.at_prefill:
                attempt.prefill, attempt.at_prefill, attempt.queued_tokens = worker.id, True, held.queued_tokens
                worker.queued_tokens += held.queued_tokens
            decode = self.registry.workers.get(held.decode_worker)
            if decode is not None:
                decode.assigned.add(held.id)
        if stale:
            log.info("%s worker %s holds %d requests freed here already: cancelled", worker.info.role, worker.id,
                     len(stale))
        for attempt_id in stale:
            self.cancel(attempt_id)
        self.dispatch()

    def worker_left(self, worker: Worker, how: str = "stopped responding") -> None:
        """A worker is gone (silent past its heartbeat timeout, or it said goodbye): its unfinished
        work is lost, and resumes; on a worker started again in its place, should it be the last
        of its role (see starting)."""
        self._unstaffed()
        for attempt in list(self.attempts.values()):
            if attempt.decode == worker.id or (attempt.prefill == worker.id and attempt.at_prefill):
                self.lost(attempt.id, f"{worker.info.role} worker {worker.id} {how}")

    # ---- time -----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Periodic: dead workers and frontends, unclaimed adoptions, unheld claims, stale cancels,
        and work that can no longer start (a role without workers)."""
        for worker in self.registry.expire():
            self.worker_left(worker)
        now = time.monotonic()
        missing = self._unstaffed()
        if self.waiting and missing:
            # Every worker of a role drains or is gone: what waits would wait for good, and a request
            # without a deadline never end (in a drain, it would hold its frontend's drain until its
            # timeout). Out of a drain, one that comes (back) within --worker-restart-timeout, at
            # least the settle time (started again, or registering with a router just started), takes it.
            if self.draining:
                self._refuse_waiting("unavailable", "the server shut down before the request could start")
            elif now - self.unstaffed_since >= self.restart_wait:
                self._refuse_waiting("unavailable", f"no {missing[0]} worker is available")
        for front in [f for f in self.frontends.values() if now - f.last_seen > self.timeout]:
            if front.draining and not self.live(front.id):
                log.info("frontend %s drained and left", front.id)
            else:
                log.warning("frontend %s silent for %.1f s: its requests are cancelled", front.id,
                            now - front.last_seen)
            self.frontend_left(front)
        for attempt in list(self.attempts.values()):
            if attempt.closed_at and now - attempt.closed_at > CLOSING_GRACE_S:
                self.release(attempt.id)
            elif attempt.frontend is None and not attempt.closed_at and now - attempt.adopted_at > self.settle:
                self.cancel(attempt.id)  # no frontend streams it: nobody reads its tokens
        for attempt_id, (fid, since) in list(self.claims.items()):
            if now - since > self.settle:
                del self.claims[attempt_id]
                if fid in self.frontends:
                    self.send_frontend(self.frontends[fid], P.Lost(attempt_id, "the router restarted"))
        self.dispatch()
