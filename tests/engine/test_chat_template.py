"""Chat templates come from model files: they are rendered in a sandbox."""

from __future__ import annotations

import pytest

from api.chat_template import FALLBACK_TEMPLATE, ChatTemplate
from api.errors import InvalidRequest

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_renders_chatml_with_generation_prompt() -> None:
    text = ChatTemplate(CHATML).render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_cannot_reach_python_internals() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidRequest):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_raise_exception_becomes_a_400() -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    with pytest.raises(InvalidRequest, match="first must be user"):
        ChatTemplate(strict).render([{"role": "system", "content": "x"}])


def test_missing_or_broken_template_falls_back() -> None:
    for source in (None, "{% for %}"):
        template = ChatTemplate(source)
        assert template.render([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
        assert template.source == FALLBACK_TEMPLATE


def test_bos_token_is_available_to_templates() -> None:
    assert ChatTemplate("{{ bos_token }}x", bos_token="<s>").render([]) == "<s>x"
