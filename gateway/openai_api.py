"""OpenAI's API: /v1/completions (with `suffix` for fill-in-the-middle), /v1/chat/completions
(when the checkpoint ships a chat template), /v1/models. A matched stop string is cut from the
text, as OpenAI does.

`n` choices run as n requests that share one prefill of their prompt: its KV is copied into n
decode slots, and each choice samples with its own seed, derived from the request's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from uuid import uuid4

import msgspec
from fastapi import APIRouter, Request

from splitserve.common import protocol as P
from splitserve.common.fim import Fim
from splitserve.common.params import (
    MAX_LOGIT_BIAS_VALUE,
    MAX_TOP_N,
    SEED_LIMIT,
    ValidationError,
    derive_seed,
    random_seed,
)

from .api_context import ApiContext
from .api_errors import invalid, openai_error
from .chat_template import render_chat
from .openai_schema import MAX_N, ChatRequest, CompletionRequest, OpenAIError, SamplingFields
from .replies import Answer, EventStream, Replies, gather
from .validation import check_token_ids

DEFAULT_MAX_TOKENS = 16  # OpenAI's, for completions
FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
ERRORS = {status: {"model": OpenAIError} for status in (400, 429, 503)}


@dataclass(frozen=True)
class Fanout:
    """One OpenAI request as requests for the core: choice k answers prompt k // n."""

    msgs: list[P.Generate]
    prompts: list[list[int]]
    n: int
    echo_texts: list[str] | None = None  # per prompt, when the prompt is echoed
    logprobs: int | None = None

    def echo_ids(self, k: int) -> list[int] | None:
        return self.prompts[k // self.n] if self.echo_texts is not None else None

    def echo_text(self, k: int) -> str:
        return self.echo_texts[k // self.n] if self.echo_texts is not None else ""


def openai_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    @router.post("/completions", summary="Complete a prompt; `suffix` makes it fill-in-the-middle", responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        return await _respond(ctx, body, request, await ctx.prepare(request, completion_fanout, ctx, body), COMPLETION)

    @router.post("/chat/completions", summary="Chat, when the model's tokenizer ships a chat template",
                 responses=ERRORS)
    async def chat_completions(body: ChatRequest, request: Request):
        return await _respond(ctx, body, request, await ctx.prepare(request, chat_fanout, ctx, body), CHAT)

    @router.get("/models", summary="The model served")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": ctx.model_id, "object": "model", "created": ctx.started,
                                            "owned_by": "splitserve",
                                            "max_model_len": ctx.limits.max_total_tokens}]}

    return router


# ---- requests -------------------------------------------------------------------------------


def completion_fanout(ctx: ApiContext, body: CompletionRequest) -> Fanout:
    _check_sampling(body)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_N:
        raise invalid(f"`logprobs` must be in [0, {MAX_TOP_N}]. Given: {body.logprobs}", "logprobs")
    if body.best_of is not None and body.best_of > body.n:
        raise invalid(f"`best_of` ({body.best_of}) > `n` ({body.n}) is not supported: this server does not "
                      "rank sequences", "best_of")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    stop_ids: tuple[int, ...] = ()
    if body.suffix is None:
        prompts = _prompt_ids(ctx, body.prompt, ctx.tokenizer.encode)
    else:
        fim = _fim(ctx)
        room = min(ctx.limits.max_input_tokens, ctx.limits.max_total_tokens - max_tokens)
        suffix = fim.suffix_ids(body.suffix)
        prompts = [fim.prompt(ids, suffix, room) for ids in _prompt_ids(ctx, body.prompt, fim.prefix_ids)]
        stop_ids = fim.end_ids  # the layout's own end tokens end the middle, beside the model's end of text
    logprobs = body.logprobs
    msgs = _messages(body, prompts, max_tokens, logprobs=logprobs is not None, top_n=logprobs or 0,
                     prompt_logprobs=body.echo and logprobs is not None, stop_token_ids=stop_ids)
    echo_texts = [ctx.tokenizer.decode(ids) for ids in prompts] if body.echo else None
    return Fanout(msgs, prompts, body.n, echo_texts, logprobs)


def chat_fanout(ctx: ApiContext, body: ChatRequest) -> Fanout:
    _check_sampling(body)
    if ctx.chat_template is None:
        raise invalid("this model's tokenizer has no chat template (chat_template.jinja, or `chat_template` in "
                      "tokenizer_config.json), so chat completions are not available; use /v1/completions",
                      "messages")
    top = body.top_logprobs
    if top is not None and not body.logprobs:
        raise invalid("`top_logprobs` needs `logprobs` set to true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_N:
        raise invalid(f"`top_logprobs` must be in [0, {MAX_TOP_N}]. Given: {top}", "top_logprobs")
    messages = [{"role": m.role, "content": _content_text(m.content)} for m in body.messages]
    # As transformers' apply_chat_template: templates write the BOS themselves, so none is added.
    text = render_chat(ctx.chat_template, messages, ctx.tokenizer.special_tokens)
    ids = ctx.tokenizer.encode(text, add_special_tokens=False)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, ctx.limits.max_total_tokens - len(ids))
    msgs = _messages(body, [ids], max_tokens, logprobs=body.logprobs, top_n=top or 0)
    return Fanout(msgs, [ids], body.n, logprobs=(top or 0) if body.logprobs else None)


