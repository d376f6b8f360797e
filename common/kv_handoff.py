"""The KV handoff from a prefill worker to a decode worker: its sender and its receiver side.

Each side writes only its own memory. The sender (prefill worker) computes each batch's KV into a
region of its staging buffer and sends KvReady to the decode worker the gateway named, over one
DEALER per decode worker; the receiver (decode worker, a ROUTER at its KV endpoint) copies the
region into a slot and answers KvRelease once the copy has completed, and only then is the region
free again. The gateway reserved the slot before prefill began, so a copy never waits for room and
a region is held for the length of one copy. How the bytes move (a CUDA IPC handle, a /dev/shm
file, a one-sided NIXL read, ZMQ frames) is kv_transport.py's.

On nixl the decode worker reads the region straight into the slot, within NIXL_READ_TIMEOUT_S; a
read that fails or runs late is answered with a failed KvRelease, and the sender retries that
handoff once over tcp, then reports the request failed. Staging is released on every path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import zmq

from . import protocol as P
from .curve import CurveKeys
from .service_config import WILDCARD_HOSTS, WorkerOptions
from .kv_transport import KvImporter, NixlAgent, NixlUnavailable, Staging
from .zmq_util import bind_endpoint, make_socket, tcp_endpoint

log = logging.getLogger(__name__)

# A KvRelease that never comes (its decode worker gone) frees the region after this long.
HANDOFF_TIMEOUT_S = 30.0
# A failed copy is tried again once, with the staging's description sent first (a failed nixl read
# over tcp).
HANDOFF_TRIES = 2
# A NIXL read of one prompt's KV that takes longer fails (and the handoff is retried over tcp).
NIXL_READ_TIMEOUT_S = float(os.environ.get("SPLITSERVE_NIXL_READ_TIMEOUT_S", "5"))


def offered_transports(flag: P.TransportChoice, device: torch.device, nixl: bool = False) -> list[P.Transport]:
    """What a worker registers as able to do, fastest first: with --kv-transport auto its device's
    local transport, nixl when it has an agent (`nixl`), and tcp; otherwise the one named (the
    gateway never replaces it)."""
    local: P.Transport = "cuda_ipc" if device.type == "cuda" else "shm"
    if flag == "auto":
        return [local, *(["nixl"] if nixl else []), "tcp"]
    if flag == "nixl" and not nixl:
        raise ValueError("--kv-transport nixl: this worker has no NIXL agent")
    if flag not in ("tcp", "nixl", local):
        raise ValueError(f"--kv-transport {flag} cannot carry KV from {device.type} memory; use {local}, nixl or tcp")
    return [flag]


def nixl_agent_for(opts: WorkerOptions, register: Callable[[NixlAgent], None]) -> NixlAgent | None:
    """The worker's NIXL agent with its memory registered by `register`, or None where it will not
    use nixl: a transport other than nixl or auto named, CURVE on (NIXL does not encrypt), or (with
    auto) NIXL missing or failing to start, which is logged. With --kv-transport nixl a failure is
    an error (NixlUnavailable) that says why. UCX carries the traffic where --host says (or
    --advertise-host, when --host binds every interface)."""
    flag = opts.kv_transport
    if flag not in ("auto", "nixl") or opts.link.curve is not None:
        return None
    host = opts.advertise_host if opts.host in WILDCARD_HOSTS else opts.host
    # a new name for each process: a restarted worker's agent is a new one, its metadata replaces the old
    name = f"{opts.worker_id}-{os.getpid()}-{os.urandom(4).hex()}"
    agent = None
    try:
        # only the side read from needs UCX progressed for it; a reader progresses its own reads
        agent = NixlAgent(name, host, progress_thread=opts.role == "prefill")
        register(agent)
        return agent
    except NixlUnavailable as e:
        if agent is not None:
            agent.close()
        if flag == "nixl":
            raise
        log.info("KV over nixl is off: %s", e)
        return None


# ---- sender (prefill worker) ---------------------------------------------------------------------


class StagingRegions:
    """First-fit token ranges [offset, offset + n) of the staging buffer, each held from prefill
    until every request sharing it (OpenAI's `n` choices share one prompt's KV) is done with it."""

    def __init__(self, total: int):
        self.total = total
        self._free: list[tuple[int, int]] = [(0, total)]  # sorted, coalesced (offset, length)
        self._users: dict[int, int] = {}  # offset -> requests sharing that region, when more than one

    @property
    def free_tokens(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def used_tokens(self) -> int:
        return self.total - self.free_tokens

    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def alloc(self, n: int) -> int | None:
        for i, (off, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (off + n, length - n)
                return off
        return None

    def share(self, offset: int, users: int) -> None:
        """The region at `offset` is released once by each of `users` requests."""
        if users > 1:
            self._users[offset] = users

    def release(self, offset: int, n: int) -> None:
        """One request is done with the region; it is free once every sharer is."""
        users = self._users.pop(offset, 1) - 1
        if users:
            self._users[offset] = users
        else:
            self.free(offset, n)

    def free(self, offset: int, n: int) -> None:
        if n <= 0:
            return
        regions = sorted(self._free + [(offset, n)])
        merged = [regions[0]]
        for off, length in regions[1:]:
            last_off, last_len = merged[-1]
            if off < last_off + last_len:
                raise ValueError(f"region [{offset}, {offset + n}) freed twice")
            if off == last_off + last_len:
                merged[-1] = (last_off, last_len + length)
            else:
                merged.append((off, length))
        self._free = merged


class Handed(NamedTuple):
    """A handoff the decode worker has completed: its KV is in a slot and its region is free."""

    id: str  # the request's
    nbytes: int
    seconds: float  # from its KvReady to the release
    transport: P.Transport


@dataclass
class Handoff:
    ready: P.KvReady
    decode_worker: str  # its id, for a restarted router's books (Held)
    decode_endpoint: str
    decode_key: str
    sent_at: float = 0.0
    tries: int = 0


class KvSender:
    """Hands prefilled KV to decode workers and frees each staging region when it is released.

    Failures come back from `receive` and `expire` as (request id, message) for the worker to report:
    a copy that failed twice, or a release that never came."""

    def __init__(self, ctx: zmq.Context, staging: Staging, worker_id: str, curve: CurveKeys | None,
                 keys: tuple[int, ...] = ()):
        """keys: per layer, the most keys of a prompt the decode side keeps (model.layer_keys: a
        windowed layer's ring); empty: all of them. Over tcp a layer sends no more."""
        self.ctx, self.staging, self.worker_id, self.curve = ctx, staging, worker_id, curve
        self.regions = StagingRegions(staging.tensor.shape[2])
        self.n_layer = staging.tensor.shape[0]
        self.key_bytes = staging.tensor[0, :, :1].numel() * staging.tensor.element_size()  # a layer's K/V of a token
        self.keys = keys
        self.handoffs: dict[str, Handoff] = {}
        self._socks: dict[str, tuple[str, zmq.Socket]] = {}  # decode endpoint -> (its key, our socket)
        self.sockets_made = 0  # so that a poller follows a socket replaced at the same endpoint
        self._decoder = P.decoder(P.KvRelease)

    @property
    def sockets(self) -> list[zmq.Socket]:
        return [sock for _, sock in self._socks.values()]

    def send(self, job: P.Prefill, request, first_token: int, first_text: str, offset: int, length: int) -> None:
        """Hand the KV of `request` (staging[offset : offset + length]) to the job's decode worker."""
        key = self.staging.key_for(job.transport)
        ready = P.KvReady(request, first_token, first_text, P.KvLocation(offset, length, key), job.transport,
                          self.worker_id, job.deadline)
        self.handoffs[request.id] = h = Handoff(ready, job.decode_worker, job.decode_endpoint, job.decode_key)
        self._send(h)

    def _send(self, h: Handoff) -> None:
        sock = self._socket(h.decode_endpoint, h.decode_key)
        loc, frames = h.ready.location, []
        if h.ready.transport == "tcp":
            h.ready.kept = self.kept(loc.length)
            frames = self.staging.frames(loc.offset, loc.length, h.ready.kept)
        sock.send_multipart([P.encode(h.ready), *frames], copy=False)
        h.sent_at, h.tries = time.monotonic(), h.tries + 1

    def _socket(self, endpoint: str, server_key: str) -> zmq.Socket:
        """One socket per decode worker, CURVE-encrypted when the worker gave a key. A worker
        restarted at the same address with a new key gets a new socket (the old one could never
        complete a handshake again)."""
        known = self._socks.get(endpoint)
        if known is not None and known[0] == server_key:
            return known[1]
        if known is not None:
            known[1].close(0)
        curve = None
        if server_key:
            # a socket of ours needs a key pair of its own to be a CURVE client
            public, secret = (self.curve.public, self.curve.secret) if self.curve is not None else zmq.curve_keypair()
            curve = CurveKeys(public, secret, server=server_key.encode())
        sock = make_socket(self.ctx, zmq.DEALER, P.MAX_CONTROL_BYTES, curve=curve)
        sock.connect(endpoint)
        self._send_staging(sock)
        self._socks[endpoint] = server_key, sock
        self.sockets_made += 1
        return sock

    def _send_staging(self, sock: zmq.Socket) -> None:
        """Ordered before any KvReady on the connection, so the decode side can open staging.
        Every description goes (native, nixl, tcp): a decode worker on another host cannot open
        the native one (its open fails and is logged there) and reads over nixl or receives the
        KV as frames instead."""
        for desc in self.staging.exports():
            sock.send(P.encode(P.KvStaging(self.worker_id, desc)))

    def receive(self, sock: zmq.Socket) -> tuple[list[tuple[str, str]], list[Handed]]:
        """Every release waiting on `sock`: (failed handoffs as (request id, message), completed ones)."""
        failed, done = [], []
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return failed, done
            try:
                msg = P.decode(self._decoder, frames[0])
            except P.DecodeError as e:
                log.warning("dropped a malformed KV-link frame: %s", e)
                continue
            h = self.handoffs.get(msg.id)
            if h is None or h.ready.location.offset != msg.offset:
                continue
            if msg.ok:
                keys = sum(h.ready.kept) or h.ready.location.length * self.n_layer
                done.append(Handed(msg.id, keys * self.key_bytes, time.monotonic() - h.sent_at, h.ready.transport))
                self._end(msg.id)
            elif h.tries < HANDOFF_TRIES:
                if h.ready.transport == "nixl":  # a failed or late read: the frames go over the KV link instead
                    log.warning("nixl handoff of %s failed (%s); retrying once over tcp", msg.id, msg.message)
                    loc = h.ready.location
                    h.ready.transport, h.ready.location = "tcp", P.KvLocation(loc.offset, loc.length,
                                                                               self.staging.tcp_key)
                else:
                    log.warning("handoff of %s failed (%s); retrying once", msg.id, msg.message)
                self._send_staging(sock)
                self._send(h)
            else:
                failed.append((msg.id, f"KV handoff failed twice: {msg.message}"))
                self._end(msg.id)

    def kept(self, n: int) -> tuple[int, ...]:
        """The tokens of each layer's K/V a tcp handoff of a prompt of n sends: its last keys[l], where
        that is fewer; () when every layer sends all n."""
        kept = tuple(min(n, k) for k in self.keys)
        return kept if any(k < n for k in kept) else ()

    def drop(self, rid: str) -> bool:
        """Let go of the KV handed off for `rid` (cancelled: its client left, or its decode worker
        died before taking it): its staging serves other prompts at once. A decode worker still
        reading it reads garbage into the slot of a request it is about to drop; no other request's
        KV is touched. -> whether there was one."""
        if rid not in self.handoffs:
            return False
        self._end(rid)
        return True

    def expire(self) -> list[tuple[str, str]]:
        """End the handoffs whose release is overdue (the decode worker is gone)."""
        now = time.monotonic()
        late = [rid for rid, h in self.handoffs.items() if now - h.sent_at > HANDOFF_TIMEOUT_S]
        for rid in late:
            self._end(rid)
        return [(rid, "the decode worker did not take the KV in time") for rid in late]

    def _end(self, rid: str) -> None:
        loc = self.handoffs.pop(rid).ready.location
        self.regions.release(loc.offset, loc.length)

    def close(self) -> None:
        for _, sock in self._socks.values():
            sock.close(0)
        self.staging.close()


# ---- receiver (decode worker) ----------------------------------------------------------------------


@dataclass
class Arrival:
    """A prompt's KV, ready to copy into a slot; answer it with KvReceiver.copied or .answer."""

    peer: bytes  # the sender's socket
    ready: P.KvReady
    frames: list  # the KV itself on tcp
    received: float  # time.perf_counter() when it came


class KvReceiver:
    """The decode worker's KV endpoint: opens each sender's staging once and hands out the KV of one
    prompt at a time. A copy into a slot is released once it has completed (`send_releases`): on a
    GPU the copy runs on the stream, and an event after the latest one tells when, so that an
    admission never waits for its copy (the step's own sync, or a later loop turn, sees it done)."""

    def __init__(self, ctx: zmq.Context, host: str, port: int, advertise_host: str, curve: CurveKeys | None,
                 device: torch.device, dtype: torch.dtype, nixl: NixlAgent | None = None):
        """`nixl`: this worker's agent, its KV pool registered already, for reads over nixl."""
        self.device = device
        self.importer = KvImporter(device, dtype, nixl)
        self.curve = curve
        self.sock = make_socket(ctx, zmq.ROUTER, P.MAX_KV_BYTES, curve=curve)
        self.endpoint = tcp_endpoint(advertise_host, bind_endpoint(self.sock, host, port))
        self._decoder = P.decoder(P.KvToDecode)
        self._unreleased: list[Arrival] = []  # copied, or copying, into a slot
        # completes once every copy queued so far has: the stream runs them in order
        self._copies_done = torch.cuda.Event() if device.type == "cuda" else None

    @property
    def public_key(self) -> str:
        """What senders need to reach this endpoint under CURVE ("": it is plain)."""
        return self.curve.public.decode() if self.curve is not None else ""

    def receive(self) -> list[Arrival]:
        arrivals = []
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return arrivals
            if len(frames) < 2:
                continue
            try:
                msg = P.decode(self._decoder, frames[1].buffer)
            except P.DecodeError as e:
                log.warning("dropped a malformed KV-link frame: %s", e)
                continue
            if isinstance(msg, P.KvStaging):
                if msg.desc.get("transport") == "nixl" and self.importer.nixl is None:
                    continue  # this worker does not read over nixl: the gateway never routes it so
                try:
                    self.importer.open(msg.desc)
                except Exception as e:  # a bad description fails the handoffs that use it, nothing else
                    log.warning("could not open the staging of %s: %s", msg.prefill_worker, e)
            else:
                arrivals.append(Arrival(frames[0].bytes, msg, [f.buffer for f in frames[2:]], time.perf_counter()))

    def kv(self, arrival: Arrival) -> torch.Tensor:
        """The prompt's KV [n_layer, 2, n, KVH, D]: a view of the sender's staging (valid until
        released), or a tensor over the frames on tcp."""
        ready, loc = arrival.ready, arrival.ready.location
        return self.importer.view(ready.transport, loc.staging, loc.offset, loc.length, arrival.frames or None,
                                  ready.kept)

    def filler(self, arrival: Arrival) -> Callable[..., None]:
        """What puts the prompt's KV into a slot, given the slot's [n, 2, KVH, n - skip, D] view of
        the model's `layers` (a slice) and how many of the first positions to skip (a windowed
        layer's ring takes the last ring): a NIXL read straight into it (nixl), else a copy from
        `kv` (head-major runs both sides)."""
        ready, loc = arrival.ready, arrival.ready.location
        if ready.transport == "nixl":
            if self.device.type == "cuda":
                # the slot may be a free row of a step still running; the read does not queue behind it
                torch.cuda.current_stream(self.device).synchronize()
            return lambda dst, skip=0, layers=slice(None): self.importer.read(
                loc.staging, loc.offset + skip, loc.length - skip, dst, NIXL_READ_TIMEOUT_S, layers)
        kv = self.kv(arrival)
        return lambda dst, skip=0, layers=slice(None): dst.copy_(kv[layers, :, skip:].transpose(2, 3))

    def copied(self, arrival: Arrival) -> None:
        """The KV of `arrival` is queued into a slot (the filler ran): release it once that copy has
        completed. Its frames (tcp) stay referenced until then."""
        if self._copies_done is not None:
            self._copies_done.record(torch.cuda.current_stream(self.device))
        self._unreleased.append(arrival)

    @property
    def unreleased(self) -> bool:
        """Copies wait to be released."""
        return bool(self._unreleased)

    def send_releases(self) -> list[tuple[Arrival, float]]:
        """Release every copy once they have all completed (without waiting for them);
        -> each released arrival with its seconds from arrival to release."""
        if not self._unreleased or (self._copies_done is not None and not self._copies_done.query()):
            return []
        released, self._unreleased = self._unreleased, []
        now = time.perf_counter()
        for arrival in released:
            self.answer(arrival)
        return [(arrival, now - arrival.received) for arrival in released]

    def answer(self, arrival: Arrival, ok: bool = True, message: str = "") -> None:
        """Tell the sender its region is free now: a failed copy, or one never made (the request
        ended before its KV came)."""
        self.sock.send_multipart([arrival.peer, P.encode(P.KvRelease(arrival.ready.request.id,
                                                                     arrival.ready.location.offset, ok, message))])

    def drop_orphans(self) -> list[str]:
        """Unmap the stagings of senders that died; their keys."""
        return self.importer.drop_orphans()

    def forget(self, arrival: Arrival) -> None:
        """The sender of `arrival` is gone (its NIXL agent disconnected): unload its agent. Should it
        be alive after all, its retry sends the description again first."""
        self.importer.drop(arrival.ready.location.staging)

    def close(self) -> None:
        self.sock.close(0)
        self.importer.close()
