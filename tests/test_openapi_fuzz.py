"""A schema-driven fuzzer against a real worker: schemathesis reads the worker's /openapi.json and
sends what it generates from it to every route, valid bodies and invalid ones, with every check it
has. The document must say what the validators enforce (schema-valid requests accepted,
schema-invalid ones refused with a 4xx), and nothing may end in a 5xx, a broken stream or a
traceback in the worker's log.

Bounded and repeatable: deterministic generation, a few examples per operation, reply lengths
capped (tests/schemathesis_hooks.py), so a run takes well under a minute. The fuzzer talks only to
the worker on loopback; any other address would go to a dead proxy on loopback and fail at once.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.servers import PYTHON, REPO, ServerProcess, running_worker
from testing.tiny_models import tiny_settings

KEY = "fuzz-key"  # with API_KEY set, the access checks (ignored_auth, missing credentials) have work to do
EXAMPLES_PER_OPERATION = 10
REPLY_TOKENS_CAP = 16  # the longest reply a generated request gets (tests/schemathesis_hooks.py caps longer ones)
TINY_EMBEDDING_DIMENSIONS = 32  # testing/tiny_models.py: the tiny BERT's width
TINY_CONTEXT_WINDOW = 512  # testing/tiny_models.py: the tiny llama's trained context, below N_CTX
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once

# Every check schemathesis has, but one replaced by a narrower copy of itself: positive_data_acceptance
# also fails the 400s that no schema can state for a well-formed request: a prompt with more tokens
# than the model's context window (OpenAI's `context_length_exceeded`, and the same error in Ollama's
# and Anthropic's shapes), and a Messages API conversation that ends with an assistant message (JSON
# Schema cannot constrain an array's last item), and an Ollama route given a model of the other kind.
# positive_data_acceptance_of_what_a_schema_can_state (tests/schemathesis_hooks.py) is the same check
# without those three exceptions.
EXCLUDED_CHECKS = ("positive_data_acceptance",)


@pytest.fixture(scope="module")
def fuzz_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("fuzz"), **tiny_settings(
        API_KEY=KEY, DEFAULT_MAX_TOKENS=REPLY_TOKENS_CAP, ALLOW_DOWNLOAD="false",
        MODEL_CATALOG_URL=DEAD_PROXY + "/models.json")) as worker:
        yield worker


def schemathesis_command(url: str) -> list[str]:
    return [
        PYTHON, "-m", "schemathesis.cli", "run", url + "/openapi.json",
        "--checks", "all", "--exclude-checks", ",".join(EXCLUDED_CHECKS),
        "--max-examples", str(EXAMPLES_PER_OPERATION), "--generation-deterministic",
        "--workers", "1", "--request-timeout", "60",
        "--header", f"Authorization: Bearer {KEY}",
        "--no-color", "--output-sanitize", "false",
    ]


def loopback_only_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env.update({"HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "ALL_PROXY": DEAD_PROXY,
                "NO_PROXY": "127.0.0.1,localhost", **extra})
    return env


@pytest.mark.slow
def test_schemathesis_finds_no_mismatch_and_no_server_error(fuzz_worker: ServerProcess, tmp_path: Path) -> None:
    env = loopback_only_env(SCHEMATHESIS_HOOKS=str(REPO / "tests" / "schemathesis_hooks.py"),
                            FUZZ_REPLY_TOKENS_CAP=str(REPLY_TOKENS_CAP),
                            FUZZ_EMBEDDING_DIMENSIONS=str(TINY_EMBEDDING_DIMENSIONS),
                            FUZZ_CONTEXT_WINDOW=str(TINY_CONTEXT_WINDOW),
                            FUZZ_CHAT_MODEL="tiny-chat", FUZZ_EMBEDDING_MODEL="tiny-embed")
    run = subprocess.run(schemathesis_command(fuzz_worker.url), cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=600)
    report = run.stdout + run.stderr
    print(report[-3000:])  # the summary: phases, operations, test cases
    assert run.returncode == 0, report[-20000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    tested = re.search(r"Tested: (\d+)", report)
    assert selected and tested and selected[1] == selected[2] == tested[1], "not every operation was tested"
    assert "Traceback" not in fuzz_worker.log_text(), fuzz_worker.log_text()[-5000:]
