"""Hooks for the schemathesis run of tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

They change valid values into other valid values that the schema cannot single out, and leave
invalid ones as generated, so the server's validation is exercised in full:
- every reply length is capped at FUZZ_REPLY_TOKENS_CAP tokens. A valid max_tokens is any integer
  from 1 up, and the tiny model can count digits forever: a billion tokens would only measure how
  slow the model is (and end as the 504 of REQUEST_TIMEOUT);
- an embedding request's `dimensions` becomes the dimension of the embedding model the test serves
  (FUZZ_EMBEDDING_DIMENSIONS): any other is a 400 by design (vectors cannot be shortened), and
  which one is right depends on the model file, not on the request's form.

And one check, `positive_data_acceptance_within_the_context_window`, which the run uses instead of
the built-in positive_data_acceptance: the same check, except for the one 400 the OpenAI wire
format defines for a well-formed request, a prompt longer than the model's context window
(`code`: context_length_exceeded). That limit is a count of tokens of the rendered prompt, which no
schema can state; any other 400 for schema-valid data still fails the run.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

REPLY_TOKENS_CAP = int(os.environ.get("FUZZ_REPLY_TOKENS_CAP", "16"))
REPLY_LENGTH_FIELDS = frozenset({"max_tokens", "max_completion_tokens", "n_predict"})


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
    if path.rstrip("/") == "/v1/embeddings" and dimensions and isinstance(body, dict) \
            and _is_positive_integer(body.get("dimensions")):
        body["dimensions"] = int(dimensions)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    cap_reply_lengths(case.body)
    serve_the_model_dimensions(case.body, case.path)


def _error_code(response: schemathesis.Response) -> object:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error", {}).get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None


@schemathesis.check
def positive_data_acceptance_within_the_context_window(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                                                       case: schemathesis.Case) -> bool | None:
    if response.status_code == 400 and _error_code(response) == "context_length_exceeded":
        return None
    return positive_data_acceptance(ctx, response, case)
