"""The HTTP APIs on a live gateway with one prefill and one decode worker: TGI's and OpenAI's own
clients get what the ZMQ client gets, the response shapes, fill-in-the-middle, validation, metrics."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster, wait_for
from splitserve.client import Client
from splitserve.common.fim import find_fim
from splitserve.common.params import derive_seed
from splitserve.common.tokenizer import Tokenizer
from tgi_client import run_in_tgi_env, tgi_python

PROMPT = "def fibonacci(n):\n    "
MAX_TOTAL, MAX_INPUT = 2048, 2047  # tiny-random's defaults


@pytest.fixture(scope="module")
def zmq(pipeline):
    with Client(pipeline.endpoint) as client:
        yield client


@pytest.fixture(scope="module")
def http(pipeline):
    with httpx.Client(base_url=pipeline.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


def sse(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded ([DONE] kept as is)."""
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- existing clients -------------------------------------------------------------------------

TGI_SCRIPT = r"""
import json, sys
from text_generation import Client
from text_generation.errors import ValidationError

url, prompt = sys.argv[1:3]
client = Client(url, timeout=60)
r = client.generate(prompt, max_new_tokens=12, decoder_input_details=True, top_n_tokens=2)
events = list(client.generate_stream(prompt, max_new_tokens=12))
sampled = client.generate(prompt, max_new_tokens=8, do_sample=True, seed=5)
try:
    client.generate(prompt, max_new_tokens=10**6)
    refused = None
except ValidationError as e:
    refused = str(e)
print(json.dumps({
    "text": r.generated_text, "ids": [t.id for t in r.details.tokens], "finish": r.details.finish_reason.value,
    "prefill": [t.id for t in r.details.prefill], "top_tokens": [len(t) for t in r.details.top_tokens],
    "stream_text": "".join(e.token.text for e in events if not e.token.special),
    "stream_ids": [e.token.id for e in events], "stream_final": events[-1].generated_text,
    "stream_finish": events[-1].details.finish_reason.value,
    "sampled": sampled.generated_text, "seed": sampled.details.seed, "refused": refused}))
"""


def test_text_generation_client_gets_what_the_zmq_client_gets(pipeline, zmq, tokenizer):
    python, why = tgi_python()
    if python is None:
        pytest.skip(f"cannot make the text-generation client's environment (.venv-tgi-client): {why}")
    out = run_in_tgi_env(python, TGI_SCRIPT, pipeline.url, PROMPT)
    ref = zmq.generate(PROMPT, max_new_tokens=12)
    assert out["text"] == out["stream_text"] == out["stream_final"] == ref.text
    assert out["ids"] == out["stream_ids"] == ref.token_ids
    assert out["finish"] == out["stream_finish"] == "length"
    assert out["prefill"] == tokenizer.encode(PROMPT)
    assert out["top_tokens"] == [2] * 12
    assert out["sampled"] == zmq.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=5).text and out["seed"] == 5
    assert "max_total_tokens" in out["refused"]


