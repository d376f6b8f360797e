"""Prompt building for the HTTP APIs, without a server: fill-in-the-middle and chat templates."""

from __future__ import annotations

import json

import pytest
from tokenizer_families import FAMILIES

from splitserve.common.params import Limits
from splitserve.common.tokenizer import Tokenizer, fim_token_ids
from splitserve.gateway.api_context import ApiContext
from splitserve.gateway.api_errors import ApiError
from splitserve.gateway.chat_template import load_chat_template, render_chat
from splitserve.gateway.fim import MARKERS, fim_prompt, split_room
from splitserve.gateway.openai_api import chat_fanout
from splitserve.gateway.openai_schema import ChatRequest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list <s> in Python."}]


class Vocab:
    """A tokenizer stand-in that knows some special tokens by name."""

    def __init__(self, **ids: int):
        self.ids = ids

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)


def api(model_dir, chat_template: str | None = None) -> ApiContext:
    """What the OpenAI routes need to build requests; no core behind it."""
    return ApiContext(None, Tokenizer.from_dir(model_dir), Limits.derive(512), "m", chat_template)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


def test_fim_prompt_is_prefix_suffix_middle_with_the_tokenizers_markers(tokenizer):
    prefix, suffix = tokenizer.encode("def add(a, b):\n    "), tokenizer.encode("\n    return c\n")
    fim = fim_token_ids(tokenizer)
    ids = fim_prompt(tokenizer, prefix, suffix, room=2047)
    assert ids == [fim["prefix"], *prefix, fim["suffix"], *suffix, fim["middle"]]
    assert tokenizer.decode(ids).startswith("<fim_prefix>def add") and tokenizer.decode(ids).endswith("<fim_middle>")


def test_fim_knows_santacoder_spelling_and_refuses_without_markers():
    santa = Vocab(**{"<fim-prefix>": 1, "<fim-suffix>": 2, "<fim-middle>": 3, "<fim-pad>": 4})
    assert fim_prompt(santa, [10, 11], [20], room=100) == [1, 10, 11, 2, 20, 3]
    with pytest.raises(ApiError) as e:
        fim_prompt(Vocab(), [10], [20], room=100)
    assert e.value.error_type == "validation" and e.value.param == "suffix" and "FIM" in e.value.message


def test_fim_truncates_the_far_ends_and_keeps_the_middle_marker_last():
    star = Vocab(**{"<fim_prefix>": 1, "<fim_suffix>": 2, "<fim_middle>": 3})
    prefix, suffix = list(range(100, 160)), list(range(200, 260))
    ids = fim_prompt(star, prefix, suffix, room=20 + MARKERS)
    assert ids == [1, *range(150, 160), 2, *range(200, 210), 3]  # the code nearest the cursor survives
    assert fim_prompt(star, prefix, suffix, room=2) == [1, 2, 3]  # only markers: the limit check then refuses


@pytest.mark.parametrize("n_prefix, n_suffix, room, kept", [
    (5, 5, 20, (5, 5)),  # everything fits
    (50, 4, 20, (16, 4)),  # a short suffix leaves the rest to the prefix
    (4, 50, 20, (4, 16)),  # and a short prefix to the suffix
    (50, 50, 21, (11, 10)),  # both long: the suffix gets at most half
    (50, 50, 0, (0, 0)),
])
def test_split_room(n_prefix, n_suffix, room, kept):
    assert split_room(n_prefix, n_suffix, room) == kept
    assert sum(kept) <= room


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
