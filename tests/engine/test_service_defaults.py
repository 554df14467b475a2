"""What the generation service decides once for every wire format: the longest reply when a request
does not say (DEFAULT_MAX_TOKENS). The tiny model counts one digit per token, so the reply's length
is the number of tokens generated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from testing.servers import ServerProcess, running_worker
from testing.tiny_models import tiny_settings

DEFAULT_MAX_TOKENS = 7


@pytest.fixture(scope="module")
def short_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("short"),
                          **tiny_settings(DEFAULT_MAX_TOKENS=DEFAULT_MAX_TOKENS)) as worker:
        yield worker


def reply_text(path: str, answer: requests.Response) -> str:
    if path == "/v1/completions":
        return answer.json()["choices"][0]["text"]
    if path == "/v0/language-models/generate":
        return answer.json()["text"]
    return answer.json()  # /generate answers the text as a JSON string


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "0", "temperature": 0}),
    ("/v0/language-models/generate", {"prompt": "0", "temp": 0}),
    ("/generate", {"prompt": "0", "params": {"temp": 0}}),
], ids=["openai", "v0", "llm-api"])
def test_a_request_without_a_length_stops_at_default_max_tokens(short_worker: ServerProcess, path: str,
                                                                body: dict) -> None:
    answer = requests.post(short_worker.url + path, json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert reply_text(path, answer) == "1234567"[:DEFAULT_MAX_TOKENS]


def test_a_request_that_sets_its_length_keeps_it(short_worker: ServerProcess) -> None:
    answer = requests.post(short_worker.url + "/generate", json={"prompt": "0", "params": {"temp": 0, "n_predict": 3}},
                           timeout=30)
    assert answer.json() == "123"