def test_openai_client_gets_what_the_zmq_client_gets(pipeline, zmq, tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=f"{pipeline.url}/v1", api_key="unused", max_retries=0)
    ref = zmq.generate(PROMPT, max_new_tokens=12)
    done = client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text == ref.text and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(tokenizer.encode(PROMPT)), 12)
    chunks = list(client.completions.create(model="tiny-random", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    # a seeded sampled request samples as the same request does over ZMQ (and TGI)
    sampled = client.completions.create(model="x", prompt=PROMPT, max_tokens=10, temperature=0.9, seed=7)
    assert sampled.choices[0].text == zmq.generate(PROMPT, max_new_tokens=10, temperature=0.9, seed=7).text
    # presence_penalty reaches the sampler as over ZMQ, counting the answer's tokens only, as OpenAI's
    apart = client.completions.create(model="x", prompt=PROMPT, max_tokens=10, temperature=0, presence_penalty=2)
    want = zmq.generate(PROMPT, max_new_tokens=10, presence_penalty=2.0, penalize_prompt=False)
    with_prompt = zmq.generate(PROMPT, max_new_tokens=10, presence_penalty=2.0)  # TGI's: no prompt token again
    assert apart.choices[0].text == want.text
    assert len({tuple(want.token_ids), tuple(with_prompt.token_ids), tuple(ref.token_ids[:10])}) == 3
    # logit_bias: +100 makes a token every greedy choice, -100 keeps greedy's first choice out
    token = ref.token_ids[3]
    forced = client.completions.create(model="x", prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={str(token): 100})
    assert forced.choices[0].text == zmq.generate(PROMPT, max_new_tokens=6, logit_bias={token: 100.0}).text
    assert zmq.generate(PROMPT, max_new_tokens=6, logit_bias={token: 100.0}).token_ids == [token] * 6
    avoided = zmq.generate(PROMPT, max_new_tokens=6, logit_bias={ref.token_ids[0]: -100.0})
    assert ref.token_ids[0] not in avoided.token_ids
    # min_p 1 (OpenAI: an extension) leaves only the likeliest token: a sampled answer is greedy's
    best = client.completions.create(model="x", prompt=PROMPT, max_tokens=10, temperature=0.9, seed=7,
                                     extra_body={"min_p": 1.0})
    assert best.choices[0].text == zmq.generate(PROMPT, max_new_tokens=10).text
    assert zmq.generate(PROMPT, max_new_tokens=10, temperature=1.5, seed=7, min_p=1.0).token_ids == ref.token_ids[:10]
    assert [m.id for m in client.models.list().data] == ["tiny-random"]


# ---- TGI shapes -------------------------------------------------------------------------------


def test_tgi_generate_details_prefill_and_full_text(http, zmq, tokenizer):
    ids = tokenizer.encode(PROMPT)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "do_sample": True, "seed": 9, "top_n_tokens": 3,
                                             "decoder_input_details": True, "return_full_text": True}}
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = zmq.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=9)
    assert out["generated_text"] == PROMPT + ref.text
    d = out["details"]
    assert (d["finish_reason"], d["generated_tokens"], d["seed"]) == ("length", 6, 9)
    assert [t["id"] for t in d["prefill"]] == ids and d["prefill"][0]["logprob"] is None
    assert all(t["logprob"] < 0 for t in d["prefill"][1:])
    assert [t["id"] for t in d["tokens"]] == ref.token_ids and "".join(t["text"] for t in d["tokens"]) == ref.text
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in d["tokens"])
    assert [len(top) for top in d["top_tokens"]] == [3] * 6
    # details off: just the text; the compatibility route answers with a list
    lean = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": False}})
    assert lean.json() == {"generated_text": zmq.generate(PROMPT, max_new_tokens=6).text}
    compat = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": False}})
    assert compat.json() == [lean.json()]


def test_tgi_generate_stream_events(http, zmq, tokenizer):
    ref = zmq.generate(PROMPT, max_new_tokens=5)
    for path, extra in (("/generate_stream", {}), ("/", {"stream": True})):
        r = http.post(path, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}, **extra})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
        assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
        assert [e["token"]["id"] for e in events] == ref.token_ids
        assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
        assert events[-1]["generated_text"] == ref.text
        assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 5, "seed": None,
                                         "input_length": len(tokenizer.encode(PROMPT))}


def test_tgi_truncate_keeps_the_last_prompt_tokens(http, zmq, tokenizer):
    ids = tokenizer.encode(PROMPT * 3)
    body = {"inputs": PROMPT * 3, "parameters": {"max_new_tokens": 4, "truncate": 5, "decoder_input_details": True}}
    d = http.post("/generate", json=body).json()["details"]
    assert [t["id"] for t in d["prefill"]] == ids[-5:]
    assert [t["id"] for t in d["tokens"]] == zmq.generate(prompt_ids=ids[-5:], max_new_tokens=4).token_ids


def test_stop_strings_stay_in_tgi_text_and_are_cut_from_openai_text(http, zmq):
    ref = zmq.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=3, ignore_eos=True).text
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    cut = ref.find(stop)
    tgi = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "do_sample": True,
                                                                         "seed": 3, "stop": [stop]}}).json()
    assert tgi["generated_text"] == ref[: cut + len(stop)] and tgi["details"]["finish_reason"] == "stop_sequence"
    oai = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 3,
                                             "stop": stop}).json()
    assert oai["choices"][0]["text"] == ref[:cut] and oai["choices"][0]["finish_reason"] == "stop"


