"""llama.cpp's /infill, the fill-in-the-middle endpoint the llama.vim and llama.vscode plug-ins call,
answered as llama.cpp's server answers it (tools/server: the infill route, process_token's stop
checks, the final result's fields, response_fields).

The prompt is laid out by infill_prompt.py. A request stops where llama.cpp's would: at n_predict,
an end-of-generation token (the model's end of text, the FIM layout's end tokens), a stop string
(cut from the content), or two checks the gateway runs on each token's text: `n_indent` (the first
line after the answer's first new line that has text indented less: stop, keeping that line's
indentation only) and `t_max_predict_ms` (a token holding a new line, once that long has passed since
the first token). Those two end the request on its workers too. `n_predict` 0 prefills the prompt
into the prefix cache and answers empty content: one token is sampled and not returned.

Streaming sends one event per decode step (`content`: the step's text, `stop` false), then the final
answer with empty `content`, as llama.cpp does; no `[DONE]`. Errors are llama.cpp's
`{"error": {"code", "message", "type"}}`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from uuid import uuid4

import msgspec
from fastapi import APIRouter, Request

from splitserve.common import protocol as P
from splitserve.common.params import MAX_LOGIT_BIAS_VALUE

from .api_context import ApiContext
from .api_errors import ApiError, invalid
from .infill_prompt import InfillPrompts
from .infill_schema import InfillError, InfillRequest
from .replies import EventStream, Json, Replies, close_on_disconnect

INFILL_PATH = "/infill"
ERRORS = {status: {"model": InfillError} for status in (400, 429, 503)}
# error_type -> (HTTP status, llama.cpp's error type)
LLAMA_ERRORS = {"validation": (400, "invalid_request_error"), "unauthorized": (401, "authentication_error"),
                "payload_too_large": (413, "invalid_request_error"), "overloaded": (429, "unavailable_error"),
                "unavailable": (503, "unavailable_error"), "timeout": (504, "server_error")}
# llama.cpp's sampler names and letters -> the setting each applies; the others (infill, dry, xtc,
# top_n_sigma) splitserve lacks and ignores
SAMPLERS = {"penalties": "penalties", "e": "penalties", "top_k": "top_k", "k": "top_k", "typ_p": "typ_p",
            "y": "typ_p", "top_p": "top_p", "p": "top_p", "min_p": "min_p", "m": "min_p",
            "temperature": "temperature", "t": "temperature"}
# llama.cpp's default chain, in order (of those splitserve has)
DEFAULT_SAMPLERS = ("penalties", "top_k", "typ_p", "top_p", "min_p", "temperature")
LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # as -1: a random seed


def infill_error(e: ApiError) -> tuple[int, dict]:
    status, kind = LLAMA_ERRORS.get(e.error_type, (500, "server_error"))
    return status, {"error": {"code": status, "message": e.message, "type": kind}}


@dataclass(frozen=True)
class InfillJob:
    msg: P.Generate
    body: InfillRequest
    samplers: tuple[str, ...]  # the sampling settings applied


def infill_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(tags=["llama.cpp"])
    limits = ctx.limits
    prompts = InfillPrompts(ctx.fim, limits.max_input_tokens, limits.max_total_tokens) if ctx.fim else None

    @router.post(INFILL_PATH, summary="Fill in the middle for editors, as llama.cpp's server (llama.vim, "
                 "llama.vscode); `stream` answers with server-sent events", responses=ERRORS)
    async def infill(body: InfillRequest, request: Request):
        job = await ctx.prepare(request, infill_job, ctx, prompts, body)
        started = time.perf_counter()
        replies = Replies(ctx.door, INFILL_PATH, [job.msg])  # a refusal is an HTTP error, before any stream starts
        completion = Completion(job, started)
        if body.stream:
            return EventStream(_events(ctx, completion, replies), replies, lambda e: _sse(infill_error(e)[1]))
        await _complete(completion, replies, request)
        return Json(completion.final(ctx, stream=False))

    return router


def infill_job(ctx: ApiContext, prompts: InfillPrompts | None, body: InfillRequest) -> InfillJob:
    """The request for the core, or ApiError (400) saying what is wrong."""
    if prompts is None:
        raise invalid("infill is not supported by this model: its tokenizer has no fill-in-the-middle tokens "
                      "(a prefix, a suffix and a middle marker such as <fim_prefix>, <fim_suffix>, <fim_middle>)")
    if body.n_predict < -1:
        raise invalid(f"`n_predict` must be -1 (as many tokens as fit), 0 (the prompt only) or more. "
                      f"Given: {body.n_predict}", "n_predict")
    if body.repeat_last_n < -1:
        raise invalid(f"`repeat_last_n` must be -1 (every token), 0 (no penalties) or more. "
                      f"Given: {body.repeat_last_n}", "repeat_last_n")
    max_new = max(body.n_predict, 1)  # 0: one token, sampled and dropped, so that the prompt is prefilled
    ids = prompts.ids(body.input_prefix, body.prompt, body.input_suffix, body.input_extra, max_new)
    if body.n_predict == -1:
        max_new = max(1, ctx.limits.max_total_tokens - len(ids))
    names = body.samplers if body.samplers is not None else DEFAULT_SAMPLERS
    on = {SAMPLERS[name] for name in names if name in SAMPLERS}  # a string is letters: each one a name
    penalties = "penalties" in on and body.repeat_last_n != 0  # llama.cpp: no window, no penalties
    greedy = body.temperature <= 0
    params = P.GenerateParams(
        max_new_tokens=max_new, do_sample=not greedy,
        temperature=body.temperature if "temperature" in on and not greedy else 1.0,
        top_k=max(body.top_k, 0) if "top_k" in on else 0,  # llama.cpp: <= 0 is off, as >= 1 for top_p
        top_p=min(body.top_p, 1.0) if "top_p" in on else 1.0,
        typical_p=min(body.typical_p, 1.0) if "typ_p" in on else 1.0,
        min_p=min(max(body.min_p, 0.0), 1.0) if "min_p" in on else 0.0,  # llama.cpp: <= 0 is off
        repetition_penalty=body.repeat_penalty if penalties else 1.0,
        frequency_penalty=body.frequency_penalty if penalties else 0.0,
        presence_penalty=body.presence_penalty if penalties else 0.0,
        penalty_last_n=max(body.repeat_last_n, 0) if penalties else 0,  # -1: every token
        seed=None if body.seed < 0 or body.seed == LLAMA_DEFAULT_SEED else body.seed,
        stop=[s for s in body.stop if s], stop_token_ids=list(prompts.fim.end_ids),
        strip_stop=False,  # the stop string stays in the text, to be found there and cut (stopping_word)
        cache_prompt=body.cache_prompt, logit_bias=_logit_bias(ctx, body.logit_bias),
    )
    applied = tuple(name for name in DEFAULT_SAMPLERS if name in on)
    return InfillJob(P.Generate(uuid4().hex, prompt_ids=ids, params=params), body, applied)


def _logit_bias(ctx: ApiContext, given) -> list[tuple[int, float]]:
    """llama.cpp's logit_bias as (id, bias) pairs: a token is an id (a string of digits too, as a key)
    or a text whose tokens each get the bias; false is -inf; a token named twice gets the sum, as
    llama.cpp applies each entry; the sums are clamped to OpenAI's range, [-100, 100]."""
    pairs = given.items() if isinstance(given, dict) else given or ()
    total: dict[int, float] = {}
    for token, bias in pairs:
        bias = float("-inf") if bias is False else bias
        if isinstance(token, int) or token.isdecimal():
            ids = [int(token)]
        else:
            ids = ctx.tokenizer.encode(token, add_special_tokens=False)
        for t in ids:
            total[t] = total.get(t, 0.0) + bias
    return [(t, b if b == float("-inf") else min(max(b, -MAX_LOGIT_BIAS_VALUE), MAX_LOGIT_BIAS_VALUE))
            for t, b in total.items()]


