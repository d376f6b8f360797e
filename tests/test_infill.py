"""llama.cpp's /infill: the prompt's layout and budget (repository tokens, snippets, far ends cut), the
stop checks llama.cpp runs per token, and served: the bodies llama.vscode and llama.vim send answered
in llama.cpp's shape, n_predict 0 and -1, response_fields, n_indent, t_max_predict_ms, stop strings,
streaming, the prefix cache seen in tokens_cached, cache_prompt, errors, a Qwen checkpoint's
repository context and a model without FIM tokens."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from cluster import Cluster, wait_for
from splitserve.common import protocol as P
from splitserve.common.builtin_models import SHIPPED_TINY
from splitserve.common.fim import find_fim
from splitserve.common.tokenizer import Tokenizer
from splitserve.gateway.infill import Completion, InfillJob, select
from splitserve.gateway.infill_prompt import FIM_BATCH, GENERATION_RESERVE, SNIPPET, InfillPrompts
from splitserve.gateway.infill_schema import ExtraChunk, InfillRequest

MAX_TOTAL = 2048  # the tiny model's positions: the default limits
TIMINGS = {"cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
           "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}
FINAL = {"index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
         "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word", "tokens_cached",
         "timings"}
STACK = {"input_prefix": "import os\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
                         "    def push(self, item):\n",
         "prompt": "        self.", "input_suffix": "\n\n    def pop(self):\n        return self.items.pop()\n"}
# greedy, with the repetition penalty the tiny model needs to write more than one line
GREEDY = {**STACK, "temperature": 0, "repeat_penalty": 1.3, "n_predict": 64}
CONTEXT = [{"filename": "queue.py", "text": "class Queue:\n    def __init__(self):\n        self.items = []\n\n"
                                            "    def put(self, item):\n        self.items.insert(0, item)\n" * 3},
           {"filename": "util.py", "text": "def first(items):\n    return items[0] if items else None\n" * 3}]
# as llama.vscode sends a completion (its defaults; n_cmpl and lora are ignored)
VSCODE = {**STACK, "input_extra": CONTEXT, "n_predict": 32, "id_slot": 0, "n_cmpl": 3, "top_k": 40, "top_p": 0.99,
          "stream": False, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 8,
          "t_max_prompt_ms": 500, "t_max_predict_ms": 2500}
# as llama.vim sends its ring buffer's chunks ahead of completions, and then a completion
VIM_CONTEXT = [{"filename": "deque.py", "time": 123.0,
                "text": "class Deque:\n    def appendleft(self, item):\n        self.items.insert(0, item)\n" * 4}]
VIM_WARMUP = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "prompt": "",
              "input_extra": VIM_CONTEXT, "n_predict": 0, "temperature": 0.0,
              "samplers": [], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1,
              "response_fields": [""]}
VIM_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
              "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
              "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]
VIM = {**STACK, "input_extra": VIM_WARMUP["input_extra"], "id_slot": 0, "n_predict": 128, "stop": [],
       "n_indent": 8, "top_k": 40, "top_p": 0.90, "samplers": ["top_k", "top_p", "infill"], "stream": False,
       "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 250, "response_fields": VIM_FIELDS}


# ---- the prompt ---------------------------------------------------------------------------------


def fim_of(path: Path):
    tok = Tokenizer.from_dir(path)
    return tok, find_fim(tok)


@pytest.mark.parametrize("family", ["qwen2.5-coder", "starcoder2"])
def test_repository_context_takes_the_family_tokens(family_dirs, family):
    tok, fim = fim_of(family_dirs[family])
    t, enc = tok.token_to_id, tok.encode_continuation
    qwen = family.startswith("qwen")
    repo, sep = (t("<|repo_name|>"), t("<|file_sep|>")) if qwen else (t("<repo_name>"), t("<file_sep>"))
    pre, suf, mid = (t(f"<|fim_{m}|>") if qwen else t(f"<fim_{m}>") for m in ("prefix", "suffix", "middle"))
    extra = [ExtraChunk(text="A = 1\n", filename="a.py"), ExtraChunk(text="B = 2\n")]
    ids = InfillPrompts(fim, MAX_TOTAL - 1, MAX_TOTAL).ids("def f(x):\n", "    return", "\n\nprint(f(1))\n", extra, 16)
    assert ids == [repo, *enc("myproject\n"), sep, *enc("a.py\n"), *enc("A = 1\n"), sep, *enc("tmp\n"),
                   *enc("B = 2\n"), sep, *enc("filename\n"), pre, *enc("def f(x):\n"), *enc("    return"), suf,
                   *enc("\n\nprint(f(1))\n"), mid]
    r, s = ("<|repo_name|>", "<|file_sep|>") if qwen else ("<repo_name>", "<file_sep>")
    p, q, m = (tok.id_to_token(i) for i in (pre, suf, mid))
    assert tok.decode(ids) == (f"{r}myproject\n{s}a.py\nA = 1\n{s}tmp\nB = 2\n{s}filename\n"
                               f"{p}def f(x):\n    return{q}\n\nprint(f(1))\n{m}")


def test_without_repository_tokens_each_chunk_is_a_snippet(family_dirs):
    extra = [ExtraChunk(text="A = 1\n", filename="a.py")]
    tok, fim = fim_of(SHIPPED_TINY)  # StarCoder's FIM tokens, no repository tokens
    ids = InfillPrompts(fim, MAX_TOTAL - 1, MAX_TOTAL).ids("def f(x):\n", "    return", "\n", extra, 16)
    assert tok.decode(ids) == f"{SNIPPET}A = 1\n<fim_prefix>def f(x):\n    return<fim_suffix>\n<fim_middle>"
    # Codestral: the BOS first, then the context, then the suffix before the prefix, no middle marker
    tok, fim = fim_of(family_dirs["codestral"])
    ids = InfillPrompts(fim, MAX_TOTAL - 1, MAX_TOTAL).ids("def f(x):\n", "    return", "\n", extra, 16)
    enc = tok.encode_continuation
    assert ids == [tok.bos_token_id, *enc(SNIPPET), *enc("A = 1\n"), fim.suffix_id, *enc("\n"), fim.prefix_id,
                   *fim.prefix_ids("def f(x):\n"), *enc("    return")]


def numbered(name: str, n: int) -> str:
    return "".join(f"{name}_{i} = {i}\n" for i in range(n))


def test_the_prompt_is_cut_at_its_far_ends():
    """llama.cpp's budget: the prefix keeps its last 3/4 of the cursor's batch, the suffix its first
    1/4 less the cursor's line and two markers, the context what is left beside the batch and the
    generation reserve, its end; the cursor's line whole."""
    tok, fim = fim_of(SHIPPED_TINY)
    enc = tok.encode_continuation
    prompts = InfillPrompts(fim, MAX_TOTAL - 1, MAX_TOTAL)
    prefix, line, suffix = numbered("before", 1500), "    total = ", numbered("after", 1500)
    extra = [ExtraChunk(text=numbered("far", 800)), ExtraChunk(text=numbered("near", 800))]
    ids = prompts.ids(prefix, line, suffix, extra, 64)
    context = [*enc(SNIPPET), *enc(extra[0].text), *enc(SNIPPET), *enc(extra[1].text)]
    n_line = len(enc(line))
    kept_context = MAX_TOTAL - GENERATION_RESERVE - FIM_BATCH - 3  # beside the batch and the three markers
    assert ids == [*context[-kept_context:], fim.prefix_id, *enc(prefix)[-(3 * FIM_BATCH // 4):], *enc(line),
                   fim.suffix_id, *enc(suffix)[:FIM_BATCH // 4 - 2 - n_line], fim.middle_id]
    assert len(ids) <= MAX_TOTAL - 64
    # the context is cut the same whatever n_predict up to the reserve (a warm-up's and a completion's
    # prompts start alike); past it, further
    assert prompts.ids("", "", "", extra, 1)[:kept_context] == ids[:kept_context]
    longer = prompts.ids(prefix, line, suffix, extra, 512)
    assert longer == [*context[-(MAX_TOTAL - 512 - FIM_BATCH - 3):], *ids[kept_context:]]
    # a small deployment: the cursor's batch is the whole room, no context
    small = InfillPrompts(fim, 511, 512).ids(prefix, line, suffix, extra, 32)
    assert small[0] == fim.prefix_id and len(small) <= 512 - 32


# ---- the stop checks, token by token ------------------------------------------------------------


def completion(**fields) -> Completion:
    body = InfillRequest(input_prefix="", input_suffix="", **fields)
    msg = P.Generate("r", prompt_ids=[1, 2, 3], params=P.GenerateParams(stop=body.stop))
    return Completion(InfillJob(msg, body, ()), time.perf_counter())


def feed(c: Completion, pieces: list[str], finish: str | None = None) -> list[str]:
    """Each piece a decode step; -> what each step streamed, until the request stops."""
    sent = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        sent.append(c.add(P.TokenBatch("r", [P.Token(i, 100 + i, piece)], finish if last else None))[0])
        if c.done:
            break
    return sent


def test_n_indent_stops_at_the_first_line_indented_less():
    """llama.cpp checks, from the token after the first new line on, one line per token: the first
    line with text indented less than n_indent ends the answer, keeping only its indentation."""
    c = completion(n_indent=4)
    sent = feed(c, ["    x = 1", "\n", "    y", " = 2\n", "z", " = 3", "\n"])
    assert c.done and c.stop_type == "limit" and c.n == 5
    assert c.text == "    x = 1\n    y = 2\n" and "".join(sent) == "    x = 1\n    y = 2\nz"  # a stream had sent z
    c = completion(n_indent=4)  # indented enough: on to the end
    feed(c, ["    x = 1", "\n", "    y = 2", "\n", "        z", "\n"], "length")
    assert c.text == "    x = 1\n    y = 2\n        z\n" and c.stop_type == "limit" and c.n == 6


def test_t_max_predict_ms_stops_at_a_new_line_once_it_passed():
    c = completion(t_max_predict_ms=5)
    feed(c, ["a"])
    time.sleep(0.02)
    assert feed(c, ["b", "c\n", "d"]) == ["b", "c\n"] and c.text == "abc\n" and c.stop_type == "limit"


def test_stop_words_are_cut_and_named_and_stop_tokens_are_eos():
    c = completion(stop=["\n\n", "\n"])
    feed(c, ["a", "b\n\n"], "stop_sequence")
    assert (c.text, c.stop_type, c.stopping_word) == ("ab", "word", "\n\n")
    c = completion(stop=["\n\n"])
    feed(c, ["a", ""], "stop_sequence")  # a FIM end token (a stop token id): no text, no word
    assert (c.text, c.stop_type, c.stopping_word) == ("a", "eos", "")


def test_response_fields_are_flattened_paths():
    answer = {"content": "x", "timings": {"prompt_n": 3, "nested": {"a": 1}}, "truncated": False}
    assert select(answer, ["content", "timings/prompt_n", "timings/nested/a", "missing", "content/x", ""]) == {
        "content": "x", "timings/prompt_n": 3, "timings/nested/a": 1}


# ---- served -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(home):
    """A pipeline on the trained tiny model (StarCoder's FIM tokens), default limits."""
    with Cluster(home, model="tiny") as c:
        c.start_pipeline(8)
        yield c


def infill(c: Cluster, body: dict) -> httpx.Response:
    return httpx.post(f"{c.url}/infill", json=body, timeout=120)


def answer(c: Cluster, body: dict) -> dict:
    r = infill(c, body)
    assert r.status_code == 200, r.text
    return r.json()


def events(c: Cluster, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{c.url}/infill", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: {") for line in lines), lines  # no [DONE]
    return [json.loads(line[len("data: "):]) for line in lines]


def test_llama_vscode_completion_in_llama_cpp_shape(tiny):
    d = answer(tiny, VSCODE)
    assert set(d) == FINAL and set(d["timings"]) == TIMINGS
    assert d["stop"] is True and d["model"] == "tiny" and d["stop_type"] in ("eos", "limit", "word")
    assert 0 < d["tokens_predicted"] <= 32 and d["tokens_evaluated"] > 100 and d["tokens"] == []
    assert d["timings"]["prompt_n"] == d["tokens_evaluated"] - d["tokens_cached"]
    assert d["timings"]["predicted_n"] == d["tokens_predicted"]
    assert d["generation_settings"]["samplers"] == ["top_k", "top_p"] and d["generation_settings"]["n_ctx"] == MAX_TOTAL
    assert d["prompt"].startswith(SNIPPET + "class Queue:") and d["prompt"].endswith("<fim_middle>")


def test_llama_vim_warmup_fills_the_cache_for_its_completions(tiny):
    """The warm-up (n_predict 0) answers {} under response_fields [""]; in full, no content and no
    tokens; the completions after it find its context cached and get the flattened fields they ask for."""
    assert answer(tiny, VIM_WARMUP) == {}
    d = answer(tiny, {**VIM_WARMUP, "response_fields": []})
    assert (d["content"], d["tokens_predicted"], d["stop_type"], d["timings"]["predicted_n"]) == ("", 0, "limit", 0)
    d = answer(tiny, VIM)
    assert list(d) == VIM_FIELDS and d["truncated"] is False
    _, fim = fim_of(SHIPPED_TINY)
    warmup = InfillPrompts(fim, MAX_TOTAL - 1, MAX_TOTAL).ids("", "", "", [ExtraChunk(**VIM_CONTEXT[0])], 1)
    shared = len(warmup) - 2  # the context and <fim_prefix>; then <fim_suffix> where a completion's prefix goes
    assert shared >= 64 and d["tokens_cached"] == shared // 32 * 32  # the whole blocks the warm-up left


def test_n_predict_minus_one_generates_until_the_context_is_full(tiny):
    body = {**STACK, "input_prefix": numbered("v", 3000), "input_extra": [{"text": numbered("e", 3000)}],
            "temperature": 0, "n_predict": -1}
    d = answer(tiny, body)
    assert (d["stop_type"], d["truncated"]) == ("limit", True)
    assert d["tokens_evaluated"] + d["tokens_predicted"] == MAX_TOTAL
    # the far ends went: the prefix's start, the context's start; the cursor's neighbourhood stayed
    assert "v_2999 = 2999\n        self.<fim_suffix>\n\n    def pop" in d["prompt"]
    assert "v_0 = 0" not in d["prompt"] and "e_0 = 0" not in d["prompt"] and "e_2999 = 2999" in d["prompt"]


def test_n_indent_and_t_max_predict_ms_end_the_answer_at_a_line(tiny):
    full = answer(tiny, GREEDY)["content"]
    first = full.index("\n") + 1
    assert "\n" in full[first:], full  # the answer goes on past its first line: the checks below cut it
    cut = first + len(full[first:]) - len(full[first:].lstrip(" \t"))
    ok = tiny.metric("splitserve_requests_total", route="/infill", outcome="ok")
    d = answer(tiny, {**GREEDY, "n_indent": 100})
    assert (d["content"], d["stop_type"]) == (full[:cut], "limit") and d["tokens_predicted"] < 64
    d = answer(tiny, {**GREEDY, "t_max_predict_ms": 1})
    assert full.startswith(d["content"]) and d["content"].endswith("\n") and d["stop_type"] == "limit"
    assert d["tokens_predicted"] < 64 and d["has_new_line"] is True
    # complete answers, though their requests were cancelled at the workers
    wait_for(lambda: tiny.metric("splitserve_requests_total", route="/infill", outcome="ok") == ok + 2, 10,
             "both counted ok")


def test_stop_strings_are_cut_from_the_content(tiny):
    full = answer(tiny, GREEDY)["content"]
    d = answer(tiny, {**GREEDY, "stop": ["\n"]})
    assert (d["content"], d["stop_type"], d["stopping_word"]) == (full[:full.index("\n")], "word", "\n")


def test_min_p_is_among_llama_cpps_default_samplers(tiny):
    """Without `samplers`, llama.cpp's default chain applies, min_p (0.05) in it. min_p 1 leaves only
    the likeliest token: a sampled answer is then the greedy one (penalties alike)."""
    sampled = {**GREEDY, "temperature": 1.5, "seed": 3, "n_predict": 16, "return_tokens": True}
    settings = answer(tiny, sampled)["generation_settings"]
    assert settings["samplers"] == ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"]
    assert settings["min_p"] == 0.05
    only_best = answer(tiny, {**sampled, "min_p": 1.0, "samplers": "emt"})
    assert only_best["generation_settings"]["samplers"] == ["penalties", "min_p", "temperature"]
    assert only_best["tokens"] == answer(tiny, {**GREEDY, "n_predict": 16, "return_tokens": True})["tokens"]


def test_the_penalties_count_the_last_repeat_last_n_tokens(tiny):
    """llama.cpp's repeat_last_n (64 by default): the penalties look back that many tokens (-1: all of
    them; 0: the penalties are off, as with repeat_penalty 1)."""
    short = {**GREEDY, "n_predict": 24, "return_tokens": True, "input_extra": CONTEXT}
    default = answer(tiny, short)
    assert default["generation_settings"]["repeat_last_n"] == 64
    assert default["tokens"] == answer(tiny, {**short, "repeat_last_n": 64})["tokens"]
    assert default["tokens"] != answer(tiny, {**short, "repeat_last_n": -1})["tokens"]
    off = answer(tiny, {**short, "repeat_penalty": 1.0})["tokens"]
    assert answer(tiny, {**short, "repeat_last_n": 0})["tokens"] == off
    assert infill(tiny, {**short, "repeat_last_n": -2}).status_code == 400


def test_logit_bias_in_llama_cpps_shapes(tiny):
    """logit_bias as llama.cpp takes it: [[token, bias], ...] or {token: bias}, a token an id (a key of
    digits too) or a text whose tokens each get the bias; false: never that token."""
    short = {**GREEDY, "n_predict": 8, "return_tokens": True}
    plain = answer(tiny, short)["tokens"]
    for ban in ([[plain[0], False]], {str(plain[0]): False}):
        assert plain[0] not in answer(tiny, {**short, "logit_bias": ban})["tokens"]
    word = Tokenizer.from_dir(SHIPPED_TINY).encode(" items", add_special_tokens=False)
    forced = answer(tiny, {**short, "logit_bias": [[" items", 100]]})["tokens"]
    assert forced and set(forced) <= set(word) and forced != plain
    r = infill(tiny, {**short, "logit_bias": {"99999": 1}})
    assert r.status_code == 400 and "logit_bias token ids must be in [0, " in r.json()["error"]["message"]


def test_streaming_sends_each_step_then_the_final_answer(tiny):
    whole = answer(tiny, GREEDY)
    got = events(tiny, {**GREEDY, "response_fields": ["content", "stop", "tokens_predicted", "timings/predicted_n"]})
    partial, final = got[:-1], got[-1]
    assert all(e["stop"] is False and set(e) == {"index", "content", "tokens", "stop", "id_slot", "tokens_predicted",
                                                 "tokens_evaluated"} for e in partial)
    assert "".join(e["content"] for e in partial) == whole["content"]
    counts = [e["tokens_predicted"] for e in partial]  # one event per step (a late step's tokens come together)
    assert counts == sorted(set(counts)) and counts[-1] == whole["tokens_predicted"]
    assert final == {"content": "", "stop": True, "tokens_predicted": whole["tokens_predicted"],
                     "timings/predicted_n": whole["tokens_predicted"]}
    # a prefill-only request streams its final answer alone
    assert [e["stop"] for e in events(tiny, {**VIM_WARMUP, "response_fields": []})] == [True]


def test_a_repeat_finds_its_prompt_cached_unless_cache_prompt_is_false(tiny):
    prefill = next(w for w, info in tiny.workers.items() if info["role"] == "prefill")
    body = {**GREEDY, "input_extra": [{"text": numbered("r", 200)}], "n_predict": 8, "return_tokens": True}
    first, again = answer(tiny, body), answer(tiny, body)
    assert again["tokens_cached"] == again["timings"]["cache_n"] >= again["tokens_evaluated"] - 32
    assert again["tokens_cached"] > first["tokens_cached"]
    looked_up = tiny.metric("splitserve_prefill_prefix_lookup_tokens_total", prefill)
    fresh = answer(tiny, {**body, "cache_prompt": False})
    assert fresh["tokens_cached"] == 0 and fresh["timings"]["prompt_n"] == fresh["tokens_evaluated"]
    assert tiny.metric("splitserve_prefill_prefix_lookup_tokens_total", prefill) == looked_up  # not even looked up
    assert fresh["content"] == again["content"] == first["content"] and fresh["tokens"] == first["tokens"]
    assert len(first["tokens"]) == first["tokens_predicted"]


@pytest.mark.parametrize("change", [
    {"input_extra": {"filename": "a.py", "text": "x"}}, {"input_extra": ["x = 1"]},
    {"input_extra": [{"filename": "a"}]}, {"input_extra": [{"text": 1}]}, {"prompt": ["x"]}, {"n_predict": -2},
    {"input_prefix": None}, {"stop": ["a"] * 5}, {"top_p": 0}, {"seed": 2**64}])
def test_bad_requests_get_llama_cpp_errors(tiny, change):
    r = infill(tiny, {**STACK, **change})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == 400 and error["type"] == "invalid_request_error", r.text
    assert isinstance(error["message"], str) and error["message"]


# ---- other families -------------------------------------------------------------------------------


def checkpoint_with(tmp_path: Path, family_dir: Path, model_type: str) -> Path:
    """A random checkpoint of `model_type` with a family's tokenizer files and a vocabulary to match."""
    from test_families import make_checkpoint

    vocab = Tokenizer.from_dir(family_dir).vocab_size
    path = make_checkpoint(tmp_path, model_type, dict(vocab_size=vocab, max_position_embeddings=MAX_TOTAL))
    (path / "special_tokens_map.json").unlink()  # the tiny tokenizer's, which make_checkpoint writes
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(family_dir / name, path / name)
    return path


def test_a_qwen_checkpoint_gets_its_repository_tokens(home, family_dirs, tmp_path):
    path = checkpoint_with(tmp_path / "qwen", family_dirs["qwen2.5-coder"], "qwen2")
    tok, fim = fim_of(path)
    body = {**STACK, "input_extra": CONTEXT, "n_predict": 4, "temperature": 0}
    expected = InfillPrompts(fim, MAX_TOTAL - 1, MAX_TOTAL).ids(
        STACK["input_prefix"], STACK["prompt"], STACK["input_suffix"], [ExtraChunk(**c) for c in CONTEXT], 4)
    assert expected[0] == tok.token_to_id("<|repo_name|>")
    with Cluster(home, model=str(path)) as c:
        c.start_pipeline(4)
        d = answer(c, body)
    assert d["tokens_evaluated"] == len(expected) and d["prompt"] == tok.decode(expected)
    assert d["prompt"].startswith("<|repo_name|>myproject\n<|file_sep|>queue.py\nclass Queue:")


def test_a_model_without_fim_tokens_is_refused(home, family_dirs, tmp_path):
    path = checkpoint_with(tmp_path / "llama", family_dirs["llama"], "llama")
    with Cluster(home, model=str(path)) as c:
        c.start_pipeline(4)
        r = infill(c, VSCODE)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "fill-in-the-middle" in r.json()["error"]["message"]
