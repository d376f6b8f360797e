"""A checkpoint's chat template, found where transformers saves it and rendered as transformers
does (a sandboxed Jinja environment), so a chat prompt reads the same as with the model's own tooling."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from .api_errors import invalid


def load_chat_template(model_dir: Path) -> str | None:
    """`chat_template.jinja`, else tokenizer_config.json's `chat_template` (a string, or a list of
    named templates of which "default" is used); None when the checkpoint has none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def render_chat(template: str, messages: list[dict], special_tokens: Mapping[str, str]) -> str:
    """The prompt text, ending with the assistant's turn opened. `special_tokens` (bos_token,
    eos_token, ... as tokenizer_config.json names them) are the template's variables of those names,
    as transformers passes them; one the checkpoint leaves unset renders empty."""
    from jinja2 import TemplateError

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
    except TemplateError as e:
        raise invalid(f"the chat template refused these messages: {e}", "messages") from None


@lru_cache(maxsize=4)
def _compiled(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(template)
