"""The prefill worker process: queue prompts, prefill them in packed batches, send each first
token to the gateway, and hand each prompt's KV to the decode worker the gateway named.

One thread: poll the sockets, run a batch when there is work and staging room, repeat. A batch
blocks the loop for its duration, which the heartbeat timeout comfortably allows.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch
import zmq

from splitserve.common import protocol as P
from splitserve.common.kv_handoff import KvSender, offered_transports
from splitserve.common.kv_transport import allocate_staging, sweep_orphan_staging
from splitserve.common.loading import LoadedModel
from splitserve.common.params import Limits
from splitserve.common.service_config import WorkerOptions, derive_limits
from splitserve.common.text_stream import TextStream, first_token_finish
from splitserve.common.worker_loop import WorkerLoop

from .engine import PrefillEngine, PrefillResult, take_batch

log = logging.getLogger(__name__)

# A Cancel that arrived before its prompt is remembered this long.
CANCELLED_MEMORY_S = 60.0


class PrefillWorker(WorkerLoop):
    role = "prefill"

    def __init__(self, opts: WorkerOptions, model: LoadedModel, limits: Limits):
        super().__init__(opts, model, limits)
        cfg = model.cfg
        transports = offered_transports(opts.kv_transport, model.device)
        staging_tokens = max(opts.staging_tokens or 2 * limits.prefill_token_budget, limits.prefill_token_budget)
        if transports[0] == "shm" and (removed := sweep_orphan_staging()):
            log.warning("removed %d shm staging files left by workers that died", removed)
        shape = (cfg.n_layer, 2, staging_tokens, cfg.kv_heads, cfg.head_dim)
        staging = allocate_staging(shape, model.dtype, model.device, transports[0], opts.worker_id)
        self.kv = KvSender(self.ctx, staging, opts.worker_id, opts.link.curve)
        self.engine = PrefillEngine(model, limits.prefill_token_budget, staging=staging.tensor)
        self.queue: deque[P.Prefill] = deque()
        self.queued_tokens = 0
        self.cancelled: dict[str, float] = {}  # request id -> when its Cancel came, before the prompt did
        self.start(transports, capacity=limits.prefill_token_budget)

    def health(self) -> dict:
        return super().health() | {"queued_tokens": self.queued_tokens, "handoffs": len(self.kv.handoffs),
                                   "staging_free_tokens": self.kv.regions.free_tokens,
                                   "staging_tokens": self.kv.regions.total}

    # ---- the loop's parts ---------------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket]:
        return self.kv.sockets

    def sockets_version(self) -> int:
        return self.kv.sockets_made

    def busy(self) -> bool:
        return bool(self.queue) and self.kv.regions.largest_free() > 0

    def load(self) -> int:
        return self.queued_tokens

    def idle(self) -> bool:
        return not self.queue and not self.kv.handoffs

    def housekeeping(self) -> None:
        for rid, message in self.kv.expire():
            self.link.send(P.WorkerError(rid, message))
        now = time.monotonic()
        for rid, t in list(self.cancelled.items()):
            if now - t > CANCELLED_MEMORY_S:
                del self.cancelled[rid]
        regions = self.kv.regions
        self.metrics.set(queued_tokens=self.queued_tokens, handoffs=len(self.kv.handoffs),
                         staging_used_tokens=regions.used_tokens, staging_tokens=regions.total)

    def abandon(self, why: str) -> None:
        if self.queue:
            log.error("%s: dropped the %d prompts queued here", why, len(self.queue))
        self.queue.clear()
        self.queued_tokens = 0
        self.cancelled.clear()

    def end_unfinished(self) -> None:
        for job in list(self.queue):
            self._drop(job, "shutdown")

    def close_own(self) -> None:
        self.kv.close()

    # ---- messages -------------------------------------------------------------------------------

    def on_gateway(self, msg) -> None:
        if isinstance(msg, P.Prefill):
            if msg.request.id in self.cancelled:
                self._finish_all(msg, "cancelled")
            else:
                self.queue.append(msg)
                self.queued_tokens += len(msg.request.prompt_ids)
        elif isinstance(msg, P.Cancel):
            self._cancel(msg.id)

    def on_socket(self, sock: zmq.Socket) -> None:
        failed, done = self.kv.receive(sock)
        for rid, message in failed:
            self.link.send(P.WorkerError(rid, message))
        for nbytes, seconds in done:
            self.metrics.observe_handoff(nbytes, seconds)

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

    def _drop(self, job: P.Prefill, reason: P.FinishReason) -> None:
        self.queue.remove(job)
        self.queued_tokens -= len(job.request.prompt_ids)
        self._finish_all(job, reason)

    def _finish_all(self, job: P.Prefill, reason: P.FinishReason) -> None:
        for request in (job.request, *job.forks):
            self.link.send(P.Finished(request.id, reason))

    # ---- prefill --------------------------------------------------------------------------------

    def work(self) -> None:
        if not self.queue:
            return
        now = time.time()
        for job in [j for j in self.queue if j.deadline is not None and j.deadline < now]:
            self._drop(job, "timeout")
        regions = self.kv.regions
        batch = take_batch(self.queue, min(self.limits.prefill_token_budget, regions.largest_free()),
                           lambda j: len(j.request.prompt_ids))
        if not batch:
            return
        total = sum(len(j.request.prompt_ids) for j in batch)
        self.queued_tokens -= total
        offset = regions.alloc(total)
        try:
            with torch.inference_mode():
                results = self.engine.run([j.request for j in batch], offset, [j.forks for j in batch])
            self.kv.staging.record_write()
        except Exception as e:  # a failing batch ends its requests, the worker lives on
            log.exception("prefill batch failed")
            regions.free(offset, total)
            for job in batch:
                for request in (job.request, *job.forks):
                    self.link.send(P.WorkerError(request.id, f"prefill failed: {e}"))
            return
        self.metrics.observe_batch(len(batch), total)
        for job in batch:
            regions.share(offset, 1 + len(job.forks))
            offset += len(job.request.prompt_ids)
        jobs = [j for j in batch for _ in range(1 + len(j.forks))]
        for job, res in zip(jobs, results):
            self._after_prefill(job, res)

    def _after_prefill(self, job: P.Prefill, res: PrefillResult) -> None:
        """The first token goes to the gateway at once (time to first token); the KV to decode,
        unless the request ended here."""
        request = res.request
        ev = TextStream(self.model.tokenizer, request).event(
            res.first_token, first_token_finish(request, res.first_token, self.model.cfg.eos_token_ids),
            res.logprob, res.top_tokens)
        reason = "cancelled" if self.cancelled.pop(request.id, None) is not None else ev.finish.reason
        token = P.Token(ev.index, ev.token_id, ev.text, ev.logprob, res.top_tokens)
        self.link.send(P.FirstToken(request.id, token, reason, res.prompt_logprobs))
        if reason is None:
            self.kv.send(job, request, res.first_token, ev.text, res.kv_offset, res.kv_len)
        else:
            self.kv.regions.release(res.kv_offset, res.kv_len)


def run(opts: WorkerOptions, model: LoadedModel) -> int:
    return PrefillWorker(opts, model, derive_limits(opts.limits, model.cfg.n_positions)).serve()
