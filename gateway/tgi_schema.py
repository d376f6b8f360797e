"""Text Generation Inference's request and response shapes (its OpenAPI schema, TGI 2.x/3.x).

Every parameter TGI accepts is accepted here, unknown fields are ignored as TGI ignores them,
and features splitserve does not have are refused only when set to something other than their
default (see tgi.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator


class TgiParameters(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        # TGI takes null for any option (`stop` included) as unset
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    adapter_id: str | None = Field(None, description="LoRA adapter; not supported (422 when set)")
    best_of: int | None = Field(None, description="only 1 is supported")
    decoder_input_details: bool = Field(False, description="return the prompt tokens with their logprobs in "
                                        "`details.prefill` (not with streaming)")
    details: bool = Field(True, description="return `details`: finish reason, tokens with logprobs, seed")
    do_sample: bool = Field(False, description="sample; also implied by temperature, top_k, top_p or typical_p")
    frequency_penalty: float | None = Field(None, description="in [-2, 2]: subtracted per earlier occurrence")
    grammar: Any = Field(None, description="constrained decoding; not supported (422 when set)")
    max_new_tokens: int | None = Field(None, description="default: 100, or what fits in max_total_tokens")
    repetition_penalty: float | None = Field(None, description="> 0; 1 is off")
    return_full_text: bool | None = Field(False, description="prepend the inputs to `generated_text`")
    seed: int | None = Field(None, description="sampling seed; one is chosen and returned when not given")
    stop: list[str] = Field([], description="stop sequences (at most 4); they stay in the output")
    temperature: float | None = Field(None, description="> 0")
    top_k: int | None = Field(None, description="> 0")
    top_n_tokens: int | None = Field(None, description="alternatives per token in `top_tokens`, at most 5")
    top_p: float | None = Field(None, description="in (0, 1]")
    truncate: int | None = Field(None, description="keep only the last `truncate` prompt tokens")
    typical_p: float | None = Field(None, description="in (0, 1]")
    watermark: bool = Field(False, description="not supported (422 when true)")


class TgiRequest(BaseModel):
    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)


class TgiCompatRequest(TgiRequest):
    stream: bool = False


class TgiToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class TgiDetails(BaseModel):
    finish_reason: str = Field(description="length | eos_token | stop_sequence")
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[TgiToken]
    top_tokens: list[list[TgiToken]] | None = None


class TgiResponse(BaseModel):
    generated_text: str
    details: TgiDetails | None = None


class TgiStreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    input_length: int


class TgiStreamEvent(BaseModel):
    """One `data:` event of /generate_stream; the last has `generated_text` and `details`."""

    index: int
    token: TgiToken
    top_tokens: list[TgiToken] | None = None
    generated_text: str | None = None
    details: TgiStreamDetails | None = None


class TgiError(BaseModel):
    error: str
    error_type: str


class TgiInfo(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str | None = None
    model_device_type: str | None = None
    model_pipeline_tag: str = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_top_n_tokens: int
    validation_workers: int = 1
    max_client_batch_size: int = 1
    router: str = "splitserve"
    version: str
    sha: str | None = None
    docker_label: str | None = None
