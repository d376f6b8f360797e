"""Text Generation Inference's API: /generate, /generate_stream, / (the compatibility route the
`text-generation` client posts to), /info. Stop sequences stay in the output, as in TGI."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import uuid4

import msgspec
from fastapi import APIRouter, Request

from splitserve.common import protocol as P
from splitserve.common.params import MAX_STOP_SEQUENCES, MAX_TOP_N, SEED_LIMIT

from .api_context import ApiContext
from .api_errors import invalid, tgi_error
from .replies import Answer, EventStream, Json, Replies, gather
from .tgi_schema import TgiCompatRequest, TgiError, TgiInfo, TgiParameters, TgiRequest, TgiResponse, TgiStreamEvent

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default

ERRORS = {status: {"model": TgiError} for status in (422, 424, 429, 503)}
STREAM_DOC = {200: {"description": "server-sent events, one per token, each `data:` a TgiStreamEvent "
                                   "(an error mid-stream is a `data:` TgiError)",
                    "content": {"text/event-stream": {"schema": TgiStreamEvent.model_json_schema()}}}}


@dataclass(frozen=True)
class TgiJob:
    msg: P.Generate
    inputs: str
    params: TgiParameters


def tgi_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(tags=["TGI"])

    @router.post("/generate", summary="Generate text", responses={200: {"model": TgiResponse}, **ERRORS})
    async def generate(body: TgiRequest, request: Request) -> Json:
        return Json(await _answer(ctx, body, request, "/generate"))

    @router.post("/generate_stream", summary="Generate text, streamed as server-sent events",
                 responses={**STREAM_DOC, **ERRORS})
    async def generate_stream(body: TgiRequest, request: Request) -> EventStream:
        return _stream(ctx, await ctx.prepare(request, tgi_job, ctx, body, True), "/generate_stream")

    @router.post("/", summary="TGI's compatibility route: /generate (as a one-element list) or, with "
                 "`stream: true`, /generate_stream", responses={200: {"model": list[TgiResponse]}, **ERRORS})
    async def compat(body: TgiCompatRequest, request: Request):
        if body.stream:
            return _stream(ctx, await ctx.prepare(request, tgi_job, ctx, body, True), "/")
        return Json([await _answer(ctx, body, request, "/")])

    @router.get("/info", summary="Model and limits", response_model=TgiInfo)
    async def info(request: Request) -> TgiInfo:
        fleet = ctx.core.fleet or P.Fleet()
        return TgiInfo(model_id=ctx.model_id, model_dtype=fleet.dtype,
                       model_device_type=fleet.device.split(":")[0] if fleet.device else None,
                       max_concurrent_requests=fleet.max_concurrent, max_stop_sequences=MAX_STOP_SEQUENCES,
                       max_input_tokens=ctx.limits.max_input_tokens, max_total_tokens=ctx.limits.max_total_tokens,
                       max_top_n_tokens=MAX_TOP_N, version=request.app.version, zmq_endpoints=fleet.zmq_endpoints)

    return router


async def _answer(ctx: ApiContext, body: TgiRequest, request: Request, route: str) -> dict:
    job = await ctx.prepare(request, tgi_job, ctx, body, False)
    (answer,) = await gather(Replies(ctx.door, route, [job.msg]), 1, request)
    text = body.inputs + answer.text if job.params.return_full_text else answer.text
    out = {"generated_text": text}
    if job.params.details:
        out["details"] = _details(ctx, job, answer)
    return out


def _stream(ctx: ApiContext, job: TgiJob, route: str) -> EventStream:
    replies = Replies(ctx.door, route, [job.msg])  # a refusal is an HTTP error, before the stream starts

    async def events():
        answer = Answer()
        async for _, batch in replies:
            answer.add(batch)
            yield _batch_events(ctx, job, answer, batch)

    return EventStream(events(), replies, lambda e: _sse(tgi_error(e)[1]))


def _sse(data: dict) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


# A stream event as TGI writes it, its keys in TGI's order; structs encode without a dict per token.
class _TgiToken(msgspec.Struct):
    id: int
    text: str
    logprob: float | None
    special: bool


class _SseEvent(msgspec.Struct):
    index: int
    token: _TgiToken
    generated_text: str | None = None
    details: dict | None = None


class _SseEventTop(msgspec.Struct):  # with `top_tokens`, only when they were asked for
    index: int
    token: _TgiToken
    top_tokens: list[_TgiToken]
    generated_text: str | None = None
    details: dict | None = None


_json = msgspec.json.Encoder()


def _batch_events(ctx: ApiContext, job: TgiJob, answer: Answer, batch: P.TokenBatch) -> bytes:
    """One chunk with an event per token of the batch: the tokens that came together are written
    together."""
    top, is_special = job.params.top_n_tokens, ctx.is_special
    events = [_SseEventTop(t.index + 1, _TgiToken(t.token_id, t.text, t.logprob, is_special(t.token_id)),
                           _top_tokens(ctx, t)) if top else
              _SseEvent(t.index + 1, _TgiToken(t.token_id, t.text, t.logprob, is_special(t.token_id)))
              for t in batch.tokens]
    if batch.finish_reason is not None and events:
        _finish(events[-1], job, answer)
    return b"".join([b"data: " + _json.encode(e) + b"\n\n" for e in events])


def _finish(event: _SseEvent | _SseEventTop, job: TgiJob, answer: Answer) -> None:
    p = job.params
    event.generated_text = job.inputs + answer.text if p.return_full_text else answer.text
    if p.details:
        event.details = {"finish_reason": answer.finish_reason, "generated_tokens": len(answer.tokens),
                         "seed": answer.seed, "input_length": answer.prompt_tokens}


def _details(ctx: ApiContext, job: TgiJob, answer: Answer) -> dict:
    details = {
        "finish_reason": answer.finish_reason,
        "generated_tokens": len(answer.tokens),
        "seed": answer.seed,
        "prefill": _prefill(ctx, job.msg.prompt_ids, answer.prompt_logprobs) if job.params.decoder_input_details
        else [],
        "tokens": [_token(ctx, t.token_id, t.text, t.logprob) for t in answer.tokens],
    }
    if job.params.top_n_tokens:
        details["top_tokens"] = [_top_tokens(ctx, t) for t in answer.tokens]
    return details


def _token(ctx: ApiContext, token_id: int, text: str, logprob: float | None) -> dict:
    return {"id": token_id, "text": text, "logprob": logprob, "special": ctx.is_special(token_id)}


def _top_tokens(ctx: ApiContext, token: P.Token) -> list[_TgiToken]:
    return [_TgiToken(i, ctx.piece(i), lp, ctx.is_special(i)) for i, lp in token.top_tokens or ()]


def _prefill(ctx: ApiContext, ids: list[int], logprobs: list[float | None] | None) -> list[dict]:
    logprobs = logprobs or [None] * len(ids)
    return [{"id": i, "text": ctx.piece(i), "logprob": lp} for i, lp in zip(ids, logprobs)]


# ---- validation -----------------------------------------------------------------------------


def tgi_job(ctx: ApiContext, body: TgiRequest, stream: bool) -> TgiJob:
    """The request for the core, or ApiError (422) naming the parameter, what it must be, and what was given."""
    p = body.parameters
    _refuse_unsupported(p, stream)
    _check_ranges(p)
    ids = ctx.tokenizer.encode(body.inputs)
    if p.truncate is not None:
        if not 0 < p.truncate <= ctx.limits.max_input_tokens:
            raise invalid(f"`truncate` must be strictly positive and at most {ctx.limits.max_input_tokens} "
                          f"(max_input_tokens). Given: {p.truncate}", "truncate")
        ids = ids[-p.truncate:]
    max_new = p.max_new_tokens
    if max_new is None:
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, ctx.limits.max_total_tokens - len(ids)))
    temperature = 1.0 if p.temperature is None else p.temperature
    # As TGI: any active warper means sampling, do_sample or not.
    warped = temperature != 1.0 or (p.top_k or 0) > 0 or (p.top_p or 1.0) < 1.0 or (p.typical_p or 1.0) < 1.0
    params = P.GenerateParams(
        max_new_tokens=max_new, do_sample=p.do_sample or warped, temperature=temperature, top_k=p.top_k or 0,
        top_p=p.top_p or 1.0, typical_p=p.typical_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed, stop=p.stop, strip_stop=False,
        logprobs=p.details, top_n_tokens=p.top_n_tokens or 0, prompt_logprobs=p.decoder_input_details,
    )
    return TgiJob(P.Generate(uuid4().hex, prompt_ids=ids, params=params), body.inputs, p)


def _refuse_unsupported(p: TgiParameters, stream: bool) -> None:
    if p.watermark:
        raise invalid("`watermark` is not supported by this server; leave it false", "watermark")
    if p.grammar is not None:
        raise invalid("`grammar` (constrained decoding) is not supported by this server; leave it null", "grammar")
    if p.adapter_id:
        raise invalid("`adapter_id`: LoRA adapters are not supported by this server", "adapter_id")
    if p.best_of is not None and p.best_of != 1:
        raise invalid(f"`best_of` must be 1 (max_best_of): this server returns a single sequence. Given: {p.best_of}",
                      "best_of")
    if stream and p.decoder_input_details:
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens", "decoder_input_details")


def _check_ranges(p: TgiParameters) -> None:
    checks = [
        ("max_new_tokens", p.max_new_tokens, lambda v: v > 0, "must be strictly positive"),
        ("temperature", p.temperature, lambda v: v > 0, "must be strictly positive"),
        ("repetition_penalty", p.repetition_penalty, lambda v: v > 0, "must be strictly positive"),
        ("frequency_penalty", p.frequency_penalty, lambda v: -2 <= v <= 2, "must be >= -2.0 and <= 2.0"),
        ("top_k", p.top_k, lambda v: v > 0, "must be strictly positive"),
        ("top_p", p.top_p, lambda v: 0 < v <= 1, "must be > 0.0 and <= 1.0"),
        ("typical_p", p.typical_p, lambda v: 0 < v <= 1, "must be > 0.0 and <= 1.0"),
        ("top_n_tokens", p.top_n_tokens, lambda v: 0 <= v <= MAX_TOP_N, f"must be >= 0 and <= {MAX_TOP_N}"),
        ("seed", p.seed, lambda v: 0 <= v < SEED_LIMIT, "must be >= 0 and < 2**63"),
        ("stop", p.stop, lambda v: len(v) <= MAX_STOP_SEQUENCES, f"supports up to {MAX_STOP_SEQUENCES} stop sequences"),
    ]
    for name, value, ok, rule in checks:
        if value is not None and not ok(value):
            given = len(value) if isinstance(value, list) else value
            raise invalid(f"`{name}` {rule}. Given: {given}", name)
