"""The in-process Engine: a prefill engine and a decode engine in one process, with a local
handoff (staging buffer -> decode slot). Used by `splitserve generate` and the engine benchmark,
and as the reference the served pipeline is measured against.

Continuous batching: between decode steps, waiting requests are prefilled (as many as free
slots and the token budget allow) and join the running batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.common.params import Finish, Limits
from splitserve.common.loading import LoadedModel
from splitserve.common.request import GenerateRequest, TokenEvent
from splitserve.common.text_stream import TextStream, first_token_finish
from splitserve.decode_worker.engine import DecodeEngine
from splitserve.prefill_worker.engine import PrefillEngine, PrefillResult, take_batch


@dataclass(frozen=True)
class EngineOptions:
    num_slots: int = 16
    max_total_tokens: int = 0  # 0: the model's positions
    max_input_tokens: int = 0  # 0: max_total_tokens - 1
    prefill_token_budget: int = 0  # 0: max_total_tokens
    key_bucket: int = 8
    cuda_graphs: bool = True  # decode replays captured graphs; ignored off CUDA, as by the decode worker
    graph_key_step: int = 256


@dataclass
class GenerateResult:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None


class Engine:
    def __init__(self, model: LoadedModel, opts: EngineOptions = EngineOptions()):
        self.model = model
        self.limits = Limits.derive(model.cfg.n_positions, opts.max_total_tokens, opts.max_input_tokens,
                                    opts.prefill_token_budget)
        self.prefill = PrefillEngine(model, self.limits.prefill_token_budget)
        self.decode = DecodeEngine(model, opts.num_slots, self.limits.max_total_tokens, opts.key_bucket,
                                   graphs=opts.cuda_graphs and model.device.type == "cuda",
                                   graph_key_step=opts.graph_key_step)
        self.waiting: deque[GenerateRequest] = deque()
        self.streams: dict[str, TextStream] = {}
        self.by_slot: dict[int, TextStream] = {}

    def submit(self, request: GenerateRequest) -> None:
        self.limits.check(len(request.prompt_ids), request.max_new_tokens)
        if request.id in self.streams:
            raise ValueError(f"request id {request.id!r} is already running")
        self.streams[request.id] = TextStream(self.model.tokenizer, request)
        self.waiting.append(request)

    def cancel(self, request_id: str) -> TokenEvent | None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return None
        if stream.slot is not None:
            self.decode.release(stream.slot)
            del self.by_slot[stream.slot]
        else:
            self.waiting.remove(stream.request)
        return TokenEvent(request_id, stream.index, -1, "", Finish.CANCELLED)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.decode.requests)

    def step(self) -> list[TokenEvent]:
        """Admit what fits, then one decode step; returns every token produced."""
        events = self._admit() if self.waiting and self.decode.free_slots else []
        if self.decode.requests:
            events += self._decode()
        return events

    def _admit(self) -> list[TokenEvent]:
        free = self.decode.free_slots
        budget = self.limits.prefill_token_budget
        batch = take_batch(self.waiting, budget)
        if len(batch) > free:  # more prompts than slots: the rest wait, in order
            self.waiting.extendleft(reversed(batch[free:]))
            batch = batch[:free]
        return [self._first_token(res) for res in self.prefill.run(batch)]

    def _first_token(self, res: PrefillResult) -> TokenEvent:
        request, stream = res.request, self.streams[res.request.id]
        finish = first_token_finish(request, res.first_token, self.model.cfg.eos_token_ids)
        ev = stream.event(res.first_token, finish, res.logprob, res.top_tokens)
        ev.prompt_logprobs = res.prompt_logprobs
        if ev.finish == Finish.NONE:
            kv = self.prefill.staging[:, :, res.kv_offset : res.kv_offset + res.kv_len]
            stream.slot = self.decode.admit(request, kv, res.first_token)
            self.by_slot[stream.slot] = stream
        else:
            del self.streams[request.id]
        return ev

    def _decode(self) -> list[TokenEvent]:
        out = self.decode.step()
        events = []
        for i, slot in enumerate(out.slots):
            stream = self.by_slot[slot]
            request = stream.request
            logprob = top = None
            if out.logprobs is not None and request.wants_details:
                logprob = out.logprobs[i]
                if request.top_n_tokens:
                    top = list(zip(out.top_ids[i][: request.top_n_tokens], out.top_logprobs[i][: request.top_n_tokens]))
            ev = stream.event(out.tokens[i], out.finish[i], logprob, top)
            if ev.finish != Finish.NONE:
                if out.finish[i] == Finish.NONE:  # a stop string: the engine still holds the slot
                    self.decode.release(slot)
                del self.by_slot[slot], self.streams[request.id]
            events.append(ev)
        return events

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Run requests to completion (continuous batching across them)."""
        results = {r.id: GenerateResult(r.id) for r in requests}
        for r in requests:
            self.submit(r)
        while self.busy:
            for ev in self.step():
                add_event(results[ev.request_id], ev)
        return [results[r.id] for r in requests]


def add_event(result: GenerateResult, ev: TokenEvent) -> None:
    if ev.prompt_logprobs is not None:
        result.prompt_logprobs = ev.prompt_logprobs
    result.token_ids.append(ev.token_id)
    result.text += ev.text
    if ev.logprob is not None:
        result.logprobs.append(ev.logprob)
    if ev.top_tokens is not None:
        result.top_tokens.append(ev.top_tokens)
    if ev.finish != Finish.NONE:
        result.finish_reason = ev.finish.reason
