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
class Expectations:
    """What every worker must agree on with the gateway."""

    fingerprint: str
    max_total_tokens: int


def refusal(reg: P.Register, want: Expectations, dtype: str | None) -> str:
    """Why a registering worker cannot join, or "" when it can."""
    if reg.protocol != P.PROTOCOL_VERSION:
        return f"protocol version {reg.protocol}, the gateway speaks {P.PROTOCOL_VERSION}"
    if reg.role not in ("prefill", "decode"):
        return f"unknown role {reg.role!r}"
    if reg.model_fingerprint != want.fingerprint:
        return f"model fingerprint {reg.model_fingerprint} differs from the gateway's {want.fingerprint} (another model?)"
    if dtype is not None and reg.dtype != dtype:
        return f"dtype {reg.dtype} differs from the other workers' {dtype}"
    if reg.role == "decode" and reg.slot_len != want.max_total_tokens:
        return f"slot length {reg.slot_len} differs from the gateway's max_total_tokens {want.max_total_tokens}"
    if reg.role == "prefill" and reg.capacity < want.max_total_tokens:
        return f"prefill budget {reg.capacity} is below max_total_tokens {want.max_total_tokens}"
    return ""


def choose_transport(flag: str, prefill: P.Register, decode: P.Register) -> str:
    """The fastest transport both sides offer and the topology allows (DESIGN §2)."""
    same_host = prefill.host_id == decode.host_id
    candidates = [flag] if flag != "auto" else ["cuda_ipc", "shm", "tcp"]
    for t in candidates:
        if t not in prefill.kv_transports or t not in decode.kv_transports:
            continue
        if t == "cuda_ipc" and not (same_host and prefill.pid_namespace == decode.pid_namespace
                                    and _prefill_gpu_visible(prefill, decode)):
            continue
        if t == "shm" and not same_host:
            continue
        return t
    return "tcp"


def _prefill_gpu_visible(prefill: P.Register, decode: P.Register) -> bool:
    return bool(prefill.gpu_uuids) and prefill.gpu_uuids[0] in decode.gpu_uuids


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

    def pick_decode(self) -> Worker | None:
        candidates = [w for w in self.of_role("decode") if w.free_slots > 0]
        return max(candidates, key=lambda w: w.free_slots, default=None)

    def pick_prefill(self) -> Worker | None:
        return min(self.of_role("prefill"), key=lambda w: w.queued_tokens, default=None)

    def transport(self, prefill: Worker, decode: Worker) -> str:
        return choose_transport(self.transport_flag, prefill.info, decode.info)
