"""The decode worker process: admit handed-off KV into slots, decode step after step, and let the
output stream the tokens to each request's frontend. The router hears of every end
(Finished), never of a token.

The loop thread owns the engine and the sockets it reads (gateway link, KV endpoint). Between
steps it takes in everything that arrived: handoffs, cancels, releases from the output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import zmq

from splitserve.common import protocol as P
from splitserve.common.curve import CurveKeys
from splitserve.common.kv_handoff import Arrival, KvReceiver, nixl_agent_for, offered_transports
from splitserve.common.loading import LoadedModel
from splitserve.common.memory import available_bytes
from splitserve.common.model import kv_rings, layer_keys
from splitserve.common.params import Finish, Limits
from splitserve.common.service_config import WorkerOptions, derive_limits
from splitserve.common.worker_loop import WorkerLoop

from .engine import DecodeEngine
from .kv_pool import SHORT_SLOT, pool_slots, slot_bytes, slots_if_shorter
from .output import Output

log = logging.getLogger(__name__)

TOMBSTONE_S = 120.0  # a Cancel of a request not running here is remembered this long (its KV may come)
ORPHAN_CHECK_S = 5.0  # how often to look for stagings whose prefill worker died


@dataclass
class Running:
    """A request decoding here."""

    slot: int
    deadline: float | None  # time.time() past which it ends


class DecodeWorker(WorkerLoop):
    role = "decode"

    def __init__(self, opts: WorkerOptions, model: LoadedModel, limits: Limits):
        super().__init__(opts, model, limits)
        slot_len = limits.max_total_tokens
        # a windowed layer keeps only its ring of keys per slot
        keys = layer_keys(kv_rings(model.cfg.windows, slot_len), slot_len)
        per_slot, free = slot_bytes(model.cfg, keys, model.dtype), available_bytes(model.device)
        num_slots = pool_slots(per_slot, slot_len, free, model.device.type, opts.num_slots, opts.kv_cache_memory_mb)
        self.engine = DecodeEngine(model, num_slots, slot_len, opts.key_bucket,
                                   graphs=opts.cuda_graphs and model.device.type == "cuda",
                                   graph_key_step=opts.graph_key_step)
        # With CURVE on the worker link the KV link is encrypted too: this worker serves it with its
        # own key pair, whose public half reaches prefill workers only through the gateway.
        curve = opts.link.curve
        # nixl: prefill workers' KV is read straight into the pool, registered once here
        nixl = nixl_agent_for(opts, lambda agent: agent.register_pool(self.engine.kv.flat))
        self.kv = KvReceiver(self.ctx, opts.host, opts.kv_port, opts.advertise_host,
                             CurveKeys(curve.public, curve.secret) if curve is not None else None,
                             model.device, model.dtype, nixl)
        self.output = Output(self.ctx, model.tokenizer, curve=curve, inline=model.device.type != "cuda")
        self.running: dict[str, Running] = {}  # by request id
        self.tombstones: dict[str, float] = {}  # request id -> when its Cancel came while it was not running here
        self.orphans_checked = 0.0
        self.admitted = 0
        self.metrics.set(slots_total=num_slots)
        self.layer_keys = keys
        self.key_bytes = 2 * model.cfg.kv_dim * model.dtype.itemsize  # one layer's K/V of one token
        self.start(offered_transports(opts.kv_transport, model.device, nixl is not None), num_slots,
                   self.kv.endpoint, self.kv.public_key)
        rings = ", ".join(map(str, sorted(set(keys) - {slot_len})))
        windowed = sum(k < slot_len for k in keys)
        log.info("decode worker %s: %d slots of %d tokens%s (%.1f GiB; %.1f GiB was free), KV endpoint %s",
                 opts.worker_id, num_slots, slot_len, f", {windowed} of {len(keys)} layers keeping their window's "
                 f"last {rings} keys" if windowed else "", num_slots * per_slot / 2**30, free / 2**30, self.kv.endpoint)
        if not opts.num_slots and (more := slots_if_shorter(num_slots, keys, model.device.type)):
            log.warning("at most %d requests decode at once here: --max-total-tokens %d would give %d slots",
                        num_slots, SHORT_SLOT, more)

    def details(self) -> dict:
        return {"slots_used": len(self.running), "slots_total": self.engine.num_slots,
                "admitted": self.admitted, "kv_endpoint": self.kv.endpoint,
                "kv_encrypted": self.kv.curve is not None}

    # ---- the loop's parts ---------------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket]:
        return [self.kv.sock]

    def busy(self) -> bool:
        return bool(self.running) or self.kv.unreleased

    def load(self) -> int:
        return len(self.running)

    def idle(self) -> bool:
        return not self.running and not self.kv.unreleased

    def housekeeping(self) -> None:
        self._send_releases()
        while not self.output.released.empty():  # slots the output stopped on a stop string
            slot, rid, reason = self.output.released.get()
            if rid in self.running and self.running[rid].slot == slot:
                self._forget(rid)
                self.link.send(P.Finished(rid, reason))
        now_mono, now = time.monotonic(), time.time()
        if now_mono - self.orphans_checked > ORPHAN_CHECK_S:
            self.orphans_checked = now_mono
            for key in self.kv.drop_orphans():
                log.warning("the prefill worker of staging %s died: unmapped and removed it", key)
        for rid, t in list(self.tombstones.items()):
            if now_mono - t > TOMBSTONE_S:
                del self.tombstones[rid]
        for rid, r in list(self.running.items()):
            if r.deadline is not None and r.deadline < now:
                self._end(rid, "timeout")
        self.metrics.set(slots_used=len(self.running))

    def work(self) -> None:
        if not self.running:
            return
        with torch.inference_mode():
            out = self.engine.step()
        self.output.step(out)
        self.metrics.observe_batch(len(out.slots), len(out.slots))
        for rid, code in zip(out.ids, out.finish):
            if code:  # the engine has freed the slot already
                del self.running[rid]
                self.link.send(P.Finished(rid, Finish(code).reason))
        self._send_releases()  # the step's sync has seen every earlier copy complete

    def _send_releases(self) -> None:
        for arrival, seconds in self.kv.send_releases():
            n, transport = arrival.ready.location.length, arrival.ready.transport
            # a windowed layer takes the prompt's last ring only (and tcp brings no more)
            moved = sum(min(n, k) for k in self.layer_keys)
            self.metrics.observe_handoff(moved * self.key_bytes, seconds, transport)

    def holding(self) -> list[P.Held]:
        return [P.Held(rid, self.opts.worker_id) for rid in self.running]

    def end_unfinished(self) -> None:
        for rid in list(self.running):
            self._end(rid, "shutdown")

    def close_own(self) -> None:
        self.output.stop()
        self.kv.close()

    # ---- requests -------------------------------------------------------------------------------

    def on_gateway(self, msg) -> None:
        if isinstance(msg, P.Cancel):
            if msg.id in self.running:
                self._end(msg.id, "cancelled")
            else:
                # Its KV may be on its way (refused when it comes), it may have ended here already, or
                # never come: the router hears its end now in each case, so that a reservation held
                # for a request this worker will never run is freed at once, not after a grace.
                self.tombstones[msg.id] = time.monotonic()
                self.link.send(P.Finished(msg.id, "cancelled"))

    def _forget(self, rid: str) -> None:
        self.engine.release(self.running.pop(rid).slot)

    def _end(self, rid: str, reason: P.FinishReason) -> None:
        """End a running request that produced no final token (cancel, deadline, shutdown)."""
        self._forget(rid)
        self.link.send(P.Finished(rid, reason))

    def on_socket(self, sock: zmq.Socket) -> None:
        for arrival in self.kv.receive():
            self._admit(arrival)

    def _admit(self, arrival: Arrival) -> None:
        ready = arrival.ready
        rid = ready.request.id
        if self.tombstones.pop(rid, None) is not None:  # its end went with the Cancel
            self.kv.answer(arrival)
            return
        try:
            slot = self.engine.admit_with(ready.request, ready.location.length, ready.first_token,
                                          self.kv.filler(arrival))
        except Exception as e:
            log.warning("handoff of %s over %s failed: %s", rid, ready.transport, e)
            if getattr(e, "slot_unsafe", False):
                log.error("a NIXL read into a slot could not be cancelled: that slot is retired")
            self.kv.answer(arrival, ok=False, message=str(e))
            if getattr(e, "disconnected", False):
                # The sender is gone (its agent disconnected): no retry will come, and the gateway,
                # which has the first token already, would not resume the request for a prefill
                # worker's death. Hand it back, as a draining worker does, to be resumed elsewhere.
                self.kv.forget(arrival)
                self.link.send(P.Finished(rid, "shutdown"))
            return
        self.kv.copied(arrival)
        self.running[rid] = Running(slot, ready.deadline)
        self.admitted += 1
        self.output.admit(slot, ready.request, ready.first_token, ready.first_text)


def run(opts: WorkerOptions, model: LoadedModel) -> int:
    return DecodeWorker(opts, model, derive_limits(opts.limits, model.cfg.n_positions)).serve()