class Completion:
    """One request's answer as llama.cpp's server keeps it (its slot's generated text and the checks
    run on it after each token), and its answers in llama.cpp's shape."""

    def __init__(self, job: InfillJob, started: float):
        self.job, self.started = job, started
        body = job.body
        self.prefill_only = body.n_predict == 0
        self.n_indent, self.t_max_predict_s = body.n_indent, body.t_max_predict_ms / 1e3
        self.text = ""
        self.ids: list[int] = []  # with return_tokens
        self.n = 0  # tokens predicted
        self.first_at: float | None = None  # the first token's arrival: llama.cpp's start of generation
        self.last_at = started
        self.cached = 0
        self.seed: int | None = None
        self.stop_type, self.stopping_word, self.truncated = "none", "", False
        self.has_new_line = False
        self.line_start = 0  # llama.cpp's last_nl_pos: where the line after the last new line seen begins
        self.done = False

    def add(self, batch: P.TokenBatch) -> tuple[str, list[int]]:
        """A decode step's tokens; -> the text and ids they add, up to where the request stops."""
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at, self.cached, self.seed = now, batch.cached_tokens, batch.seed
        self.last_at = now
        if self.prefill_only:  # the one token sampled is not the client's
            self.done, self.stop_type = True, "limit"
            return "", []
        text, ids = [], []
        last = len(batch.tokens) - 1
        for i, token in enumerate(batch.tokens):
            piece = token.text
            if i == last and batch.finish_reason == "stop_sequence":
                piece = self._cut_stop(piece)
            text.append(piece)
            if self.job.body.return_tokens:
                ids.append(token.token_id)
            if self._token(piece, now):
                self.done, self.stop_type = True, "limit"
                break
        else:
            if batch.finish_reason is not None:
                self.done = True
                self._finished(batch.finish_reason)
        self.ids += ids
        return "".join(text), ids

    def _cut_stop(self, piece: str) -> str:
        """The final token's text ends with the stop string it completed (held back until then): cut it."""
        word = max((s for s in self.job.msg.params.stop if piece.endswith(s)), key=len, default="")
        self.stopping_word = word
        return piece[: len(piece) - len(word)]

    def _token(self, piece: str, now: float) -> bool:
        """llama.cpp's checks once a token's text joins the answer; True: stop here."""
        self.text += piece
        self.n += 1
        stop = False
        if self.has_new_line and self.n_indent > 0:
            if self.line_start > 0:  # the line after a new line: its indentation, if it has text
                pos = self.line_start
                while pos < len(self.text) and self.text[pos] in " \t":
                    pos += 1
                if pos < len(self.text) and pos - self.line_start < self.n_indent:
                    self.text, stop = self.text[:pos], True  # the line's indentation stays, its text goes
            newline = self.text.find("\n", self.line_start)
            if newline >= 0:
                self.line_start = newline + 1
        if "\n" in piece:
            self.has_new_line = True
            if self.t_max_predict_s > 0 and now - (self.first_at or now) > self.t_max_predict_s:
                stop = True
        return stop

    def _finished(self, reason: str) -> None:
        if reason == "length":
            self.stop_type = "limit"
            self.truncated = self.job.body.n_predict == -1  # the context ran out, not n_predict
        elif reason == "stop_sequence" and self.stopping_word:
            self.stop_type = "word"
        else:  # the end of text, or one of the FIM layout's end tokens (a stop token id)
            self.stop_type = "eos"

    # ---- answers ------------------------------------------------------------------------------

    def partial(self, text: str, ids: list[int]) -> dict:
        return {"index": 0, "content": text, "tokens": ids, "stop": False, "id_slot": 0, "tokens_predicted": self.n,
                "tokens_evaluated": len(self.job.msg.prompt_ids)}

    def final(self, ctx: ApiContext, stream: bool) -> dict:
        body, prompt_ids = self.job.body, self.job.msg.prompt_ids
        fields = body.response_fields
        wants_prompt = not fields or any(f.split("/", 1)[0] == "prompt" for f in fields)
        out = {
            "index": 0, "content": "" if stream else self.text, "tokens": [] if stream else self.ids,
            "id_slot": 0,  # splitserve has no slots
            "stop": True, "model": ctx.model_id, "tokens_predicted": self.n, "tokens_evaluated": len(prompt_ids),
            "generation_settings": self._settings(ctx),
            "prompt": ctx.tokenizer.decode(prompt_ids) if wants_prompt else "",
            "has_new_line": self.has_new_line, "truncated": self.truncated, "stop_type": self.stop_type,
            "stopping_word": self.stopping_word,
            "tokens_cached": self.cached,  # prompt tokens taken from the prefix cache
            "timings": self._timings(),
        }
        return select(out, fields) if fields else out

    def _settings(self, ctx: ApiContext) -> dict:
        body, params = self.job.body, self.job.msg.params
        return {"n_predict": body.n_predict, "seed": self.seed if self.seed is not None else body.seed,
                "temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p,
                "typical_p": body.typical_p, "min_p": body.min_p, "repeat_penalty": body.repeat_penalty,
                "repeat_last_n": body.repeat_last_n, "frequency_penalty": body.frequency_penalty,
                "presence_penalty": body.presence_penalty,
                "stop": params.stop, "n_indent": body.n_indent,
                "t_max_predict_ms": body.t_max_predict_ms, "cache_prompt": body.cache_prompt,
                "stream": body.stream, "samplers": list(self.job.samplers), "n_ctx": ctx.limits.max_total_tokens}

    def _timings(self) -> dict:
        """llama.cpp's timings; the prompt's time is the time to first token (queueing included)."""
        first = self.first_at or self.last_at  # None only for a request its client left before any token
        prompt_n = len(self.job.msg.prompt_ids) - self.cached
        prompt_ms = 1e3 * (first - self.started)
        predicted_ms = 1e3 * (self.last_at - first)
        return {"cache_n": self.cached, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / prompt_n, "prompt_per_second": _per_second(prompt_n, prompt_ms),
                "predicted_n": self.n, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / self.n if self.n else 0.0,
                "predicted_per_second": _per_second(self.n, predicted_ms)}


def _per_second(n: int, ms: float) -> float:
    return 1e3 * n / ms if ms > 0 else 0.0


def select(answer: dict, paths: list[str]) -> dict:
    """llama.cpp's response_fields: each path's value under the path itself (`timings/prompt_n`); a
    path that leads nowhere is left out."""
    out = {}
    for path in paths:
        value = answer
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


async def _complete(completion: Completion, replies: Replies, request: Request) -> None:
    """The request to its end (or to where a check of completion's stops it); cancelled if the
    client disconnects first."""
    watcher = asyncio.create_task(close_on_disconnect(request.receive, replies))
    try:
        async for _, batch in replies:
            completion.add(batch)
            if completion.done:
                replies.close("ok")  # stopped by a check of completion's: the answer is complete
                break
    finally:
        watcher.cancel()
        replies.close()


async def _events(ctx: ApiContext, completion: Completion, replies: Replies):
    async for _, batch in replies:
        text, ids = completion.add(batch)
        if not completion.prefill_only:
            yield _sse(completion.partial(text, ids))
        if completion.done:
            replies.close("ok")
            break
    yield _sse(completion.final(ctx, stream=True))


def _sse(data: dict) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"