def test_info_health_models_and_openapi(http):
    info = http.get("/info").json()
    assert (info["model_id"], info["max_input_tokens"], info["max_total_tokens"]) == \
        ("tiny-random", MAX_INPUT, MAX_TOTAL)
    assert info["max_best_of"] == 1 and info["max_stop_sequences"] == 4 and info["model_device_type"] == "cpu"
    assert http.get("/health").json() == {"status": "ok", "prefill_workers": 1, "decode_workers": 1}
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_TOTAL
    schema = http.get("/openapi.json").json()
    assert {"/generate", "/generate_stream", "/", "/info", "/health", "/metrics", "/v1/completions",
            "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    assert "/ws" in schema["info"]["description"]
    assert "TgiParameters" in schema["components"]["schemas"]


# ---- OpenAI -----------------------------------------------------------------------------------


def test_fim_request_builds_prefix_suffix_middle_exactly(http, zmq, tokenizer):
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    fim = find_fim(tokenizer)
    expected = [fim.prefix_id, *tokenizer.encode(prefix), fim.suffix_id, *tokenizer.encode(suffix), fim.middle_id]
    r = http.post("/v1/completions", json={"prompt": prefix, "suffix": suffix, "max_tokens": 6, "temperature": 0,
                                           "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    assert choice["logprobs"]["tokens"][: len(expected)] == [tokenizer.decode([i]) for i in expected]
    assert choice["text"] == tokenizer.decode(expected) + zmq.generate(prompt_ids=expected, max_new_tokens=6).text
    assert choice["text"].startswith("<fim_prefix>def add")


def test_fim_too_long_is_cut_at_the_far_ends(http, tokenizer):
    prefix, suffix = "alpha = 1\n" * 700, "omega = 2\n" * 700
    r = http.post("/v1/completions", json={"prompt": prefix, "suffix": suffix, "max_tokens": 16, "temperature": 0,
                                           "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    fim = find_fim(tokenizer)
    room = MAX_TOTAL - 16 - 3  # prompt + max_tokens fit max_total_tokens; 3 markers
    p, s = tokenizer.encode(prefix), tokenizer.encode(suffix)
    expected = [fim.prefix_id, *p[len(p) - (room - room // 2):], fim.suffix_id, *s[: room // 2], fim.middle_id]
    assert r.json()["usage"]["prompt_tokens"] == MAX_TOTAL - 16
    assert r.json()["choices"][0]["logprobs"]["tokens"][: len(expected)] == [tokenizer.decode([i]) for i in expected]


def worker_metric(pipeline, role: str, name: str) -> float:
    (worker_id,) = [w for w, info in pipeline.workers.items() if info["role"] == role]
    return pipeline.metric(name, worker_id)


def test_n_choices_share_one_prefill(pipeline, http, tokenizer):
    before = worker_metric(pipeline, "prefill", "splitserve_prefill_tokens_total")
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0.8, "seed": 5, "n": 4, "echo": True, "logprobs": 1}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert worker_metric(pipeline, "prefill", "splitserve_prefill_tokens_total") - before == len(tokenizer.encode(PROMPT))
    choices = r.json()["choices"]
    assert len({c["text"] for c in choices}) > 1  # own seeds: the choices differ
    prompt_lps = [c["logprobs"]["token_logprobs"][: len(tokenizer.encode(PROMPT))] for c in choices]
    assert all(lp == prompt_lps[0] for lp in prompt_lps)  # every choice echoes the one prefill's prompt logprobs
    pipeline.wait_idle()


def test_workers_meter_batches_and_handoffs(pipeline, zmq, tokenizer):
    names = {("decode", "splitserve_decode_batch_size_count"), ("decode", "splitserve_decode_handoff_bytes_total"),
             ("decode", "splitserve_decode_handoff_seconds_count"), ("prefill", "splitserve_prefill_batch_size_count"),
             ("prefill", "splitserve_prefill_handoff_bytes_total"), ("prefill", "splitserve_prefill_handoff_seconds_count")}
    before = {n: worker_metric(pipeline, *n) for n in names}
    zmq.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
    # the prefill side counts a handoff when the decode side's release arrives, after the tokens
    wait_for(lambda: all(worker_metric(pipeline, *n) > before[n] for n in names), 30, "every worker metric to move")
    kv_bytes = worker_metric(pipeline, "decode", "splitserve_decode_handoff_bytes_total") - \
        before[("decode", "splitserve_decode_handoff_bytes_total")]
    assert kv_bytes > 0 and kv_bytes % len(tokenizer.encode(PROMPT)) == 0  # whole tokens of KV


def test_n_choices_and_prompt_lists_sample_with_derived_seeds(http, zmq):
    prompts = [PROMPT, "import os\n"]
    r = http.post("/v1/completions", json={"prompt": prompts, "max_tokens": 6, "temperature": 0.8, "seed": 11, "n": 3})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    refs = [zmq.generate(prompts[k // 3], max_new_tokens=6, temperature=0.8, seed=derive_seed(11, k % 3))
            for k in range(6)]
    assert [c["text"] for c in choices] == [ref.text for ref in refs]
    assert r.json()["usage"]["completion_tokens"] == sum(len(ref.token_ids) for ref in refs)
    # streamed: the same choices, interleaved
    r = http.post("/v1/completions", json={"prompt": prompts, "max_tokens": 6, "temperature": 0.8, "seed": 11, "n": 3,
                                           "stream": True})
    events = sse(r)
    assert events[-1] == "[DONE]"
    texts = [""] * 6
    for e in events[:-1]:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts == [ref.text for ref in refs]


def test_completion_logprobs_and_echo(http, zmq, tokenizer):
    ids = tokenizer.encode(PROMPT)
    ref = zmq.generate(PROMPT, max_new_tokens=4, details=True, top_n_tokens=2)
    out = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 2,
                                             "echo": True}).json()["choices"][0]
    assert out["text"] == tokenizer.decode(ids) + ref.text
    lp = out["logprobs"]
    n = len(ids)
    assert lp["tokens"] == [tokenizer.decode([i]) for i in ids + ref.token_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][:n] == [None] * n
    assert lp["token_logprobs"][n:] == pytest.approx([e.logprob for e in ref.details.tokens], abs=1e-4)
    assert all(len(top) <= 2 for top in lp["top_logprobs"][n:])
    assert lp["text_offset"][n] == len(tokenizer.decode(ids))


# ---- validation -------------------------------------------------------------------------------

LONG = "x = 1\n" * 1200  # more than max_input_tokens


@pytest.mark.parametrize("parameters, says", [
    ({"temperature": 0}, "`temperature` must be strictly positive. Given: 0"),
    ({"top_p": 1.5}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"typical_p": 0}, "`typical_p`"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": 5000}, "exceeds max_total_tokens 2048"),
    ({"truncate": 5000}, "`truncate` must be strictly positive and at most 2047 (max_input_tokens)"),
    ({"seed": -1}, "`seed` must be >= 0"),
    ({"watermark": True}, "`watermark` is not supported"),
    ({"best_of": 2}, "`best_of` must be 1"),
    ({"grammar": {"type": "regex", "value": "a+"}}, "`grammar`"),
    ({"adapter_id": "lora-1"}, "LoRA adapters are not supported"),
    ({"temperature": "hot"}, "`parameters.temperature`: Input should be a valid number"),
])
def test_tgi_rejects_each_bad_parameter_with_422(http, parameters, says):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    assert says in r.json()["error"]


@pytest.mark.parametrize("path, body, says", [
    ("/generate", {"inputs": LONG}, "at most 2047 are allowed (max_input_tokens)"),
    ("/generate", {"inputs": ""}, "the prompt is empty"),
    ("/generate", {"parameters": {}}, "`inputs`: Field required"),
    ("/generate", "not json", "the request body is not valid JSON (Expecting value at character 0)"),
    ("/generate", '{"inputs": "x",}', "the request body is not valid JSON (Expecting property name enclosed in double "
                                      "quotes at character 15)"),
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"decoder_input_details": True}},
     "not supported when streaming"),
    ("/", {"inputs": PROMPT, "stream": True, "parameters": {"top_k": -1}}, "`top_k` must be strictly positive"),
])
def test_tgi_rejects_bad_requests_with_422(http, path, body, says):
    r = http.post(path, **({"json": body} if isinstance(body, dict)
                           else {"content": body, "headers": {"content-type": "application/json"}}))
    assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
    assert says in r.json()["error"]


def test_unknown_fields_are_ignored_and_null_is_unset(http):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "new_feature": 1,
                                                                       "stop": None, "best_of": None},
                                     "add_special_tokens": False, "something": "else"})
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 2
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "top_p": None,
                                           "n": None, "stop": None, "suffix": None, "logprobs": None, "user": "u"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body, param, says", [
    ({"temperature": 2.5}, "temperature", "`temperature` must be in [0, 2]"),
    ({"top_p": 0}, "top_p", "`top_p` must be in (0, 1]"),
    ({"n": 0}, "n", "`n` must be in [1, 128]"),
    ({"max_tokens": 0}, "max_tokens", "`max_tokens` must be at least 1"),
    ({"max_tokens": 5000}, None, "exceeds max_total_tokens 2048"),
    ({"presence_penalty": 2.5}, "presence_penalty", "`presence_penalty` must be in [-2, 2]"),
    ({"min_p": 1.5}, "min_p", "`min_p` must be in [0, 1]"),
    ({"logit_bias": {"x": 3}}, "logit_bias", "`logit_bias` keys must be token ids"),
    ({"logit_bias": {"12": 101}}, "logit_bias", "`logit_bias` values must be in [-100, 100]"),
    ({"logit_bias": {"99999": 1}}, None, "logit_bias token ids must be in [0, 8192)"),
    ({"logit_bias": {"1": 1, "01": 2}}, None, "logit_bias names a token twice"),
    ({"logprobs": 6}, "logprobs", "`logprobs` must be in [0, 5]"),
    ({"best_of": 3}, "best_of", "is not supported"),
    ({"seed": -5}, "seed", "`seed` must be in [0, 2**63)"),
    ({"frequency_penalty": -3}, "frequency_penalty", "`frequency_penalty` must be in [-2, 2]"),
    ({"stop": ["a", "b", "c", "d", "e"]}, None, "at most 4 stop sequences"),
    ({"prompt": []}, "prompt", "`prompt` is an empty list"),
    ({"prompt": [99999]}, None, "prompt_ids must be in [0, 8192)"),
    ({"prompt": LONG}, None, "at most 2047 are allowed (max_input_tokens)"),
    ({"prompt": None}, "prompt", "`prompt`"),
])
def test_openai_rejects_each_bad_parameter_with_400(http, body, param, says):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "validation" and says in error["message"]
    if param is not None:
        assert error["param"] == param