def _content_text(content) -> str:
    if isinstance(content, list):  # content parts: only text is understood
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


def _check_sampling(body: SamplingFields) -> None:
    checks = [
        ("temperature", body.temperature, lambda v: 0 <= v <= 2, "must be in [0, 2]"),
        ("top_p", body.top_p, lambda v: 0 < v <= 1, "must be in (0, 1]"),
        ("n", body.n, lambda v: 1 <= v <= MAX_N, f"must be in [1, {MAX_N}]"),
        ("max_tokens", body.max_tokens, lambda v: v >= 1, "must be at least 1"),
        ("frequency_penalty", body.frequency_penalty, lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
        ("presence_penalty", body.presence_penalty, lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
        ("seed", body.seed, lambda v: 0 <= v < SEED_LIMIT, "must be in [0, 2**63)"),
        ("top_k", body.top_k, lambda v: v >= 0, "must be >= 0"),
        ("repetition_penalty", body.repetition_penalty, lambda v: v > 0, "must be > 0"),
        ("min_p", body.min_p, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ]
    for name, value, ok, rule in checks:
        if value is not None and not ok(value):
            raise invalid(f"`{name}` {rule}. Given: {value}", name)


def _logit_bias(body: SamplingFields) -> list[tuple[int, float]]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; a bias in [-100, 100]."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        if not key.strip().isdecimal():
            raise invalid(f"`logit_bias` keys must be token ids. Given: {key!r}", "logit_bias")
        if not -MAX_LOGIT_BIAS_VALUE <= bias <= MAX_LOGIT_BIAS_VALUE:
            raise invalid(f"`logit_bias` values must be in [-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]. "
                          f"Given: {bias} for token {key}", "logit_bias")
        pairs.append((int(key), bias))
    return pairs


def _fim(ctx: ApiContext) -> Fim:
    if ctx.fim is None:
        raise invalid("`suffix` (fill-in-the-middle) needs a tokenizer with FIM tokens (StarCoder's <fim_prefix>, "
                      "<fim_suffix>, <fim_middle>, or those of SantaCoder, Qwen2.5-Coder, DeepSeek-Coder, CodeLlama "
                      "or Codestral); this model's has none", "suffix")
    return ctx.fim


def _prompt_ids(ctx: ApiContext, prompt, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """The prompt's token ids as given, its texts encoded with `encode`."""
    if isinstance(prompt, str):
        return [encode(prompt)]
    if not prompt:
        raise invalid("`prompt` is an empty list", "prompt")
    prompts = [list(prompt)] if isinstance(prompt[0], int) else [
        encode(p) if isinstance(p, str) else list(p) for p in prompt]
    try:
        for ids in prompts:  # token ids are echoed and decoded before the core would check them
            check_token_ids("prompt_ids", ids, ctx.tokenizer.vocab_size)
    except ValidationError as e:
        raise invalid(str(e)) from None
    return prompts


def _messages(body: SamplingFields, prompts: list[list[int]], max_tokens: int, *, logprobs: bool = False,
              top_n: int = 0, prompt_logprobs: bool = False, stop_token_ids: tuple[int, ...] = ()) -> list[P.Generate]:
    sampled = body.temperature > 0
    base = body.seed if body.seed is not None or not sampled else random_seed()
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    bias = _logit_bias(body)
    msgs = []
    for ids in prompts:
        for i in range(body.n):
            # one choice keeps the request's seed, so it samples as the same request over TGI or ZMQ
            seed = None if base is None else base if body.n == 1 else derive_seed(base, i)
            params = P.GenerateParams(
                max_new_tokens=max_tokens, do_sample=sampled, temperature=body.temperature if sampled else 1.0,
                top_k=body.top_k, top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty, seed=seed,
                stop=stop, stop_token_ids=list(stop_token_ids), strip_stop=True, logprobs=logprobs,
                top_n_tokens=top_n, prompt_logprobs=prompt_logprobs, logit_bias=bias,
                penalize_prompt=False)
            msgs.append(P.Generate(uuid4().hex, prompt_ids=ids, params=params))
    return msgs


# ---- responses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How one kind of answer is written: whole, or as stream chunks."""

    route: str
    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable  # (ctx, fanout, k, Answer) -> the choice's dict
    delta: Callable  # (ctx, fanout, k, TokenBatch, first, offset) -> the chunk choice's fields


async def _respond(ctx: ApiContext, body: SamplingFields, request: Request, fanout: Fanout, shape: Shape):
    replies = Replies(ctx.door, shape.route, fanout.msgs, fanout.n)  # a refusal is an HTTP error, before any stream starts
    rid, created = f"{shape.id_prefix}-{uuid4().hex}", int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        head = {"id": rid, "object": shape.chunk_object, "created": created, "model": ctx.model_id}
        return EventStream(_chunks(ctx, fanout, replies, head, usage, shape), replies,
                           lambda e: _sse(openai_error(e)[1]) + DONE)
    answers = await gather(replies, len(fanout.msgs), request)
    return {"id": rid, "object": shape.object, "created": created, "model": ctx.model_id,
            "choices": [shape.choice(ctx, fanout, k, a) for k, a in enumerate(answers)], "usage": _usage(fanout, answers)}


async def _chunks(ctx: ApiContext, fanout: Fanout, replies: Replies, head: dict, include_usage: bool,
                  shape: Shape) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}
    answers = [Answer() for _ in fanout.msgs]
    async for k, batch in replies:
        first, offset = not answers[k].tokens, answers[k].chars
        answers[k].add(batch)
        choice = {"index": k, **shape.delta(ctx, fanout, k, batch, first, offset),
                  "finish_reason": FINISH.get(batch.finish_reason)}
        yield _sse({**head, "choices": [choice], **extra})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(fanout, answers)})
    yield DONE


DONE = b"data: [DONE]\n\n"  # the last event of every stream, an error's too


def _sse(data: dict) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


def _usage(fanout: Fanout, answers: list[Answer]) -> dict:
    prompt = sum(len(ids) for ids in fanout.prompts)
    completion = sum(len(a.tokens) for a in answers)
    cached = sum(a.cached_tokens for a in answers[:: fanout.n])  # a prompt's choices share its prefill
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _completion_choice(ctx: ApiContext, fanout: Fanout, k: int, answer: Answer) -> dict:
    echo = fanout.echo_text(k)
    logprobs = None
    if fanout.logprobs is not None:
        logprobs = _logprobs(ctx, answer.tokens, len(echo), fanout.echo_ids(k), answer.prompt_logprobs)
    return {"index": k, "text": echo + answer.text, "logprobs": logprobs,
            "finish_reason": FINISH.get(answer.finish_reason)}


def _completion_delta(ctx: ApiContext, fanout: Fanout, k: int, batch: P.TokenBatch, first: bool, offset: int) -> dict:
    """`offset`: how much of the choice's generated text came before this batch."""
    echo = fanout.echo_text(k)
    logprobs = None
    if fanout.logprobs is not None:
        logprobs = _logprobs(ctx, batch.tokens, len(echo) + offset, fanout.echo_ids(k) if first else None,
                             batch.prompt_logprobs)
    return {"text": (echo if first else "") + "".join(t.text for t in batch.tokens), "logprobs": logprobs}


def _logprobs(ctx: ApiContext, tokens: list[P.Token], start: int, echo_ids: list[int] | None,
              prompt_logprobs: list[float | None] | None) -> dict:
    """OpenAI's completion logprobs: the echoed prompt's tokens (from offset 0), then the generated
    ones (from `start`)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(token_id: int, logprob: float | None, top: dict | None, at: int) -> None:
        out["tokens"].append(ctx.piece(token_id))
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(at)

    at = 0
    for token_id, lp in zip(echo_ids or (), prompt_logprobs or [None] * len(echo_ids or ())):
        add(token_id, lp, None, at)
        at += len(ctx.piece(token_id))
    at = start
    for t in tokens:
        add(t.token_id, t.logprob, {ctx.piece(i): lp for i, lp in t.top_tokens} if t.top_tokens else None, at)
        at += len(t.text)
    return out


def _chat_choice(ctx: ApiContext, fanout: Fanout, k: int, answer: Answer) -> dict:
    return {"index": k, "message": {"role": "assistant", "content": answer.text},
            "logprobs": _chat_logprobs(ctx, fanout, answer.tokens), "finish_reason": FINISH.get(answer.finish_reason)}


def _chat_delta(ctx: ApiContext, fanout: Fanout, k: int, batch: P.TokenBatch, first: bool, offset: int) -> dict:
    text = "".join(t.text for t in batch.tokens)
    return {"delta": {"role": "assistant", "content": text} if first else {"content": text},
            "logprobs": _chat_logprobs(ctx, fanout, batch.tokens)}


def _chat_logprobs(ctx: ApiContext, fanout: Fanout, tokens: list[P.Token]) -> dict | None:
    """OpenAI's chat logprobs: each token with its logprob, bytes and top alternatives."""
    if fanout.logprobs is None:
        return None

    def entry(token_id: int, logprob: float | None) -> dict:
        piece = ctx.piece(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_tokens or ()]}
                        for t in tokens]}


COMPLETION = Shape("/v1/completions", "cmpl", "text_completion", "text_completion", _completion_choice,
                   _completion_delta)
CHAT = Shape("/v1/chat/completions", "chatcmpl", "chat.completion", "chat.completion.chunk", _chat_choice, _chat_delta)
