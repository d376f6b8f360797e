"""What the gateway knows of its workers: registration checks, liveness, routing, reservations."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
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
    queued_tokens: int = 0  # prefill: prompt tokens to compute, of prompts sent and not yet Prefilled
    # prefill: the block hashes of the prompts sent here, most recent last, as many as its prefix
    # cache holds: what it likely has cached (its own cache evicts in the same order)
    prefixes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    @property
    def id(self) -> str:
        return self.info.worker_id

    @property
    def free_slots(self) -> int:
        return self.info.capacity - len(self.assigned)

    def cached_tokens(self, hashes: list[bytes]) -> int:
        """Of a prompt with these block hashes, the tokens this worker's prefix cache likely holds."""
        blocks = 0
        for h in hashes:
            if h not in self.prefixes:
                break
            blocks += 1
        return blocks * self.info.prefix_block_tokens

    def remember(self, hashes: list[bytes]) -> None:
        """A prompt was sent here: its blocks are now the most recently used, its prefix last."""
        for h in reversed(hashes):
            self.prefixes[h] = None
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > self.info.prefix_blocks:
            self.prefixes.popitem(last=False)


@dataclass(frozen=True)
class Route:
    prefill: Worker
    decode: Worker
    transport: P.Transport
    compute: int  # prompt tokens the prefill worker will compute (those it likely has cached left out)
    hashes: list[bytes]  # the prompt's blocks, in the prefill worker's block size


# (block tokens) -> the prompt's block hashes in that size, computed once per size
Hashes = Callable[[int], list[bytes]]


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
    host; nixl a KV link without CURVE (NIXL does not encrypt); tcp only that both offer it."""
    for worker in (prefill, decode):
        if transport not in worker.kv_transports:
            return f"the {worker.role} worker offers {', '.join(worker.kv_transports) or 'nothing'}"
    if transport == "tcp":
        return None
    if transport == "nixl":
        # workers under CURVE never offer nixl; this holds for any that would
        if decode.kv_public_key:
            return "the KV link is encrypted (CURVE) and NIXL traffic is not"
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
            if reg.pid != known.info.pid or reg.prefix_blocks != known.info.prefix_blocks:
                known.prefixes.clear()  # a new process under the old name: its cache starts empty
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
            self.remove(w)
        return dead

    def remove(self, worker: Worker) -> Worker:
        del self.workers[worker.id]
        self.by_identity.pop(worker.identity, None)
        return worker

    def of_role(self, role: str, routable: bool = True) -> list[Worker]:
        return [w for w in self.workers.values() if w.info.role == role and not (routable and w.draining)]

    def route(self, slots: int, prompt_len: int, hashes: Hashes) -> Route | None:
        """Where a prompt goes: the decode worker with the most free slots (at least `slots`), and
        among the prefill workers that can hand KV to it the one with the least work: its queued
        tokens plus the prompt's tokens it would compute (those its prefix cache likely holds left
        out), so that prompts meet their cached prefixes without one hot file piling up on one
        worker. None while every decode worker is full or a role has no worker; NoTransport when
        workers with room exist but no pair of them has a transport that may be used."""
        decodes = sorted((w for w in self.of_role("decode") if w.free_slots >= slots), key=lambda w: -w.free_slots)
        candidates = []
        for w in self.of_role("prefill"):
            mine = hashes(w.info.prefix_block_tokens) if w.info.prefix_blocks else []
            compute = prompt_len - min(w.cached_tokens(mine), prompt_len - 1)
            candidates.append((w.queued_tokens + compute, compute, mine, w))
        candidates.sort(key=lambda c: c[0])
        if not decodes or not candidates:
            return None
        refusals = []
        for decode in decodes:
            for _, compute, mine, prefill in candidates:
                try:
                    transport = transport_between(self.transport_flag, prefill.info, decode.info)
                except NoTransport as e:
                    refusals.append(str(e))
                    continue
                return Route(prefill, decode, transport, compute, mine)
        raise NoTransport("; ".join(refusals))