def test_openai_answers_a_body_that_is_not_json_with_400(http):
    r = http.post("/v1/completions", content='{"prompt": "x"', headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": "the request body is not valid JSON (Expecting ',' delimiter at character 14)",
                                 "type": "invalid_request_error", "param": None, "code": "validation"}


def test_chat_without_a_chat_template_is_a_clear_400(http):
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


# ---- metrics ----------------------------------------------------------------------------------


def test_metrics_parse_as_prometheus_text_and_move_with_traffic(pipeline, http):
    def sample(name, **labels):
        return pipeline.metric(name, **labels)

    before = {
        "ok": sample("splitserve_requests_total", route="/generate", outcome="ok"),
        "refused": sample("splitserve_requests_total", route="/generate", outcome="validation"),
        "ttft": sample("splitserve_time_to_first_token_seconds_count", route="/generate"),
        "tpot": sample("splitserve_time_per_output_token_seconds_count", route="/generate"),
        "tokens": sample("splitserve_generated_tokens_total", route="/generate"),
        "prompt": sample("splitserve_prompt_tokens_total", route="/generate"),
    }
    assert http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 7}}).status_code == 200
    assert http.post("/generate", json={"inputs": PROMPT, "parameters": {"top_k": -1}}).status_code == 422
    assert sample("splitserve_requests_total", route="/generate", outcome="ok") == before["ok"] + 1
    assert sample("splitserve_requests_total", route="/generate", outcome="validation") == before["refused"] + 1
    assert sample("splitserve_time_to_first_token_seconds_count", route="/generate") == before["ttft"] + 1
    assert sample("splitserve_time_per_output_token_seconds_count", route="/generate") == before["tpot"] + 1
    assert sample("splitserve_generated_tokens_total", route="/generate") == before["tokens"] + 7
    assert sample("splitserve_prompt_tokens_total", route="/generate") > before["prompt"]

    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    assert {"splitserve_requests", "splitserve_time_to_first_token_seconds", "splitserve_request_duration_seconds",
            "splitserve_requests_in_flight", "splitserve_requests_waiting", "splitserve_decode_slots_reserved",
            "splitserve_decode_slots", "splitserve_prefill_queued_tokens", "splitserve_workers"} <= set(families)
    (slots,) = families["splitserve_decode_slots"].samples
    assert slots.value == 16 and slots.labels["worker"].startswith("decode-")
    assert families["splitserve_requests_in_flight"].samples[0].value == 0


