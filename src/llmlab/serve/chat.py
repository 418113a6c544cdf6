"""Chat messages to one prompt: the tokenizer's own chat template where the model folder has one,
else a small default.

A Hugging Face folder (or an llmlab checkpoint that kept one) may carry a Jinja chat template:
`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`. It is rendered the way
transformers' `apply_chat_template` renders it (a sandboxed Jinja environment, `messages`,
`add_generation_prompt=True`, the `bos_token` / `eos_token` strings, `raise_exception`), so the
prompt ids equal transformers' own (tested). The sandbox matters: the template comes from a
downloaded folder, and it can only format text, never reach Python objects.

The default, for models trained on plain text (every llmlab run):

    System: {system message}

    User: {user message}

    Assistant: {assistant message}

    User: {user message}

    Assistant:

Each message is `Role: content` followed by a blank line; the prompt ends with `Assistant:` for
the model to continue, and the reply stops at a new `\nUser:` line (a default stop string).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from llmlab.errors import LlmlabError

ROLES = ("system", "developer", "user", "assistant")
DEFAULT_STOP = ("\nUser:",)


class ChatTemplate:
    def __init__(self, source: Optional[str] = None, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._template = None
        if source is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self._template = env.from_string(source)
            except TemplateError as e:
                raise LlmlabError(f"the model's chat template does not parse ({e}); fix or remove it") from None

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings every chat reply gets (the default template's next-turn marker)."""
        return () if self._template is not None else DEFAULT_STOP

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` ([{role, content}], checked by the caller), ready for the
        assistant's reply. A template that refuses the messages raises ValueError (a 400)."""
        if self._template is None:
            turns = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
            return "".join(turns) + "Assistant:"
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except (TemplateError, TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            raise ValueError(f"the model's chat template refused these messages: {e}") from None


def _raise(message: str):
    raise ValueError(message)


def _token_text(value) -> str:
    """bos/eos in tokenizer_config.json: a string, or an AddedToken dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def load_template(directory: Path) -> ChatTemplate:
    """The chat template of a model folder (HF or llmlab checkpoint), or the default."""
    directory = Path(directory)
    config: dict = {}
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LlmlabError(f"{cfg_path} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(config, dict):
            config = {}
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        source = jinja.read_text(encoding="utf-8")
    if not isinstance(source, str) or not source.strip():
        return ChatTemplate()
    return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))
