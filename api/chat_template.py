"""Render chat messages into a prompt with the model's own chat template.

Chat templates are Jinja programs that ship inside GGUF files, so they are untrusted input: they
run in Jinja's immutable sandbox, the way Hugging Face's transformers renders them. A model with
no template (or one we cannot compile) gets a plain "Role: text" layout instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cached_property

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from api.errors import InvalidRequest

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateRaised(Exception):
    """A template called raise_exception(): the messages broke one of the template's rules."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or FALLBACK_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token

    @cached_property
    def _compiled(self):
        env = _environment()
        try:
            return env.from_string(self.source)
        except TemplateError:
            self.source = FALLBACK_TEMPLATE
            return env.from_string(FALLBACK_TEMPLATE)

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateRaised as error:
            raise InvalidRequest(f"the model's chat template refused these messages: {error}", param="messages") from None
        except TemplateError as error:
            raise InvalidRequest(f"the model's chat template could not render these messages: {error}", param="messages") from None
