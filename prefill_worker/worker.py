"""The prefill worker process: queue prompts, prefill them in packed batches, send each first
token to the gateway, and hand each prompt's KV to the decode worker the gateway named.

One thread: poll the sockets, run a batch when there is work and staging room, repeat. A batch
blocks the loop for its duration, which the heartbeat timeout comfortably allows.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass

import torch
import zmq

from splitserve.common import protocol as P
from splitserve.common.curve import CurveKeys
from splitserve.common.kv_transport import allocate_staging, gpu_uuids, sweep_orphan_staging
from splitserve.common.params import Limits
from splitserve.common.loading import LoadedModel
from splitserve.common.metrics_http import WorkerMetrics
from splitserve.common.runtime import DTYPE_NAMES
from splitserve.common.service_config import WorkerOptions, derive_limits
from splitserve.common.text_stream import TextStream, first_token_finish
from splitserve.common.worker_link import DRAIN_GRACE_S, GatewayLink, pid_namespace
from splitserve.common.zmq_util import make_socket

from .engine import PrefillEngine, PrefillResult, take_batch
from .staging import RegionAllocator

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 30.0  # a KvRelease that never comes (decode worker gone) frees staging after this
CANCELLED_MEMORY_S = 60.0


@dataclass
class Handoff:
    job: P.Prefill
    result: PrefillResult
    first_text: str
    sent_at: float
    tries: int = 1


def token_of(ev, top) -> P.Token:
    return P.Token(ev.index, ev.token_id, ev.text, ev.logprob, top)


class PrefillWorker:
    def __init__(self, opts: WorkerOptions, lm: LoadedModel, limits: Limits):
        self.opts, self.lm, self.limits = opts, lm, limits
        cfg = lm.cfg
        staging_tokens = max(opts.staging_tokens or 2 * limits.prefill_token_budget, limits.prefill_token_budget)
        kind = "cuda_ipc" if lm.device.type == "cuda" else "shm"
        if opts.kv_transport == "tcp":
            kind = "tcp"
        shape = (cfg.n_layer, 2, staging_tokens, cfg.kv_heads, cfg.head_dim)
        if kind == "shm" and (removed := sweep_orphan_staging()):
            log.warning("removed %d shm staging files left by workers that died", removed)
        self.staging = allocate_staging(shape, lm.dtype, lm.device, kind, opts.worker_id)
        self.engine = PrefillEngine(lm, limits.prefill_token_budget, staging=self.staging.tensor)
        self.kv_token_bytes = self.staging.tensor[:, :, :1].numel() * self.staging.tensor.element_size()
        self.regions = RegionAllocator(staging_tokens)
        self.queue: deque[P.Prefill] = deque()
        self.region_users: dict[int, int] = {}  # KV region offset -> requests sharing it (forks), when > 1
        self.queued_tokens = 0
        self.handoffs: dict[str, Handoff] = {}
        self.cancelled: dict[str, float] = {}
        self.kv_socks: dict[str, tuple[str, zmq.Socket]] = {}  # decode endpoint -> (its key, our socket)
        self.kv_socks_made = 0  # so that the poller follows a socket replaced at the same endpoint
        self.ctx = zmq.Context()
        transports = [kind, "tcp"] if kind != "tcp" else ["tcp"]
        self.link = GatewayLink(self.ctx, opts.gateway, self._register(transports), opts.link.heartbeat_s,
                                opts.link.heartbeat_timeout, curve=opts.link.curve)
        self.draining = False
        self.drain_started = 0.0
        self.drain_deadline = float("inf")
        self.metrics = WorkerMetrics("prefill", opts.metrics_port, self._health, opts.host)

    def _register(self, transports: list[str]) -> P.Register:
        o, lm = self.opts, self.lm
        return P.Register(
            role="prefill", worker_id=o.worker_id, protocol=P.PROTOCOL_VERSION, host_id=o.host_id,
            gpu_uuids=gpu_uuids(), device=str(lm.device), kv_endpoint="", kv_transports=transports,
            capacity=self.limits.prefill_token_budget, model_fingerprint=lm.fingerprint(),
            dtype=DTYPE_NAMES[lm.dtype], slot_len=self.limits.max_total_tokens, pid=os.getpid(),
            pid_namespace=pid_namespace(),
        )

    def _health(self) -> dict:
        return {"role": "prefill", "registered": self.link.registered, "draining": self.draining,
                "queued_tokens": self.queued_tokens, "handoffs": len(self.handoffs),
                "staging_free_tokens": self.regions.free_tokens, "staging_tokens": self.regions.total}

    # ---- loop ---------------------------------------------------------------------------

    def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._start_drain(self.opts.link.drain_timeout))
        poller, sockets_seen = zmq.Poller(), None
        try:
            while not (self.draining and self._drained()):
                if self.link.refused:
                    return 1
                if sockets_seen != (self.link.generation, self.kv_socks_made):
                    poller, sockets_seen = self._poller(), (self.link.generation, self.kv_socks_made)
                busy = self.queue and self.regions.largest_free() > 0
                for sock, _ in poller.poll(0 if busy else int(self.opts.link.heartbeat_s * 500)):
                    if sock is self.link.sock:
                        for msg in self.link.receive():
                            self._on_gateway(msg)
                    else:
                        self._on_kv(sock)
                self._housekeeping()
                if self.queue:
                    self._run_batch()
            return 0
        finally:
            self.close()

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.link.sock, zmq.POLLIN)
        for _, sock in self.kv_socks.values():
            poller.register(sock, zmq.POLLIN)
        return poller

    def _housekeeping(self) -> None:
        self.link.tick(self.queued_tokens, self.draining)
        if self.link.take_new_gateway():
            # The gateway that queued these is gone; the new one knows nothing of them.
            if self.queue:
                log.error("the gateway restarted: dropped the %d prompts queued here", len(self.queue))
            self.queue.clear()
            self.queued_tokens = 0
            self.cancelled.clear()
        now = time.monotonic()
        for rid, h in list(self.handoffs.items()):
            if now - h.sent_at > HANDOFF_TIMEOUT_S:
                self._fail_handoff(rid, "the decode worker did not take the KV in time")
        for rid, t in list(self.cancelled.items()):
            if now - t > CANCELLED_MEMORY_S:
                del self.cancelled[rid]
        if self.draining and time.monotonic() > self.drain_deadline:
            for job in list(self.queue):
                self._drop(job, "shutdown")
        self.metrics.set(queued_tokens=self.queued_tokens, handoffs=len(self.handoffs),
                         staging_used_tokens=self.regions.used_tokens, staging_tokens=self.regions.total)

    def _drained(self) -> bool:
        """Nothing queued or held, and nothing more on its way from the gateway (or out of time)."""
        idle = not self.queue and not self.handoffs
        return idle and (self.link.nothing_on_the_way(self.drain_started)
                         or time.monotonic() > self.drain_deadline + DRAIN_GRACE_S)

    def _start_drain(self, timeout_s: float) -> None:
        if not self.draining:
            log.info("draining: finishing %d queued prompts (up to %.0f s)", len(self.queue), timeout_s)
            self.draining = True
            self.drain_started = time.monotonic()
            self.drain_deadline = self.drain_started + timeout_s

    # ---- gateway messages -----------------------------------------------------------------

    def _on_gateway(self, msg) -> None:
        if isinstance(msg, P.Prefill):
            if msg.request.id in self.cancelled:
                self._finish_all(msg, "cancelled")
            else:
                self.queue.append(msg)
                self.queued_tokens += len(msg.request.prompt_ids)
        elif isinstance(msg, P.Cancel):
            self._cancel(msg.id)
        elif isinstance(msg, P.Drain):
            self._start_drain(msg.timeout_s)

    def _cancel(self, rid: str) -> None:
        for job in self.queue:
            if job.request.id == rid:
                self._drop(job, "cancelled")
                return
            fork = next((f for f in job.forks if f.id == rid), None)
            if fork is not None:
                job.forks.remove(fork)
                self.link.send(P.Finished(rid, "cancelled"))
                return
        self.cancelled[rid] = time.monotonic()

    def _drop(self, job: P.Prefill, reason: str) -> None:
        self.queue.remove(job)
        self.queued_tokens -= len(job.request.prompt_ids)
        self._finish_all(job, reason)

    def _finish_all(self, job: P.Prefill, reason: str) -> None:
        for request in (job.request, *job.forks):
            self.link.send(P.Finished(request.id, reason))

    # ---- prefill --------------------------------------------------------------------------

    def _run_batch(self) -> None:
        now = time.time()
        for job in [j for j in self.queue if j.deadline is not None and j.deadline < now]:
            self._drop(job, "timeout")
        budget = min(self.limits.prefill_token_budget, self.regions.largest_free())
        batch = take_batch(self.queue, budget, lambda j: len(j.request.prompt_ids))
        if not batch:
            return
        total = sum(len(j.request.prompt_ids) for j in batch)
        self.queued_tokens -= total
        offset = self.regions.alloc(total)
        try:
            with torch.inference_mode():
                results = self.engine.run([j.request for j in batch], offset, [j.forks for j in batch])
            self.staging.record_write()
        except Exception as e:  # a failing batch ends its requests, the worker lives on
            log.exception("prefill batch failed")
            self.regions.free(offset, total)
            for job in batch:
                for request in (job.request, *job.forks):
                    self.link.send(P.WorkerError(request.id, f"prefill failed: {e}"))
            return
        self.metrics.observe_batch(len(batch), total)
        jobs = [j for j in batch for _ in range(1 + len(j.forks))]
        for job in batch:
            if job.forks:
                self.region_users[offset] = 1 + len(job.forks)
            offset += len(job.request.prompt_ids)
        for job, res in zip(jobs, results):
            self._after_prefill(job, res)

    def _release_region(self, res: PrefillResult) -> None:
        """A request is done with its KV region; the region is free once its forks are too."""
        users = self.region_users.pop(res.kv_offset, 1) - 1
        if users:
            self.region_users[res.kv_offset] = users
        else:
            self.regions.free(res.kv_offset, res.kv_len)

    def _after_prefill(self, job: P.Prefill, res: PrefillResult) -> None:
        request = res.request
        stream = TextStream(self.lm.tokenizer, request)
        finish = first_token_finish(request, res.first_token, self.lm.cfg.eos_token_id)
        ev = stream.event(res.first_token, finish, res.logprob, res.top_tokens)
        cancelled = self.cancelled.pop(request.id, None) is not None
        reason = "cancelled" if cancelled else ev.finish.reason
        self.link.send(P.FirstToken(request.id, token_of(ev, res.top_tokens), reason, res.prompt_logprobs))
        if reason is not None:
            self._release_region(res)
            return
        self.handoffs[request.id] = Handoff(job, res, ev.text, time.monotonic())
        self._send_kv(request.id)

    def _send_kv(self, rid: str) -> None:
        h = self.handoffs[rid]
        sock = self._kv_socket(h.job.decode_endpoint, h.job.decode_key)
        res = h.result
        tcp = h.job.transport == "tcp"
        key = self.staging.tcp_key if tcp else self.staging.key
        ready = P.KvReady(res.request, res.first_token, h.first_text, P.KvLocation(res.kv_offset, res.kv_len, key),
                          h.job.transport, self.opts.worker_id, h.job.deadline)
        frames = self.staging.frames(res.kv_offset, res.kv_len) if tcp else []
        sock.send_multipart([P.encode(ready), *frames], copy=False)
        h.sent_at = time.monotonic()

    def _kv_socket(self, endpoint: str, server_key: str) -> zmq.Socket:
        """One socket per decode worker, CURVE-encrypted when the worker gave a key. A worker
        restarted at the same address with a new key gets a new socket (the old one could never
        complete a handshake again)."""
        known = self.kv_socks.get(endpoint)
        if known is not None and known[0] == server_key:
            return known[1]
        if known is not None:
            known[1].close(0)
        curve = None
        if server_key:
            mine = self.opts.link.curve
            public, secret = (mine.public, mine.secret) if mine is not None else zmq.curve_keypair()
            curve = CurveKeys(public, secret, server=server_key.encode())
        sock = make_socket(self.ctx, zmq.DEALER, P.MAX_CONTROL_BYTES, curve=curve)
        sock.connect(endpoint)
        self._send_staging(sock)
        self.kv_socks[endpoint] = server_key, sock
        self.kv_socks_made += 1
        return sock

    def _send_staging(self, sock: zmq.Socket) -> None:
        """Ordered before any KvReady on the connection, so the decode side can open staging.
        Both descriptions go: a decode worker on another host cannot open the native one (its
        open fails and is logged there) and receives the KV as frames instead."""
        for desc in (self.staging.export(), self.staging.tcp_export()):
            sock.send(P.encode(P.KvStaging(self.opts.worker_id, desc)))

    def _on_kv(self, sock: zmq.Socket) -> None:
        dec = P.decoder(P.KvRelease)
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = P.decode(dec, frames[0])
            except P.DecodeError as e:
                log.warning("dropped a malformed KV-link frame: %s", e)
                continue
            self._on_release(msg, sock)

    def _on_release(self, msg: P.KvRelease, sock: zmq.Socket) -> None:
        h = self.handoffs.get(msg.id)
        if h is None or h.result.kv_offset != msg.offset:
            return
        if msg.ok:
            del self.handoffs[msg.id]
            self.metrics.observe_handoff(h.result.kv_len * self.kv_token_bytes, time.monotonic() - h.sent_at)
            self._release_region(h.result)
        elif h.tries < 2:  # retried once, with the staging description sent again first
            log.warning("handoff of %s failed (%s); retrying once", msg.id, msg.message)
            h.tries += 1
            self._send_staging(sock)
            self._send_kv(msg.id)
        else:
            self._fail_handoff(msg.id, f"KV handoff failed twice: {msg.message}")

    def _fail_handoff(self, rid: str, message: str) -> None:
        h = self.handoffs.pop(rid)
        self._release_region(h.result)
        self.link.send(P.WorkerError(rid, message))

    def close(self) -> None:
        self.link.close()
        for _, sock in self.kv_socks.values():
            sock.close(0)
        self.staging.close()
        self.metrics.close()
        self.ctx.term()


def run(opts: WorkerOptions, lm: LoadedModel) -> int:
    return PrefillWorker(opts, lm, derive_limits(opts.limits, lm.cfg.n_positions)).serve()
