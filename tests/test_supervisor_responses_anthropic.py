"""Under the real supervisor, the Responses and Anthropic Messages routes, and a batch of prompts on
/v1/completions, are served like every other route that touches the model: a fresh worker for each
request (RESTART_AFTER_REQUESTS=1), streamed or not, token counting included (it runs the model to
count); a batch is one request, all its prompts on one worker; embeddings too."""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import openai

from testing.servers import Service
from testing.tiny_models import TINY_CHAT_REPLY

HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0}


def assert_fresh_workers(service: Service, pids: list[str]) -> None:
    assert len(set(pids)) == len(pids), pids
    service.wait_for(lambda: service.log().count("exited after serving 1 request(s)") >= len(pids), 10,
                     f"{len(pids)} served exits")
    assert "crash" not in service.log()


def test_each_responses_request_meets_a_fresh_worker(start_service: Callable[..., Service]) -> None:
    service = start_service()
    responses = openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0).responses
    pids = []
    for _ in range(2):
        reply = responses.with_raw_response.create(model="tiny-chat", input="Hi", temperature=0)
        assert reply.parse().output_text == TINY_CHAT_REPLY
        streamed = responses.with_raw_response.create(model="tiny-chat", input="Hi", temperature=0, stream=True)
        events = streamed.parse()
        assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == TINY_CHAT_REPLY
        pids += [reply.headers["X-Worker-Pid"], streamed.headers["X-Worker-Pid"]]
    assert_fresh_workers(service, pids)


def test_each_anthropic_request_meets_a_fresh_worker(start_service: Callable[..., Service]) -> None:
    service = start_service()
    messages = anthropic.Anthropic(base_url=service.url, api_key="unused", max_retries=0).messages
    pids = []
    for _ in range(2):
        message = messages.with_raw_response.create(model="tiny-chat", max_tokens=50, messages=HI, extra_body=GREEDY)
        assert [block.text for block in message.parse().content if block.type == "text"] == [TINY_CHAT_REPLY]
        streamed = messages.with_raw_response.create(model="tiny-chat", max_tokens=50, messages=HI, stream=True,
                                                     extra_body=GREEDY)
        assert "".join(event.delta.text for event in streamed.parse()
                       if event.type == "content_block_delta" and event.delta.type == "text_delta") == TINY_CHAT_REPLY
        counted = messages.with_raw_response.count_tokens(model="tiny-chat", messages=HI)  # type: ignore[arg-type]
        assert counted.parse().input_tokens == 3 + len("user\nHi\nassistant\n")
        pids += [message.headers["X-Worker-Pid"], streamed.headers["X-Worker-Pid"], counted.headers["X-Worker-Pid"]]
    assert_fresh_workers(service, pids)


def test_each_completions_batch_and_embedding_request_meets_a_fresh_worker(start_service: Callable[..., Service]) -> None:
    """A batch's prompts all run on the one worker that took the request."""
    service = start_service()
    client = openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0)
    completions = client.completions
    pids = []
    for _ in range(2):
        batch = completions.with_raw_response.create(model="tiny-chat", prompt=["w", "0"], n=2, max_tokens=5,
                                                     temperature=0)
        assert [choice.text for choice in batch.parse().choices] == ["xyz", "xyz", "12345", "12345"]
        streamed = completions.with_raw_response.create(model="tiny-chat", prompt=["w", "0"], max_tokens=5,
                                                        temperature=0, stream=True)
        texts: dict[int, str] = {}
        for chunk in streamed.parse():
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
        assert texts == {0: "xyz", 1: "12345"}
        embedded = client.embeddings.with_raw_response.create(model="tiny-embed", input=["hello world", "goodbye"])
        assert [len(item.embedding) for item in embedded.parse().data] == [32, 32]
        pids += [batch.headers["X-Worker-Pid"], streamed.headers["X-Worker-Pid"], embedded.headers["X-Worker-Pid"]]
    assert_fresh_workers(service, pids)
