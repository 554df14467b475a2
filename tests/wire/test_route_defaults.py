"""Every generating route's sampling defaults: what the README states is what reaches the engine.

A real worker with DEBUG=true logs the sampling of each generation; each route gets a request that
sets nothing but its text, and the logged values must be the README's row for that route. The
original route and /v0 must use gpt4all's own GPT4All.generate() defaults, read from the
installed bindings.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from gpt4all import GPT4All

from testing.servers import REPO, ServerProcess, running_worker
from testing.tiny_models import tiny_settings

SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n")
GPT4ALL_NAMES = {"temperature": "temp"}  # the engine's name -> generate()'s, where they differ
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
PROMPT = {"prompt": "Hi"}
MINIMAL_BODIES = {
    "/gpt4all_api": PROMPT,
    "/v1/chat/completions": CHAT,
    "/v1/completions": PROMPT,
    "/v0/language-models/chat-completions": CHAT,
    "/v0/language-models/generate": PROMPT,
    "/generate": PROMPT,
    "/agenerate": PROMPT,
    "/v1/responses": {"input": "Hi"},
    "/v1/messages": {**CHAT, "max_tokens": 16},  # required there: the README says so instead of a number
    "/api/chat": {"model": "tiny-chat", **CHAT, "stream": False},
    "/api/generate": {"model": "tiny-chat", **PROMPT, "stream": False},
}
NOT_GENERATING = re.compile(r"embed|retrieve|count_tokens|/api/show")


def readme_defaults() -> dict[str, dict[str, float]]:
    """The README's table of sampling defaults: route -> engine field -> value (its leading number;
    a value a route requires, which has no default, is left out)."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Sampling defaults", 1)[1]
    rows = next(block for block in section.split("\n\n") if block.startswith("|")).splitlines()
    header = [cell.strip(" `") for cell in rows[0].strip("|").split("|")]
    assert header[1:] == list(SAMPLING), header
    table: dict[str, dict[str, float]] = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == len(SAMPLING) + 1, row
        values = {name: float(cell.split()[0]) for name, cell in zip(SAMPLING, cells[1:], strict=True) if cell != "required"}
        for route in re.findall(r"`(?:POST )?(/[^`]*)`", cells[0]):
            table[route] = values
    return table


def gpt4all_generate_defaults() -> dict[str, float]:
    parameters = inspect.signature(GPT4All.generate).parameters
    return {name: parameters[GPT4ALL_NAMES.get(name, name)].default for name in SAMPLING}


@pytest.fixture(scope="module")
def debug_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("debug"), **tiny_settings(DEBUG="true")) as worker:
        yield worker


def sampling_reaching_the_engine(worker: ServerProcess, route: str, body: object = None) -> dict[str, float]:
    """Send one request and return the sampling the worker logged for its generation."""
    logged_before = worker.log_text().count("sampling:")
    response = requests.post(worker.url + route, json=body or MINIMAL_BODIES[route], timeout=60)
    assert response.status_code == 200, response.text
    lines = re.findall(r"sampling: (.*)", worker.log_text())
    assert len(lines) == logged_before + 1, f"{route}: expected one generation"
    return {name: float(value) for name, value in re.findall(r"(\w+)=([\d.]+)", lines[-1])}


def test_the_readme_states_each_routes_defaults_as_they_reach_the_engine(debug_worker: ServerProcess) -> None:
    stated = readme_defaults()
    for route in MINIMAL_BODIES:
        assert route in stated, f"the README's table of sampling defaults has no row for {route}"
        reached = sampling_reaching_the_engine(debug_worker, route)
        assert {name: reached[name] for name in stated[route]} == stated[route], route


def test_the_readme_table_lists_every_generating_route(debug_worker: ServerProcess) -> None:
    document = requests.get(debug_worker.url + "/openapi.json", timeout=10).json()
    generating = {path.rstrip("/") for path, operations in document["paths"].items()
                  if "post" in operations and not NOT_GENERATING.search(path)}
    assert generating == set(MINIMAL_BODIES) == set(readme_defaults())


def test_the_original_route_and_v0_default_to_gpt4all_s_own_generate_defaults() -> None:
    stated = readme_defaults()
    expected = {**gpt4all_generate_defaults(), "max_tokens": stated["/gpt4all_api"]["max_tokens"]}  # DEFAULT_MAX_TOKENS
    assert expected["repeat_penalty"] == 1.18 and expected["top_p"] == 0.4  # the bindings this was written against
    for route in ("/gpt4all_api", "/v0/language-models/chat-completions", "/v0/language-models/generate"):
        assert stated[route] == expected, route


def test_the_original_route_takes_the_repeat_penalty_a_client_sets(debug_worker: ServerProcess) -> None:
    body = {"prompt": "Hi", "temp": 0, "repeat_penalty": 1, "repeat_last_n": 0}
    sampling = sampling_reaching_the_engine(debug_worker, "/gpt4all_api", body)
    assert (sampling["repeat_penalty"], sampling["repeat_last_n"]) == (1, 0)
    refused = requests.post(debug_worker.url + "/gpt4all_api", json={"prompt": "Hi", "repeat_penalty": 0}, timeout=10)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "repeat_penalty"