def test_chat_completions_with_logprobs(home, tiny_dir, tmp_path):
    import shutil

    chat_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_dir, chat_dir)
    (chat_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with Cluster(home, model=str(chat_dir)) as c, httpx.Client(base_url=c.url, timeout=60) as http:
        c.start_pipeline(4)
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "temperature": 0,
                "logprobs": True, "top_logprobs": 2}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        content = choice["logprobs"]["content"]
        assert len(content) == 5 and "".join(e["token"] for e in content) == choice["message"]["content"]
        for e in content:  # greedy: the chosen token is the most likely one
            assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
            assert bytes(e["bytes"]) == e["token"].encode()
        # the same prompt through the completions API: the same tokens and logprobs
        prompt = PROMPT + "\n"
        ref = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                 "logprobs": 0}).json()["choices"][0]["logprobs"]
        assert [e["logprob"] for e in content] == pytest.approx(ref["token_logprobs"])
        streamed = sse(http.post("/v1/chat/completions", json={**body, "stream": True}))
        tokens = [e for chunk in streamed[:-1] for ch in chunk["choices"] if ch["logprobs"]
                  for e in ch["logprobs"]["content"]]
        assert [e["token"] for e in tokens] == [e["token"] for e in content]
        r = http.post("/v1/chat/completions", json={**body, "logprobs": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
        assert http.post("/v1/chat/completions", json={**body, "top_logprobs": 6}).status_code == 400


def test_tokenize_and_detokenize_answer_in_each_servers_shape(http, tokenizer):
    """/tokenize in TGI's shape (spans of `inputs`), llama.cpp's (`content`, pieces on request) and
    vLLM's (`prompt`, with the length limit), each the tokenizer's ids; /detokenize gives the text
    back under llama.cpp's and vLLM's names. A request naming no text, or two, and ids outside the
    vocabulary get TGI's 422."""
    text = PROMPT + "return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # ✓"
    ids = tokenizer.encode(text)
    tgi = http.post("/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tgi] == ids
    # each token's characters (the three bytes of ✓ are three tokens of the same character)
    assert all(t["text"] == text[t["start"]:t["stop"]] for t in tgi) and tgi[-1]["stop"] == len(text)
    assert [t["start"] for t in tgi] == sorted(t["start"] for t in tgi) and tgi[-1]["text"] == "✓"
    plain = tokenizer.encode(text, add_special_tokens=False)
    assert http.post("/tokenize", json={"content": text}).json() == {"tokens": plain}
    assert http.post("/tokenize", json={"content": text, "add_special": True}).json() == {"tokens": ids}
    pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain and [p["piece"] for p in pieces] == [tokenizer.decode([i]) for i in plain]
    assert http.post("/tokenize", json={"prompt": text}).json() == {"count": len(ids), "max_model_len": MAX_TOTAL,
                                                                     "tokens": ids}
    assert http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"] == plain
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"content": text, "prompt": text}
    for body, says in (({}, "one of `inputs`"), ({"inputs": "a", "prompt": "b"}, "not inputs and prompt"),
                       ({"content": 3}, "content")):
        r = http.post("/tokenize", json=body)
        assert r.status_code == 422 and says in r.json()["error"] and r.json()["error_type"] == "validation", r.text
    for tokens in ([tokenizer.vocab_size], [-1], ["a"]):
        r = http.post("/detokenize", json={"tokens": tokens})
        assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
