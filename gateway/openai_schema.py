"""OpenAI's completions and chat completions request shapes (the fields splitserve reads;
others are ignored, as OpenAI-compatible servers do). The documented ranges (`schema`) are what
openai_api.py checks, with its own messages; they are in the OpenAPI schema for clients and for the
fuzz tests that draw from it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, WithJsonSchema

from splitserve.common.params import MAX_LOGIT_BIAS, MAX_STOP_SEQUENCES, MAX_TOP_K, MAX_TOP_N, SEED_LIMIT

from .validation import ClientBody, schema

MAX_N = 128


# A prompt: text, texts, token ids, or lists of token ids; never empty.
Text = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})]
TokenIds = Annotated[list[int], WithJsonSchema({"type": "array", "minItems": 1,
                                                "items": {"type": "integer", "minimum": 0}})]
Prompt = Annotated[Text | list[Text] | TokenIds | list[TokenIds], Field(json_schema_extra={"minItems": 1})]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(ClientBody):  # ClientBody: many OpenAI clients send null for an option they leave unset
    """What completions and chat completions share."""

    model: str | None = Field(None, description="accepted whatever it names: the server has one model")
    max_tokens: int | None = Field(None, description="default 16 (completions) or what fits (chat)",
                                   **schema(minimum=1))
    temperature: float = Field(1.0, description="in [0, 2]; 0 is greedy", **schema(minimum=0, maximum=2))
    top_p: float = Field(1.0, description="in (0, 1]", **schema(exclusiveMinimum=0, maximum=1))
    n: int = Field(1, description="choices per prompt, each sampled with a seed derived from `seed`",
                   **schema(minimum=1, maximum=MAX_N))
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="at most 4; a matched stop is cut from the text",
                                         **schema(maxItems=MAX_STOP_SEQUENCES))
    seed: int | None = Field(None, **schema(minimum=0, maximum=SEED_LIMIT - 1))
    frequency_penalty: float = Field(0.0, description="in [-2, 2]: minus this times each token's count in the text "
                                     "so far", **schema(minimum=-2, maximum=2))
    presence_penalty: float = Field(0.0, description="in [-2, 2]: minus this for each token in the text so far",
                                    **schema(minimum=-2, maximum=2))
    logit_bias: dict[str, float] | None = Field(None, description="token id -> added to its logit, in [-100, 100]; "
                                                f"at most {MAX_LOGIT_BIAS} tokens",
                                                **schema(maxProperties=MAX_LOGIT_BIAS))
    user: str | None = None
    # Extensions most OpenAI-compatible servers take.
    top_k: int = Field(0, description="extension: top-k sampling (0 is off)", **schema(minimum=0, maximum=MAX_TOP_K))
    repetition_penalty: float = Field(1.0, description="extension: > 0, 1 is off; over the prompt's tokens and the "
                                      "text so far", **schema(exclusiveMinimum=0))
    min_p: float = Field(0.0, description="extension: keep the tokens at least this share of the likeliest one's "
                         "probability, in [0, 1] (0 is off)", **schema(minimum=0, maximum=1))


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="text, texts, token ids, or lists of token ids")
    suffix: str | None = Field(None, description="fill-in-the-middle: the text after the cursor; the prompt is "
                               "the text before it")
    logprobs: int | None = Field(None, description="logprobs of each token and of its `logprobs` most likely "
                                 "alternatives (at most 5)", **schema(minimum=0, maximum=MAX_TOP_N))
    echo: bool = Field(False, description="prepend the prompt to the text (with logprobs: its tokens too)")
    best_of: int | None = Field(None, description="not supported beyond `n`", **schema(minimum=1))


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = Field(False, description="logprob of each generated token, in `choices[].logprobs.content`")
    top_logprobs: int | None = Field(None, description="with `logprobs`: this many most likely alternatives per "
                                     "token (at most 5)", **schema(minimum=0, maximum=MAX_TOP_N))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: ErrorDetail
