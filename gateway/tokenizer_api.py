"""/tokenize and /detokenize, as the servers whose clients call them answer: the model's own
tokenizer, no worker involved.

/tokenize answers in the dialect of the field that holds the text:
- `inputs` (TGI): `[{"id", "text", "start", "stop"}]`, the text's special tokens added, each token
  with its characters' span in `inputs` (an added BOS spans none);
- `content` (llama.cpp's server): `{"tokens": [id, ...]}`, no BOS unless `add_special`; with
  `with_pieces` each token as `{"id", "piece"}`;
- `prompt` (vLLM): `{"count", "max_model_len", "tokens"}`, the BOS added unless `add_special_tokens`
  is false.
/detokenize takes `{"tokens": [id, ...]}` and answers the text as llama.cpp's `content` and vLLM's
`prompt` both. Errors are TGI's (the root routes' shape).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .api_context import ApiContext
from .api_errors import invalid
from .replies import Json
from .validation import UnicodeOnly, schema


class TokenizeRequest(UnicodeOnly):
    inputs: str | None = Field(None, description="TGI: the text; answered as TGI's list of tokens with spans")
    content: str | None = Field(None, description="llama.cpp: the text; answered as `{tokens}`")
    add_special: bool = Field(False, description="llama.cpp: add the BOS where the tokenizer has one")
    with_pieces: bool = Field(False, description="llama.cpp: each token as `{id, piece}`")
    prompt: str | None = Field(None, description="vLLM: the text; answered as `{count, max_model_len, tokens}`")
    add_special_tokens: bool = Field(True, description="vLLM: add the BOS where the tokenizer has one")


class DetokenizeRequest(BaseModel):
    tokens: list[int] = Field(description="token ids", **schema(items={"minimum": 0}))


class DetokenizeResponse(BaseModel):
    content: str  # llama.cpp's name
    prompt: str  # vLLM's


def tokenize_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(tags=["tokenizer"])

    @router.post("/tokenize", summary="Text to token ids, in TGI's, llama.cpp's or vLLM's shape (by the text's "
                 "field: `inputs`, `content` or `prompt`)")
    async def tokenize(body: TokenizeRequest, request: Request) -> Json:
        given = [name for name in ("inputs", "content", "prompt") if getattr(body, name) is not None]
        if len(given) != 1:
            raise invalid("give the text as one of `inputs` (TGI), `content` (llama.cpp) or `prompt` (vLLM)"
                          + (f", not {' and '.join(given)}" if given else ""))
        return Json(await ctx.prepare(request, _answer, ctx, body, given[0]))

    @router.post("/detokenize", summary="Token ids to text (llama.cpp's `content`, vLLM's `prompt`)",
                 response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        text = await ctx.prepare(request, _text, ctx, body.tokens)  # a long list off the event loop too
        return DetokenizeResponse(content=text, prompt=text)

    return router


def _text(ctx: ApiContext, tokens: list[int]) -> str:
    vocab = ctx.tokenizer.vocab_size
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"token id {bad} is not in the vocabulary of {vocab}", "tokens")
    return ctx.tokenizer.decode(tokens)


def _answer(ctx: ApiContext, body: TokenizeRequest, field: str) -> list | dict:
    tok = ctx.tokenizer
    if field == "inputs":
        return [{"id": i, "text": body.inputs[start:stop], "start": start, "stop": stop}
                for i, (start, stop) in tok.encode_with_spans(body.inputs)]
    if field == "content":
        ids = tok.encode(body.content, add_special_tokens=body.add_special)
        return {"tokens": [{"id": i, "piece": ctx.piece(i)} for i in ids] if body.with_pieces else ids}
    ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"count": len(ids), "max_model_len": ctx.limits.max_total_tokens, "tokens": ids}
