"""What the gateway knows of its workers: registration checks, liveness, routing, reservations."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from splitserve.common import protocol as P

log = logging.getLogger(__name__)


@dataclass
class Worker:
    info: P.Register
    identity: bytes  # the ROUTER identity of its link socket
    last_seen: float
    draining: bool = False
    assigned: set[str] = field(default_factory=set)  # decode: requests holding a reservation
    queued_tokens: int = 0  # prefill: prompt tokens sent and not yet prefilled

    @property
    def id(self) -> str:
        return self.info.worker_id

    @property
    def free_slots(self) -> int:
        return self.info.capacity - len(self.assigned)


@dataclass(frozen=True)
class Route:
    prefill: Worker
    decode: Worker
    transport: P.Transport


@dataclass(frozen=True)
class Expectations:
    """What every worker must agree on with the gateway."""

    fingerprint: str
    max_total_tokens: int


def refusal(reg: P.Register, want: Expectations, dtype: str | None) -> str:
    """Why a registering worker cannot join, or "" when it can."""
    if reg.protocol != P.PROTOCOL_VERSION:
        return f"protocol version {reg.protocol}, the gateway speaks {P.PROTOCOL_VERSION}"
    if reg.model_fingerprint != want.fingerprint:
        return f"model fingerprint {reg.model_fingerprint} differs from the gateway's {want.fingerprint} (another model?)"
    if dtype is not None and reg.dtype != dtype:
        return f"dtype {reg.dtype} differs from the other workers' {dtype}"
    if reg.role == "decode" and reg.slot_len != want.max_total_tokens:
        return f"slot length {reg.slot_len} differs from the gateway's max_total_tokens {want.max_total_tokens}"
    if reg.role == "prefill" and reg.capacity < want.max_total_tokens:
        return f"prefill budget {reg.capacity} is below max_total_tokens {want.max_total_tokens}"
    return ""


class NoTransport(ValueError):
    """No transport that may be used can carry KV between two workers; the message names them."""


def transport_between(flag: P.TransportChoice, prefill: P.Register, decode: P.Register) -> P.Transport:
    """The transport KV takes from `prefill` to `decode`: with "auto" the fastest that works between
    the two, else `flag` if it works. An explicit transport that cannot work is never silently
    replaced by another: NoTransport says why."""
    candidates = P.TRANSPORTS if flag == "auto" else (flag,)
    reasons = {t: transport_obstacle(t, prefill, decode) for t in candidates}
    chosen = next((t for t in candidates if reasons[t] is None), None)
    if chosen is None:
        why = "; ".join(f"{t}: {reason}" for t, reason in reasons.items())
        raise NoTransport(f"KV cannot move from prefill worker {prefill.worker_id} to decode worker "
                          f"{decode.worker_id} ({why})")
    return chosen


def transport_obstacle(transport: P.Transport, prefill: P.Register, decode: P.Register) -> str | None:
    """Why `transport` cannot carry KV from `prefill` to `decode`, or None when it can. cuda_ipc
    needs one host, the prefill GPU visible to the decode process and one PID namespace; shm one
    host; tcp only that both offer it."""
    for worker in (prefill, decode):
        if transport not in worker.kv_transports:
            return f"the {worker.role} worker offers {', '.join(worker.kv_transports) or 'nothing'}"
    if transport == "tcp":
        return None
    if prefill.host_id != decode.host_id:
        return f"they run on different hosts ({prefill.host_id} and {decode.host_id})"
    if transport == "cuda_ipc":
        if not prefill.gpu_uuids or prefill.gpu_uuids[0] not in decode.gpu_uuids:
            return "the decode process cannot see the prefill worker's GPU"
        if prefill.pid_namespace != decode.pid_namespace:
            return "they do not share a PID namespace (containers need `pid: host`)"
    return None


class WorkerRegistry:
    def __init__(self, want: Expectations, heartbeat_timeout: float, transport_flag: str = "auto"):
        self.want = want
        self.timeout = heartbeat_timeout
        self.transport_flag = transport_flag
        self.workers: dict[str, Worker] = {}
        self.by_identity: dict[bytes, Worker] = {}
        self.dtype: str | None = None

    def register(self, identity: bytes, reg: P.Register) -> str:
        """Adds or refreshes a worker; returns the reason for refusing it, or ""."""
        reason = refusal(reg, self.want, self.dtype)
        if reason:
            log.error("refused %s worker %s (pid %d): %s", reg.role, reg.worker_id, reg.pid, reason)
            return reason
        self.dtype = reg.dtype
        known = self.workers.get(reg.worker_id)
        if known is not None:  # a reconnect: keep its reservations
            self.by_identity.pop(known.identity, None)
            known.identity, known.info, known.last_seen = identity, reg, time.monotonic()
            self.by_identity[identity] = known
        else:
            worker = Worker(reg, identity, time.monotonic())
            self.workers[reg.worker_id] = self.by_identity[identity] = worker
        log.info("registered %s worker %s (%s, capacity %d)", reg.role, reg.worker_id, reg.device, reg.capacity)
        return ""

    def seen(self, identity: bytes, draining: bool | None = None) -> Worker | None:
        worker = self.by_identity.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
            if draining is not None:
                worker.draining = draining
        return worker

    def forgive(self, seconds: float) -> None:
        """Do not count time the gateway itself was not listening as the workers' silence."""
        for w in self.workers.values():
            w.last_seen += seconds

    def expire(self) -> list[Worker]:
        """Remove and return the workers silent for longer than the heartbeat timeout."""
        now = time.monotonic()
        dead = [w for w in self.workers.values() if now - w.last_seen > self.timeout]
        for w in dead:
            log.warning("%s worker %s silent for %.1f s: removed", w.info.role, w.id, now - w.last_seen)
            del self.workers[w.id]
            self.by_identity.pop(w.identity, None)
        return dead

    def of_role(self, role: str, routable: bool = True) -> list[Worker]:
        return [w for w in self.workers.values() if w.info.role == role and not (routable and w.draining)]

    def route(self, slots: int) -> Route | None:
        """Where a prompt goes: the decode worker with the most free slots (at least `slots`) and the
        prefill worker with the fewest queued tokens among those that can hand KV to it. None while
        every decode worker is full or a role has no worker; NoTransport when workers with room
        exist but no pair of them has a transport that may be used."""
        decodes = sorted((w for w in self.of_role("decode") if w.free_slots >= slots), key=lambda w: -w.free_slots)
        prefills = sorted(self.of_role("prefill"), key=lambda w: w.queued_tokens)
        if not decodes or not prefills:
            return None
        refusals = []
        for decode in decodes:
            for prefill in prefills:
                try:
                    return Route(prefill, decode, transport_between(self.transport_flag, prefill.info, decode.info))
                except NoTransport as e:
                    refusals.append(str(e))
        raise NoTransport("; ".join(refusals))
