"""Text Generation Inference's request and response shapes (its OpenAPI schema, TGI 2.x/3.x).

Every parameter TGI accepts is accepted here, unknown fields are ignored as TGI ignores them,
and features splitserve does not have are refused only when set to something other than their
default (see tgi.py). The documented ranges (`schema`) are what tgi.py checks, with TGI's own
messages; they are in the OpenAPI schema for clients and for the fuzz tests that draw from it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from splitserve.common.params import MAX_STOP_SEQUENCES, MAX_TOP_K, MAX_TOP_N, SEED_LIMIT

from .validation import NullIsUnset, UnicodeOnly, schema


class TgiParameters(NullIsUnset):  # TGI takes null for any option (`stop` included) as unset
    adapter_id: str | None = Field(None, description="LoRA adapter; not supported (422 when set)")
    best_of: int | None = Field(None, description="only 1 is supported", **schema(minimum=1, maximum=1))
    decoder_input_details: bool = Field(False, description="return the prompt tokens with their logprobs in "
                                        "`details.prefill` (not with streaming)")
    details: bool = Field(True, description="return `details`: finish reason, tokens with logprobs, seed")
    do_sample: bool = Field(False, description="sample; also implied by temperature, top_k, top_p or typical_p")
    frequency_penalty: float | None = Field(None, description="in [-2, 2]: subtracted per earlier occurrence",
                                            **schema(minimum=-2, maximum=2))
    grammar: Any = Field(None, description="constrained decoding; not supported (422 when set)")
    max_new_tokens: int | None = Field(None, description="default: 100, or what fits in max_total_tokens",
                                       **schema(minimum=1))
    repetition_penalty: float | None = Field(None, description="> 0; 1 is off", **schema(exclusiveMinimum=0))
    return_full_text: bool | None = Field(False, description="prepend the inputs to `generated_text`")
    seed: int | None = Field(None, description="sampling seed; one is chosen and returned when not given",
                             **schema(minimum=0, maximum=SEED_LIMIT - 1))
    stop: list[str] = Field([], description="stop sequences (at most 4); they stay in the output",
                            **schema(maxItems=MAX_STOP_SEQUENCES))
    temperature: float | None = Field(None, description="> 0", **schema(exclusiveMinimum=0))
    top_k: int | None = Field(None, description="> 0", **schema(minimum=1, maximum=MAX_TOP_K))
    top_n_tokens: int | None = Field(None, description="alternatives per token in `top_tokens`, at most 5",
                                     **schema(minimum=0, maximum=MAX_TOP_N))
    top_p: float | None = Field(None, description="in (0, 1]", **schema(exclusiveMinimum=0, maximum=1))
    truncate: int | None = Field(None, description="keep only the last `truncate` prompt tokens", **schema(minimum=1))
    typical_p: float | None = Field(None, description="in (0, 1]", **schema(exclusiveMinimum=0, maximum=1))
    watermark: bool = Field(False, description="not supported (422 when true)")


class TgiRequest(UnicodeOnly):
    inputs: str = Field(**schema(minLength=1))
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
    # splitserve's own: every frontend's ZeroMQ client port, for Client / AsyncClient to spread over
    zmq_endpoints: list[str] = []
    docker_label: str | None = None
