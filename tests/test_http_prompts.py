"""Prompt building for the HTTP APIs, without a server: fill-in-the-middle requests and chat templates."""

from __future__ import annotations

import json

import pytest

from splitserve.common.fim import find_fim
from splitserve.common.params import MAX_STOP_TOKEN_IDS, STOP_IDS_PER_REQUEST, Limits, ValidationError
from splitserve.common.tokenizer import Tokenizer
from splitserve.gateway.api_context import ApiContext
from splitserve.gateway.api_errors import ApiError
from splitserve.gateway.chat_template import load_chat_template, render_chat
from splitserve.gateway.openai_api import chat_fanout, completion_fanout
from splitserve.gateway.openai_schema import ChatRequest, CompletionRequest
from splitserve.gateway.validation import check_stop_token_ids
from tokenizer_families import FAMILIES

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list <s> in Python."}]


def api(model_dir, chat_template: str | None = None) -> ApiContext:
    """What the OpenAI routes need to build requests; no core behind it."""
    return ApiContext(None, Tokenizer.from_dir(model_dir), Limits.derive(512), "m", chat_template)


@pytest.mark.parametrize("family", ["starcoder2", "qwen2.5-coder", "deepseek-coder", "codellama", "codestral"])
def test_fim_request_is_the_families_layout_and_stops_at_its_ends(family_dirs, family):
    ctx = api(family_dirs[family])
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    fanout = completion_fanout(ctx, CompletionRequest(prompt=prefix, suffix=suffix, max_tokens=8, n=2))
    fim = find_fim(ctx.tokenizer)
    assert fanout.prompts == [fim.prompt(fim.prefix_ids(prefix), fim.suffix_ids(suffix), 512 - 8)]
    assert fanout.prompts[0][: len(ctx.tokenizer.leading_special_ids)] == list(ctx.tokenizer.leading_special_ids)
    assert [m.params.stop_token_ids for m in fanout.msgs] == [list(fim.end_ids)] * 2 and fim.end_ids
    plain = completion_fanout(ctx, CompletionRequest(prompt=prefix, max_tokens=8))
    assert plain.prompts == [ctx.tokenizer.encode(prefix)] and plain.msgs[0].params.stop_token_ids == []


def test_fim_prompt_given_as_ids_is_the_prefix_as_is(family_dirs):
    ctx = api(family_dirs["codellama"])
    fim = ctx.fim
    fanout = completion_fanout(ctx, CompletionRequest(prompt=[[10, 11], [12]], suffix="x", max_tokens=8))
    suffix, room = fim.suffix_ids("x"), 512 - 8
    assert fanout.prompts == [fim.prompt([10, 11], suffix, room), fim.prompt([12], suffix, room)]


def test_fim_too_long_keeps_the_code_nearest_the_cursor(family_dirs):
    ctx = api(family_dirs["qwen2.5-coder"])
    prefix, suffix = "alpha = 1\n" * 300, "omega = 2\n" * 300
    (ids,) = completion_fanout(ctx, CompletionRequest(prompt=prefix, suffix=suffix, max_tokens=12)).prompts
    assert len(ids) == 512 - 12  # prompt + max_tokens fill max_total_tokens
    kept_prefix, kept_suffix = ctx.tokenizer.decode(ids).removeprefix("<|fim_prefix|>").removesuffix(
        "<|fim_middle|>").split("<|fim_suffix|>")
    assert prefix.endswith(kept_prefix) and suffix.startswith(kept_suffix)
    assert len(kept_prefix) >= len(kept_suffix) > 100  # the suffix keeps at most half


def test_fim_without_fim_tokens_is_a_clear_400(family_dirs):
    with pytest.raises(ApiError) as e:
        completion_fanout(api(family_dirs["llama"]), CompletionRequest(prompt="a", suffix="b"))
    assert e.value.error_type == "validation" and e.value.param == "suffix" and "FIM tokens" in e.value.message


def test_stop_ids_a_client_gives_and_the_servers_own():
    server = {7, 8, 9}
    check_stop_token_ids(list(range(MAX_STOP_TOKEN_IDS)) + [7, 8, 9], server)  # the client's 8 and the server's
    with pytest.raises(ValidationError, match=f"at most {MAX_STOP_TOKEN_IDS} stop token ids"):
        check_stop_token_ids(list(range(10, 11 + MAX_STOP_TOKEN_IDS)), server)
    with pytest.raises(ValidationError, match=f"at most {STOP_IDS_PER_REQUEST} stop token ids .* server's own"):
        check_stop_token_ids([7] * (STOP_IDS_PER_REQUEST + 1), server)


def test_chat_template_is_found_and_rendered_as_transformers_does(tmp_path):
    assert load_chat_template(tmp_path) is None
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default",
                                                                                    "template": template}]}))
    assert load_chat_template(tmp_path) == template
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    assert "raise_exception" in load_chat_template(tmp_path)  # the .jinja file wins
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(template, messages, {"eos_token": "</s>"}) == "<|user|>hi</s>\n<|assistant|>"
    with pytest.raises(ApiError, match="no system role"):
        render_chat(load_chat_template(tmp_path), messages, {})


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompt_is_transformers_apply_chat_template(family_dirs, family):
    """The template gets the checkpoint's own BOS and EOS strings (none where it sets none, as Qwen),
    and its text is encoded without adding a BOS again."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(family_dirs[family])
    ctx = api(family_dirs[family], load_chat_template(family_dirs[family]))
    text = render_chat(ctx.chat_template, MESSAGES, ctx.tokenizer.special_tokens)
    assert text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith(hf.bos_token or "<|system|>") and f"Be brief.{hf.eos_token}" in text
    fanout = chat_fanout(ctx, ChatRequest(messages=MESSAGES, max_tokens=4))
    assert fanout.prompts == [hf.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]]
