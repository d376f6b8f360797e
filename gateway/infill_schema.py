"""llama.cpp's /infill request, as its server reads it and the llama.vim and llama.vscode plug-ins
send it. Defaults are llama.cpp's; null means unset and unknown fields are ignored, as there. Fields
llama.cpp takes that change nothing here are accepted and ignored: `t_max_prompt_ms` (a TODO in
llama.cpp too), `id_slot` (splitserve has no slots), `n_cmpl` (one completion is answered),
`model`, `lora`, `dry_*`, `xtc_*` and the rest."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .validation import ClientBody, schema


class ExtraChunk(BaseModel):
    """A piece of repository context: another file's text (llama.vim adds `time`, ignored)."""

    text: str
    filename: str = "tmp"


class InfillRequest(ClientBody):
    input_prefix: str = Field(description="the code before the cursor's line")
    input_suffix: str = Field(description="the code after the cursor")
    input_extra: list[ExtraChunk] = Field([], description="repository context: other files' text, farthest first")
    prompt: str = Field("", description="the cursor's line up to the cursor (it follows input_prefix)")
    n_predict: int = Field(-1, description="tokens to generate: -1 as many as fit, 0 none (the prompt only fills "
                           "the prefix cache)", **schema(minimum=-1))
    temperature: float = Field(0.8, description="<= 0 is greedy")
    top_k: int = Field(40, description="<= 0 is off")
    top_p: float = Field(0.95, description=">= 1 is off", **schema(exclusiveMinimum=0))
    typical_p: float = Field(1.0, description=">= 1 is off", **schema(exclusiveMinimum=0))
    min_p: float = Field(0.05, description="keep the tokens at least this share of the likeliest one's "
                         "probability; <= 0 is off")
    logit_bias: list[tuple[int | str, float | Literal[False]]] | dict[str, float | Literal[False]] | None = Field(
        None, description="[[token, bias], ...] or {token: bias}: a token id, or a text whose tokens all get the "
        "bias; added to the logit, clamped to [-100, 100]; false: never the token")
    repeat_penalty: float = Field(1.0, description="1 is off", **schema(exclusiveMinimum=0))
    repeat_last_n: int = Field(64, description="the penalties count the last this many tokens of the prompt and the "
                               "answer; -1: all of them; 0: the penalties are off", **schema(minimum=-1))
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    samplers: list[str] | str | None = Field(None, description="which of the sampling settings apply: names "
                                             "(top_k, typ_p, top_p, min_p, temperature, penalties) or their "
                                             "letters (kypmte); others are ignored; default: all")
    seed: int = Field(-1, description="-1: random")
    stop: list[str] = Field([], description="stop strings, at most 4; a matched one is cut from the content")
    n_indent: int = Field(0, description="stop at a line indented less than this (the line's start is kept)",
                          **schema(minimum=0))
    t_max_predict_ms: int = Field(-1, description="once this long after the first token, stop at the next new line")
    t_max_prompt_ms: int = Field(-1, description="accepted and ignored, as llama.cpp does")
    cache_prompt: bool = Field(True, description="false: compute every prompt token, none from the prefix cache")
    stream: bool = Field(False, description="server-sent events, one per decode step, then the final answer")
    response_fields: list[str] = Field([], description="answer only these fields of the final answer, `a/b` for "
                                       "a nested one, each under its path")
    return_tokens: bool = Field(False, description="the generated token ids in `tokens`")


class ErrorDetail(BaseModel):
    code: int
    message: str
    type: str


class InfillError(BaseModel):
    error: ErrorDetail
