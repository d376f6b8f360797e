"""The prefill worker process: queue prompts, prefill them in packed batches (a prompt longer
than --prefill-chunk-tokens in pieces, over several), send each first token to its request's
frontend, hand each prompt's KV to the decode worker the router named, and tell the router
(Prefilled) once that worker has it.

One thread: poll the sockets, run a pass when there is work and staging room, repeat. A pass
blocks the loop for its duration (seconds, for a long prompt on a CPU): the link's beat thread
keeps the router's heartbeats going meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import zmq

from splitserve.common import protocol as P
from splitserve.common.frontend_links import FrontendLinks
from splitserve.common.kv_handoff import KvSender, nixl_agent_for, offered_transports
from splitserve.common.kv_transport import allocate_staging, sweep_orphan_staging
from splitserve.common.loading import LoadedModel
from splitserve.common.memory import available_bytes
from splitserve.common.model import kv_rings, layer_keys
from splitserve.common.params import Limits
from splitserve.common.prefix_blocks import block_namespace
from splitserve.common.service_config import WorkerOptions, derive_limits
from splitserve.common.text_stream import TextStream, first_token_finish
from splitserve.common.worker_loop import WorkerLoop

from .engine import PrefillEngine, PrefillResult
from .prefix_cache import PrefixCache

log = logging.getLogger(__name__)

# A Cancel that arrived before its prompt is remembered this long.
CANCELLED_MEMORY_S = 60.0
# --prefix-cache-mb -1: this much on the CPU; on a GPU up to GPU_CACHE_MB of what is free
CPU_CACHE_MB, GPU_CACHE_MB, GPU_FREE_SHARE = 1024, 8192, 0.8
# Prompts in pieces at once, each holding its staging region from its first piece to its last
IN_PIECES_MAX = 2


@dataclass
class Queued:
    job: P.Prefill
    compute: int  # prompt tokens left to compute (when it came, those the prefix cache held left out)
    # a prompt prefilled in pieces, from its first on: its staging region, and the tokens staged there
    offset: int | None = None
    done: int = 0
    cached: int = 0  # of those, the ones its first piece found in the prefix cache


@dataclass
class Pass:
    """A prefill pass's work: prompts prefilled whole, packed back to back from `offset` (with
    their cached blocks, `found`), then the next pieces (prompt, tokens) of the prompts in pieces."""
    whole: list[Queued] = field(default_factory=list)
    found: list[list[int]] = field(default_factory=list)
    offset: int | None = None
    pieces: list[tuple[Queued, int]] = field(default_factory=list)


class PrefillWorker(WorkerLoop):
    role = "prefill"

    def __init__(self, opts: WorkerOptions, model: LoadedModel, limits: Limits):
        super().__init__(opts, model, limits)
        cfg = model.cfg
        native = offered_transports(opts.kv_transport, model.device, nixl=True)[0]  # what staging is made for
        staging_tokens = max(opts.staging_tokens or 2 * limits.prefill_token_budget, limits.prefill_token_budget)
        if native == "shm" and (removed := sweep_orphan_staging()):
            log.warning("removed %d shm staging files left by workers that died", removed)
        shape = (cfg.n_layer, 2, staging_tokens, cfg.kv_heads, cfg.head_dim)
        staging = allocate_staging(shape, model.dtype, model.device, native, opts.worker_id)
        # nixl: decode workers read the staging memory, registered once here, whatever its kind
        try:
            nixl = nixl_agent_for(opts, staging.register_nixl)
        except BaseException:
            staging.close()
            raise
        transports = offered_transports(opts.kv_transport, model.device, nixl is not None)
        # a windowed layer's keys past its ring are never read: tcp sends its last ring only
        longest = cfg.n_positions
        self.kv = KvSender(self.ctx, staging, opts.worker_id, opts.link.curve,
                           layer_keys(kv_rings(cfg.windows, longest), longest))
        self.frontends = FrontendLinks(self.ctx, opts.link.curve)  # first tokens, straight to each request's frontend
        self.engine = PrefillEngine(model, limits.prefill_token_budget, staging=staging.tensor)
        self.cache = prefix_cache(opts, model)
        self.queue: deque[Queued] = deque()
        self.queued_tokens = 0  # to compute
        self.cancelled: dict[str, float] = {}  # request id -> when its Cancel came, before the prompt did
        blocks = self.cache.capacity if self.cache else 0
        self.start(transports, capacity=limits.prefill_token_budget, prefix_blocks=blocks,
                   prefix_block_tokens=opts.prefix_block_tokens if blocks else 0)

    def details(self) -> dict:
        return {"queued_tokens": self.queued_tokens, "handoffs": len(self.kv.handoffs),
                "staging_free_tokens": self.kv.regions.free_tokens,
                "staging_tokens": self.kv.regions.total,
                "prefix_cache_blocks": self.cache.used_blocks if self.cache else 0}

    # ---- the loop's parts ---------------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket]:
        return self.kv.sockets

    def sockets_version(self) -> int:
        return self.kv.sockets_made

    def busy(self) -> bool:
        # new prompts need staging room; a prompt in pieces goes on in the region it holds
        return bool(self.queue) and (self.kv.regions.largest_free() > 0
                                     or any(q.offset is not None for q in self.queue))

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
        if self.cache:
            self.metrics.observe_prefix_cache(self.cache.looked_up, self.cache.found,
                                              self.cache.used_blocks * self.cache.block_bytes())

    def holding(self) -> list[P.Held]:
        held = []
        for queued in self.queue:
            job = queued.job
            held.append(P.Held(job.request.id, job.decode_worker, queued.compute))
            held += [P.Held(f.id, job.decode_worker, 0) for f in job.forks]
        held += [P.Held(rid, h.decode_worker) for rid, h in self.kv.handoffs.items()]
        return held

    def end_unfinished(self) -> None:
        for queued in list(self.queue):
            self._drop(queued, "shutdown")

    def close_own(self) -> None:
        self.kv.close()
        self.frontends.close()

    # ---- messages -------------------------------------------------------------------------------

    def on_gateway(self, msg) -> None:
        if isinstance(msg, P.Prefill):
            if msg.request.id in self.cancelled:
                self._finish_all(msg, "cancelled")
            else:
                queued = Queued(msg, len(msg.request.prompt_ids) - self._tokens(self._match(msg.request)[0]))
                self.queue.append(queued)
                self.queued_tokens += queued.compute
        elif isinstance(msg, P.Cancel):
            self._cancel(msg.id)

    def on_socket(self, sock: zmq.Socket) -> None:
        failed, done = self.kv.receive(sock)
        for rid, message in failed:
            self.link.send(P.WorkerError(rid, message))
        for handed in done:
            self.link.send(P.Prefilled(handed.id))
            self.metrics.observe_handoff(handed.nbytes, handed.seconds, handed.transport)

    def _cancel(self, rid: str) -> None:
        if self.kv.drop(rid):  # prefilled already: its staging comes free now, not at the handoff timeout
            return
        for queued in self.queue:
            job = queued.job
            if job.request.id == rid:
                self._drop(queued, "cancelled")
                return
            fork = next((f for f in job.forks if f.id == rid), None)
            if fork is not None:
                job.forks.remove(fork)
                self.link.send(P.Finished(rid, "cancelled"))
                return
        self.cancelled[rid] = time.monotonic()

    def _drop(self, queued: Queued, reason: P.FinishReason) -> None:
        self._dequeue(queued)
        if queued.offset is not None:
            self.kv.regions.free(queued.offset, len(queued.job.request.prompt_ids))
        self._finish_all(queued.job, reason)

    def _dequeue(self, queued: Queued) -> None:
        """Out of the queue, its tokens still to compute no longer counted."""
        self.queue.remove(queued)
        self.queued_tokens -= queued.compute

    def _finish_all(self, job: P.Prefill, reason: P.FinishReason) -> None:
        for request in (job.request, *job.forks):
            self.link.send(P.Finished(request.id, reason))

    # ---- prefill --------------------------------------------------------------------------------

    def work(self) -> None:
        if not self.queue:
            return
        now = time.time()
        for queued in [q for q in self.queue if q.job.deadline is not None and q.job.deadline < now]:
            self._drop(queued, "timeout")
        with torch.inference_mode():  # a prompt's first piece stages its cached blocks as it is planned
            plan = self._plan()
        done = [self._prefill_whole(plan)] if plan.whole else []
        done += [self._prefill_piece(queued, n) for queued, n in plan.pieces]
        if done:
            self.metrics.observe_batch(sum(prompts for prompts, _ in done), sum(tokens for _, tokens in done))

    def _plan(self) -> Pass:
        """This pass's work. Prompts not started go in arrival order, each whole while its tokens to
        compute fit what is left of --prefill-chunk-tokens (without it, of the budget) and its K/V
        the staging room; one that would fit a pass of its own waits for the next, and the prompts
        after it too. A longer prompt is prefilled in pieces (holding its staging region from its
        first piece to its last), each pass giving it what the whole prompts left, at least a
        quarter of the chunk: a prompt that fits a chunk waits for one pass at most, not for a long
        prompt's last piece, the long prompt moves on every pass, and a pass computes at most a
        chunk and a quarter. One more prompt may go in pieces beside it if it needs less than what
        that one has left (a file beside a repository, an editor's file its prefix cache lost): the
        shorter takes three quarters of the pieces' part of each pass, so that it ends first, and the
        other a quarter, so that it never stalls. Other long prompts wait their turn; the prompts
        after them that fit go."""
        budget = self.limits.prefill_token_budget
        chunk = min(self.opts.prefill_chunk_tokens or budget, budget)
        started = [q for q in self.queue if q.offset is not None]  # the prompts in pieces
        left, room, packed = chunk, self.kv.regions.largest_free(), 0
        plan = Pass()
        for queued in self.queue:
            if left <= 0:
                break
            if queued.offset is not None:
                continue
            request = queued.job.request
            matched = self._match(request)
            need = len(request.prompt_ids) - self._tokens(matched[0])
            # a prompt that cannot go in pieces (its prompt logprobs) goes whole, first in its pass
            if need <= left or (not plan.whole and not self._in_pieces(request)):
                if packed + len(request.prompt_ids) > room:
                    break  # no staging room: it and the prompts after it wait
                plan.whole.append(queued)
                plan.found.append(self._lookup(request, matched))
                left, packed = left - need, packed + len(request.prompt_ids)
            elif need <= chunk or not self._in_pieces(request):
                break  # whole in the next pass
            elif not started or (len(started) < IN_PIECES_MAX and need < min(q.compute for q in started)):
                if plan.whole:  # their region first: it was counted in the room
                    plan.offset = self.kv.regions.alloc(packed)
                if self._start_pieces(queued, matched):
                    started.append(queued)
                break  # the prompts after it go in the next pass
        if plan.whole and plan.offset is None:
            plan.offset = self.kv.regions.alloc(packed)
        # what the whole prompts left, the shortest first: each longer one keeps a quarter of it,
        # and what the shorter does not need goes to the others
        rest = max(left, chunk // 4, len(started))
        keep = max(1, rest // 4)
        for i, queued in enumerate(sorted(started, key=lambda q: q.compute)):
            plan.pieces.append((queued, min(queued.compute, rest - keep * (len(started) - 1 - i))))
            rest -= plan.pieces[-1][1]
        return plan

    def _in_pieces(self, request) -> bool:
        """Whether a prompt may be prefilled in pieces: not when its prompt logprobs were asked for
        (every position's logits come from one pass)."""
        return self.opts.prefill_chunk_tokens > 0 and not request.prompt_logprobs

    def _start_pieces(self, queued: Queued, matched: tuple[list[int], list[bytes]]) -> bool:
        """Give a prompt prefilled in pieces its staging region, its cached blocks (`matched`) staged
        there (now: the prompts of this pass go into the cache, and could evict them); False if the
        staging has no room for it."""
        request = queued.job.request
        n = len(request.prompt_ids)
        offset = self.kv.regions.alloc(n)
        if offset is None:
            return False
        queued.offset = offset
        queued.done = queued.cached = self._stage_cached([queued.job], [self._lookup(request, matched)], offset)[0]
        self._computed(queued, queued.compute - (n - queued.done))  # what it needs now, not when it came
        return True

    def _computed(self, queued: Queued, n: int) -> None:
        queued.compute -= n
        self.queued_tokens -= n

    def _prefill_whole(self, plan: Pass) -> tuple[int, int]:
        """The pass's whole prompts, packed in one forward; -> (prompts, tokens) prefilled."""
        batch = [q.job for q in plan.whole]
        for queued in plan.whole:
            self._dequeue(queued)
        offset, total = plan.offset, sum(len(j.request.prompt_ids) for j in batch)
        try:
            with torch.inference_mode():
                past = self._stage_cached(batch, plan.found, offset)
                results = self.engine.run([j.request for j in batch], offset, [j.forks for j in batch], past)
            self.kv.staging.record_write()
        except Exception as e:  # a failing batch ends its requests, the worker lives on
            log.exception("prefill batch failed")
            self._fail(batch, offset, total, e)
            return 0, 0
        for job in batch:
            self.kv.regions.share(offset, 1 + len(job.forks))
            offset += len(job.request.prompt_ids)
        jobs = [j for j in batch for _ in range(1 + len(j.forks))]
        for job, res in zip(jobs, results):
            self._after_prefill(job, res)
        self._keep_prompts(batch, plan.offset)
        return len(batch), total - sum(past)

    def _prefill_piece(self, queued: Queued, n: int) -> tuple[int, int]:
        """The next `n` tokens of a prompt prefilled in pieces; the last piece samples its first
        token. -> (prompts, tokens) prefilled: (1, n) for the last piece."""
        job = queued.job
        last = n == queued.compute
        try:
            with torch.inference_mode():
                if not last:
                    self.engine.extend(job.request, queued.offset, queued.done, queued.done + n)
                    # its full blocks so far, at once: a cancel before its last piece (an editor's
                    # next keystroke) leaves them to the prompt that follows, and a prompt alike
                    # that comes meanwhile finds them
                    self._keep_start(job.request, queued.done + n, queued.offset)
                else:
                    results = self.engine.run([job.request], queued.offset, [job.forks], [queued.done])
            if last:
                self.kv.staging.record_write()
        except Exception as e:
            log.exception("prefill of a prompt's piece failed")
            self._dequeue(queued)
            self._fail([job], queued.offset, len(job.request.prompt_ids), e)
            return 0, 0
        self._computed(queued, n)
        queued.done += n
        if last:
            self._dequeue(queued)  # nothing left to compute
            self.kv.regions.share(queued.offset, 1 + len(job.forks))
            for res in results:
                res.cached = queued.cached  # not the earlier pieces'
                self._after_prefill(job, res)
            self._keep_prompts([job], queued.offset)
        return int(last), n

    def _fail(self, batch: list[P.Prefill], offset: int, n: int, e: Exception) -> None:
        self.kv.regions.free(offset, n)
        for job in batch:
            for request in (job.request, *job.forks):
                self.link.send(P.WorkerError(request.id, f"prefill failed: {e}"))

    def _after_prefill(self, job: P.Prefill, res: PrefillResult) -> None:
        """The first token goes to the frontend at once (time to first token); the KV to decode,
        unless the request ended here."""
        request = res.request
        ev = TextStream(self.model.tokenizer, request).event(
            res.first_token, first_token_finish(request, res.first_token, self.model.cfg.eos_token_ids),
            res.logprob, res.top_tokens)
        reason = "cancelled" if self.cancelled.pop(request.id, None) is not None else ev.finish.reason
        token = P.Token(ev.index, ev.token_id, ev.text, ev.logprob, res.top_tokens)
        self.frontends.send(request.reply_to, P.FirstToken(request.id, token, reason, res.prompt_logprobs, res.cached))
        if reason is None:
            # Prefilled goes once the decode worker has the KV (on_socket): this worker's death
            # before then ends the request's attempt here, and it resumes; it never waits for KV
            # that died with this worker.
            self.kv.send(job, request, res.first_token, ev.text, res.kv_offset, res.kv_len)
        else:
            self.link.send(P.Prefilled(request.id, reason))
            self.kv.regions.release(res.kv_offset, res.kv_len)


    # ---- the prefix cache -------------------------------------------------------------------------

    def _looks_up(self, request) -> bool:
        """Whether `request` may take its prompt's start from the prefix cache: not when its prompt
        logprobs need every position computed, nor when its client asked for none (cache_prompt)."""
        return self.cache is not None and request.cache_prompt and not request.prompt_logprobs

    def _match(self, request) -> tuple[list[int], list[bytes]]:
        """The prefix cache's blocks for `request` now, and its block hashes (PrefixCache.match);
        none where it takes none."""
        if not self._looks_up(request):
            return [], []
        return self.cache.match(request.prompt_ids, block_namespace(self.model.cfg, request))

    def _lookup(self, request, matched: tuple[list[int], list[bytes]]) -> list[int]:
        """`matched` for a prompt about to be prefilled, counted in the cache's metrics."""
        return self.cache.lookup(request.prompt_ids, matched) if self._looks_up(request) else []

    def _tokens(self, blocks: list[int]) -> int:
        return len(blocks) * self.cache.block_tokens if blocks else 0

    def _stage_cached(self, batch: list[P.Prefill], found: list[list[int]], offset: int) -> list[int]:
        """Copy each prompt's cached blocks to the start of its staging region; -> cached tokens each."""
        past = []
        for job, blocks in zip(batch, found):
            n = len(job.request.prompt_ids)
            if blocks:
                self.cache.copy_out(blocks, self.kv.staging.tensor[:, :, offset : offset + n])
            past.append(self._tokens(blocks))
            offset += n
        return past

    def _keep_prompts(self, batch: list[P.Prefill], offset: int) -> None:
        """Put the batch's prompts into the prefix cache, from the K/V just staged, once their first
        tokens and K/V have gone: hashing and copying a long prompt's blocks (a copy a block) would
        otherwise delay its first token. Their staging is intact still, even where a request ended
        at its first token and gave its region back: only a later prefill writes it, after these
        copies (on the same stream, on a GPU). A failed insert costs the cache those blocks, no
        request anything."""
        try:
            with torch.inference_mode():
                for job in batch:
                    self._keep_start(job.request, len(job.request.prompt_ids), offset)
                    offset += len(job.request.prompt_ids)
        except Exception:
            log.exception("keeping prompts in the prefix cache failed")

    def _keep_start(self, request, n: int, offset: int) -> None:
        """Put the start of a prompt, its first `n` tokens staged from `offset`, into the prefix cache."""
        if self.cache is not None:
            self.cache.insert(request.prompt_ids[:n], self.kv.staging.tensor[:, :, offset : offset + n],
                              block_namespace(self.model.cfg, request))


def prefix_cache(opts: WorkerOptions, model: LoadedModel) -> PrefixCache | None:
    """The prefix cache --prefix-cache-mb gives room for, or None."""
    cfg, block = model.cfg, opts.prefix_block_tokens
    block_bytes = cfg.n_layer * 2 * block * cfg.kv_dim * model.dtype.itemsize
    mb = opts.prefix_cache_mb
    if mb < 0:
        mb = CPU_CACHE_MB
        if model.device.type == "cuda":
            mb = min(GPU_CACHE_MB, int(available_bytes(model.device) * GPU_FREE_SHARE) // 2**20)
    blocks = mb * 2**20 // block_bytes
    if blocks < 1:
        return None
    log.info("prefix cache: %d blocks of %d tokens (%d MiB)", blocks, block, blocks * block_bytes // 2**20)
    return PrefixCache(cfg.n_layer, cfg.kv_heads, cfg.head_dim, block, blocks, model.dtype, model.device)


def run(opts: WorkerOptions, model: LoadedModel) -> int:
    return PrefillWorker(opts, model, derive_limits(opts.limits, model.cfg.n_positions)).serve()
