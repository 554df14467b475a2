"""Hooks for the schemathesis run of tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

They change valid values into other valid values that the schema cannot single out, and leave
invalid ones as generated, so the server's validation is exercised in full:
- every reply length is capped at FUZZ_REPLY_TOKENS_CAP tokens. A valid max_tokens is any integer
  from 1 up, and the tiny model can count digits forever: a billion tokens would only measure how
  slow the model is (and end as the 504 of REQUEST_TIMEOUT);
- an embedding request's `dimensions` becomes the dimension of the embedding model the test serves
  (FUZZ_EMBEDDING_DIMENSIONS): any other is a 400 by design (vectors cannot be shortened), and
  which one is right depends on the model file, not on the request's form;
- an Ollama `options.num_ctx` above the context window of the model the test serves becomes that
  window (FUZZ_CONTEXT_WINDOW): a larger one is a 400 by design (a loaded model's window is fixed),
  and the window depends on the model file and N_CTX, not on the request's form.

And one check, `positive_data_acceptance_of_what_a_schema_can_state`, which the run uses instead of
the built-in positive_data_acceptance: the same check, except for three 400s for well-formed requests
that no JSON Schema can state; any other 400 for schema-valid data still fails the run:
- a prompt longer than the model's context window. That limit is a count of tokens of the rendered
  prompt. The OpenAI wire format defines it (`code`: context_length_exceeded); Ollama's and
  Anthropic's error shapes have no code, and carry the engine's message for it (api/engine.py);
- a Messages API conversation (Anthropic) whose last message is not the user's: continuing an
  assistant message (prefill) is not supported, and JSON Schema can constrain an array's first
  items or all of them, never its last one. Recognised from the request itself;
- an Ollama route given a model of the other kind: the embedding model on /api/chat or
  /api/generate (Ollama's own 400, "does not support chat"), a chat model on /api/embed or
  /api/embeddings. Which kind a name is depends on the installed files; recognised from the request
  with the names the test serves (FUZZ_CHAT_MODEL, FUZZ_EMBEDDING_MODEL).
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

REPLY_TOKENS_CAP = int(os.environ.get("FUZZ_REPLY_TOKENS_CAP", "16"))
REPLY_LENGTH_FIELDS = frozenset({"max_tokens", "max_completion_tokens", "n_predict"})
EMBEDDING_ROUTES = frozenset({"/v1/embeddings", "/api/embed"})
OLLAMA_GENERATION_ROUTES = frozenset({"/api/chat", "/api/generate"})
OLLAMA_EMBEDDING_ROUTES = frozenset({"/api/embed", "/api/embeddings"})
ANTHROPIC_MESSAGES_ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
CONTEXT_WINDOW_MESSAGE = "The prompt does not fit in the model's context window"


def _is_positive_integer(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and float(value).is_integer() and value >= 1


def _is_long_reply(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return value.is_integer() and value > REPLY_TOKENS_CAP
    return isinstance(value, int) and value > REPLY_TOKENS_CAP


def cap_reply_lengths(body: Any) -> None:
    """Cap every reply-length field, at any depth (llm-api nests it in `params`)."""
    if isinstance(body, dict):
        for key, value in body.items():
            if key in REPLY_LENGTH_FIELDS and _is_long_reply(value):
                body[key] = REPLY_TOKENS_CAP
            else:
                cap_reply_lengths(value)
    elif isinstance(body, list):
        for item in body:
            cap_reply_lengths(item)


def serve_the_model_dimensions(body: Any, path: str) -> None:
    dimensions = os.environ.get("FUZZ_EMBEDDING_DIMENSIONS")
    if path.rstrip("/") in EMBEDDING_ROUTES and dimensions and isinstance(body, dict) \
            and _is_positive_integer(body.get("dimensions")):
        body["dimensions"] = int(dimensions)


def fit_the_context_window(body: Any, path: str) -> None:
    window = os.environ.get("FUZZ_CONTEXT_WINDOW")
    options = body.get("options") if isinstance(body, dict) else None
    if path.rstrip("/") in OLLAMA_GENERATION_ROUTES and window and isinstance(options, dict) \
            and _is_positive_integer(options.get("num_ctx")) and options["num_ctx"] > int(window):
        options["num_ctx"] = int(window)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    cap_reply_lengths(case.body)
    serve_the_model_dimensions(case.body, case.path)
    fit_the_context_window(case.body, case.path)


def _error(response: schemathesis.Response) -> tuple[object, object]:
    """(code, message) of an error in any of the servers' shapes: OpenAI's {"error": {"code", "message"}},
    Anthropic's {"type": "error", "error": {"type", "message"}}, Ollama's {"error": "message"}."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return error.get("code"), error.get("message")
    return None, error


def _is_over_the_context_window(response: schemathesis.Response) -> bool:
    code, message = _error(response)
    return code == "context_length_exceeded" or (
        code is None and isinstance(message, str) and message.startswith(CONTEXT_WINDOW_MESSAGE))


def _ends_with_an_assistant_message(case: schemathesis.Case) -> bool:
    messages = case.body.get("messages") if isinstance(case.body, dict) else None
    return case.path.rstrip("/") in ANTHROPIC_MESSAGES_ROUTES and isinstance(messages, list) and bool(messages) \
        and isinstance(messages[-1], dict) and messages[-1].get("role") != "user"


def _model_id(name: object) -> object:
    return name.removesuffix(":latest").removesuffix(".gguf") if isinstance(name, str) else name


def _names_a_model_of_the_other_kind(case: schemathesis.Case) -> bool:
    model = _model_id(case.body.get("model")) if isinstance(case.body, dict) else None
    path = case.path.rstrip("/")
    return (path in OLLAMA_GENERATION_ROUTES and model == os.environ.get("FUZZ_EMBEDDING_MODEL")) or \
        (path in OLLAMA_EMBEDDING_ROUTES and model == os.environ.get("FUZZ_CHAT_MODEL"))


@schemathesis.check
def positive_data_acceptance_of_what_a_schema_can_state(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                                                        case: schemathesis.Case) -> bool | None:
    if response.status_code == 400 and (_is_over_the_context_window(response) or _ends_with_an_assistant_message(case)
                                        or _names_a_model_of_the_other_kind(case)):
        return None
    return positive_data_acceptance(ctx, response, case)
