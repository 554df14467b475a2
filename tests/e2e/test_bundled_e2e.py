"""End to end on the two real bundled models, through a real worker and the official client."""

from __future__ import annotations

from pathlib import Path

import anthropic
import openai
import pytest
import requests

from install.bundled_models import CHAT_MODEL_NAME, EMBEDDING_MODEL_NAME
from testing.assertions import QUESTION, cosine
from testing.servers import ServerProcess

pytestmark = pytest.mark.bundled


@pytest.fixture
def client(bundled_worker: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=bundled_worker.url + "/v1", api_key="unused", max_retries=0)


def test_defaults_are_the_bundled_models(bundled_worker: ServerProcess) -> None:
    health = requests.get(bundled_worker.url + "/health", timeout=10).json()
    assert health == {"status": "ready", "model": CHAT_MODEL_NAME}
    ids = {model["id"] for model in requests.get(bundled_worker.url + "/v1/models", timeout=10).json()["data"]}
    assert ids == {Path(CHAT_MODEL_NAME).stem, Path(EMBEDDING_MODEL_NAME).stem}


def test_original_route_knows_the_capital_of_france(bundled_worker: ServerProcess) -> None:
    response = requests.post(bundled_worker.url + "/gpt4all_api", timeout=60, json={
        "prompt": QUESTION, "persona": "You are a helpful assistant.", "temp": 0})
    assert response.status_code == 200
    assert "Paris" in response.text


def test_original_route_greedy_reply_does_not_loop(bundled_worker: ServerProcess) -> None:
    """gpt4all's repeat penalty (1.18 over 64 tokens) is the default: without it this greedy reply
    repeats "Abe a sea of dreams," line after line."""
    response = requests.post(bundled_worker.url + "/gpt4all_api", timeout=60, json={
        "prompt": "Write a poem about the sea.", "temp": 0, "max_tokens": 100})
    assert response.status_code == 200
    lines = [line.strip() for line in response.text.splitlines() if line.strip()]
    assert len(lines) >= 4, response.text
    assert max(lines.count(line) for line in lines) < 3, response.text


def test_openai_client_chat_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=Path(CHAT_MODEL_NAME).stem, temperature=0, max_tokens=40,
        messages=[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": QUESTION}])
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and 10 < completion.usage.prompt_tokens < 60


def test_openai_client_stream_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=Path(CHAT_MODEL_NAME).stem, temperature=0, max_tokens=40, stream=True,
        messages=[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": QUESTION}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Paris" in text


def test_openai_responses_know_the_capital_of_france(client: openai.OpenAI) -> None:
    response = client.responses.create(model=Path(CHAT_MODEL_NAME).stem, temperature=0, max_output_tokens=40,
                                       instructions="You are a helpful assistant.", input=QUESTION)
    assert "Paris" in response.output_text and response.status == "completed"
    stream = client.responses.create(model=Path(CHAT_MODEL_NAME).stem, temperature=0, max_output_tokens=40, stream=True,
                                     instructions="You are a helpful assistant.", input=QUESTION)
    assert "Paris" in "".join(event.delta for event in stream if event.type == "response.output_text.delta")


def test_anthropic_messages_know_the_capital_of_france(bundled_worker: ServerProcess) -> None:
    client = anthropic.Anthropic(base_url=bundled_worker.url, api_key="unused", max_retries=0)
    arguments = {"model": Path(CHAT_MODEL_NAME).stem, "max_tokens": 40, "system": "You are a helpful assistant.",
                 "messages": [{"role": "user", "content": QUESTION}], "extra_body": {"temperature": 0}}
    message = client.messages.create(**arguments)  # type: ignore[call-overload]
    assert message.content[0].type == "text" and "Paris" in message.content[0].text
    assert message.stop_reason == "end_turn"
    with client.messages.stream(**arguments) as stream:  # type: ignore[arg-type]
        assert "Paris" in "".join(stream.text_stream)
    counted = client.messages.count_tokens(model=arguments["model"], system=arguments["system"],  # type: ignore[arg-type]
                                           messages=arguments["messages"])  # type: ignore[arg-type]
    assert counted.input_tokens == message.usage.input_tokens


def test_paraphrases_are_closer_than_unrelated_texts(client: openai.OpenAI) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on the mat.", "Stock markets fell sharply today."]
    result = client.embeddings.create(model=Path(EMBEDDING_MODEL_NAME).stem, input=texts)
    cat, paraphrase, stocks = (item.embedding for item in result.data)
    assert len(cat) == 384
    assert cosine(cat, paraphrase) > cosine(cat, stocks) + 0.3
