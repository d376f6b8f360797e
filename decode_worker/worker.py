"""The decode worker process: admit handed-off KV into slots, decode step after step, and let the
output thread stream the tokens to the gateway.

The loop thread owns the engine and the sockets it reads (gateway link, KV endpoint). Between
steps it takes in everything that arrived: handoffs, cancels, releases from the output thread.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch
import zmq

from splitserve.common import protocol as P
from splitserve.common.curve import CurveKeys
from splitserve.common.kv_transport import KvImporter, gpu_uuids
from splitserve.common.params import Limits
from splitserve.common.loading import LoadedModel
from splitserve.common.metrics_http import WorkerMetrics
from splitserve.common.runtime import DTYPE_NAMES
from splitserve.common.service_config import WorkerOptions, derive_limits
from splitserve.common.worker_link import DRAIN_GRACE_S, GatewayLink, pid_namespace
from splitserve.common.zmq_util import bind_endpoint, make_socket, tcp_endpoint

from .engine import DecodeEngine
from .kv_pool import slots_for_budget
from .output import OutputThread

log = logging.getLogger(__name__)

TOMBSTONE_S = 120.0  # a Cancel that arrived before its KvReady is remembered this long
ORPHAN_CHECK_S = 5.0  # how often to look for stagings whose prefill worker died


class DecodeWorker:
    def __init__(self, opts: WorkerOptions, lm: LoadedModel, limits: Limits):
        self.opts, self.lm, self.limits = opts, lm, limits
        slot_len = limits.max_total_tokens
        num_slots = opts.num_slots or (256 if lm.device.type == "cuda" else 64)
        if opts.kv_cache_memory_mb:
            num_slots = slots_for_budget(lm.cfg, slot_len, lm.dtype, opts.kv_cache_memory_mb * 2**20, num_slots)
        self.engine = DecodeEngine(lm, num_slots, slot_len, opts.key_bucket,
                                   graphs=opts.cuda_graphs and lm.device.type == "cuda",
                                   graph_key_step=opts.graph_key_step)
        self.importer = KvImporter(lm.device, lm.dtype)
        self.ctx = zmq.Context()
        curve = opts.link.curve
        # With CURVE on the worker link the KV link is encrypted too: this worker serves it with
        # its own key pair, whose public half reaches prefill workers only through the gateway.
        self.kv_curve = CurveKeys(curve.public, curve.secret) if curve is not None else None
        self.kv_sock = make_socket(self.ctx, zmq.ROUTER, P.MAX_KV_BYTES, curve=self.kv_curve)
        port = bind_endpoint(self.kv_sock, opts.host, opts.kv_port)
        self.kv_endpoint = tcp_endpoint(opts.advertise_host, port)
        transports = ["cuda_ipc", "tcp"] if lm.device.type == "cuda" else ["shm", "tcp"]
        if opts.kv_transport != "auto":
            transports = [opts.kv_transport]
        self.link = GatewayLink(self.ctx, opts.gateway, self._register(transports, num_slots),
                                opts.link.heartbeat_s, opts.link.heartbeat_timeout, curve=opts.link.curve)
        self.output = OutputThread(self.ctx, opts.gateway, lm.tokenizer, opts.worker_id, curve=opts.link.curve)
        self.slot_of: dict[str, int] = {}  # running requests
        self.rid_at: dict[int, str] = {}
        self.deadlines: dict[str, float] = {}
        self.tombstones: dict[str, float] = {}
        self.orphans_checked = 0.0
        self.kv_decoder = P.decoder(P.KvToDecode)
        self.admitted = 0
        self.draining = False
        self.drain_started = 0.0
        self.drain_deadline = float("inf")
        self.metrics = WorkerMetrics("decode", opts.metrics_port, self._health, opts.host)
        self.metrics.set(slots_total=num_slots)
        log.info("decode worker %s: %d slots of %d tokens, KV endpoint %s", opts.worker_id, num_slots, slot_len,
                 self.kv_endpoint)

    def _register(self, transports: list[str], num_slots: int) -> P.Register:
        o, lm = self.opts, self.lm
        return P.Register(
            role="decode", worker_id=o.worker_id, protocol=P.PROTOCOL_VERSION, host_id=o.host_id,
            gpu_uuids=gpu_uuids(), device=str(lm.device), kv_endpoint=self.kv_endpoint, kv_transports=transports,
            capacity=num_slots, model_fingerprint=lm.fingerprint(), dtype=DTYPE_NAMES[lm.dtype],
            slot_len=self.limits.max_total_tokens, pid=os.getpid(), pid_namespace=pid_namespace(),
            kv_public_key=self.kv_curve.public.decode() if self.kv_curve is not None else "",
        )

    def _health(self) -> dict:
        return {"role": "decode", "registered": self.link.registered, "draining": self.draining,
                "slots_used": len(self.engine.requests), "slots_total": self.engine.num_slots,
                "admitted": self.admitted, "kv_endpoint": self.kv_endpoint, "kv_encrypted": self.kv_curve is not None}

    # ---- loop ---------------------------------------------------------------------------

    def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._start_drain(self.opts.link.drain_timeout))
        poller, generation = None, -1
        try:
            while not (self.draining and self._drained()):
                if self.link.refused:
                    return 1
                if generation != self.link.generation:
                    poller, generation = self._poller(), self.link.generation
                idle = not self.engine.requests
                for sock, _ in poller.poll(int(self.opts.link.heartbeat_s * 500) if idle else 0):
                    if sock is self.link.sock:
                        for msg in self.link.receive():
                            self._on_gateway(msg)
                    else:
                        self._on_kv()
                self._apply_releases()
                self._housekeeping()
                if self.engine.requests:
                    with torch.inference_mode():
                        out = self.engine.step()
                    self.output.step(out)
                    self.metrics.observe_batch(len(out.slots), len(out.slots))
                    for slot, code in zip(out.slots, out.finish):
                        if code:  # the engine has freed the slot already
                            self._forget(self.rid_at[slot])
            return 0
        finally:
            self.close()

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.link.sock, zmq.POLLIN)
        poller.register(self.kv_sock, zmq.POLLIN)
        return poller

    def _housekeeping(self) -> None:
        self.link.tick(len(self.engine.requests), self.draining)
        if self.link.take_new_gateway():
            self._abandon("the gateway restarted")
        now_mono, now = time.monotonic(), time.time()
        if now_mono - self.orphans_checked > ORPHAN_CHECK_S:
            self.orphans_checked = now_mono
            for key in self.importer.drop_orphans():
                log.warning("the prefill worker of staging %s died: unmapped and removed it", key)
        for rid, t in list(self.tombstones.items()):
            if now_mono - t > TOMBSTONE_S:
                del self.tombstones[rid]
        for rid, deadline in list(self.deadlines.items()):
            if deadline < now:
                self._end(rid, "timeout")
        if self.draining and now_mono > self.drain_deadline:
            for rid in list(self.slot_of):
                self._end(rid, "shutdown")
        self.metrics.set(slots_used=len(self.engine.requests))

    def _drained(self) -> bool:
        """No request running and none reserved here any more (or out of time)."""
        return not self.engine.requests and (self.link.nothing_on_the_way(self.drain_started)
                                             or time.monotonic() > self.drain_deadline + DRAIN_GRACE_S)

    def _start_drain(self, timeout_s: float) -> None:
        if not self.draining:
            log.info("draining: %d requests in flight (up to %.0f s)", len(self.engine.requests), timeout_s)
            self.draining = True
            self.drain_started = time.monotonic()
            self.drain_deadline = self.drain_started + timeout_s

    # ---- requests -------------------------------------------------------------------------

    def _on_gateway(self, msg) -> None:
        if isinstance(msg, P.Cancel):
            if msg.id in self.slot_of:
                self._end(msg.id, "cancelled")
            else:
                self.tombstones[msg.id] = time.monotonic()
        elif isinstance(msg, P.Drain):
            self._start_drain(msg.timeout_s)

    def _forget(self, rid: str) -> int:
        slot = self.slot_of.pop(rid)
        del self.rid_at[slot]
        self.deadlines.pop(rid, None)
        return slot

    def _end(self, rid: str, reason: str) -> None:
        """End a running request that produced no final token (cancel, deadline, shutdown)."""
        self.engine.release(self._forget(rid))
        self.link.send(P.Finished(rid, reason))

    def _abandon(self, why: str) -> None:
        """Free every slot and forget every cancel without telling the gateway: the one that routed
        this work is gone."""
        if self.slot_of:
            log.error("%s: ended the %d requests in flight here", why, len(self.slot_of))
        for rid in list(self.slot_of):
            self.engine.release(self._forget(rid))
        self.tombstones.clear()

    def _apply_releases(self) -> None:
        """Free the slots the output thread stopped on a stop string (if still theirs)."""
        while not self.output.released.empty():
            slot, rid = self.output.released.get()
            if self.slot_of.get(rid) == slot:
                self.engine.release(self._forget(rid))

    def _on_kv(self) -> None:
        while True:
            try:
                frames = self.kv_sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            peer = frames[0].bytes
            try:
                msg = P.decode(self.kv_decoder, frames[1].buffer)
            except P.DecodeError as e:
                log.warning("dropped a malformed KV-link frame: %s", e)
                continue
            if isinstance(msg, P.KvStaging):
                self._open_staging(msg)
            else:
                self._on_ready(peer, msg, frames[2:])

    def _open_staging(self, msg: P.KvStaging) -> None:
        try:
            self.importer.open(msg.desc)
        except Exception as e:  # a bad description fails the handoffs that use it, nothing else
            log.warning("could not open the staging of %s: %s", msg.prefill_worker, e)

    def _on_ready(self, peer: bytes, msg: P.KvReady, frames: list) -> None:
        rid, loc = msg.request.id, msg.location
        if rid in self.tombstones:
            del self.tombstones[rid]
            self._release(peer, rid, loc.offset)
            self.link.send(P.Finished(rid, "cancelled"))
            return
        received = time.perf_counter()
        try:
            kv = self.importer.view(msg.transport, loc.staging, loc.offset, loc.length,
                                    [f.buffer for f in frames] if frames else None)
            slot = self.engine.admit(msg.request, kv, msg.first_token)
            if self.lm.device.type == "cuda":
                torch.cuda.current_stream(self.lm.device).synchronize()  # the copy completes first
        except Exception as e:
            log.warning("handoff of %s failed: %s", rid, e)
            self._release(peer, rid, loc.offset, ok=False, message=str(e))
            return
        self._release(peer, rid, loc.offset)
        self.slot_of[rid] = slot
        self.rid_at[slot] = rid
        self.admitted += 1
        self.metrics.observe_handoff(kv.numel() * kv.element_size(), time.perf_counter() - received)
        if msg.deadline is not None:
            self.deadlines[rid] = msg.deadline
        self.output.admit(slot, msg.request, msg.first_token, msg.first_text)

    def _release(self, peer: bytes, rid: str, offset: int, ok: bool = True, message: str = "") -> None:
        self.kv_sock.send_multipart([peer, P.encode(P.KvRelease(rid, offset, ok, message))])

    def close(self) -> None:
        self.output.stop()
        self.link.close()
        self.kv_sock.close(0)
        self.importer.close()
        self.metrics.close()
        self.ctx.term()


def run(opts: WorkerOptions, lm: LoadedModel) -> int:
    return DecodeWorker(opts, lm, derive_limits(opts.limits, lm.cfg.n_positions)).serve()
