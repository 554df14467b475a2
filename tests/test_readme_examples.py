"""Every Python example in the README runs, unchanged but for the server's address, against a real
worker on the bundled models, with the official client it shows: so the README cannot rot.

The bundled model's replies are not fixed text; an example passes when it runs to the end and prints
something for each of its print() calls. What the replies contain is checked elsewhere, on the tiny
models with exact text.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from testing.servers import REPO, ServerProcess

README = REPO / "README.md"
README_ADDRESS = "http://127.0.0.1:5000"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_HEADING = re.compile(r"^#+ (.+)$", re.M)
DEAD_PROXY = "http://127.0.0.1:9"


def readme_examples() -> Iterator[tuple[str, str]]:
    """(the heading above it, the code) of each ```python block."""
    text = README.read_text(encoding="utf-8")
    for match in _BLOCK.finditer(text):
        headings = _HEADING.findall(text, 0, match.start())
        yield (headings[-1] if headings else "top"), match[1]


EXAMPLES = list(readme_examples())


def test_the_readme_has_an_example_for_each_official_client() -> None:
    code = "\n".join(example for _, example in EXAMPLES)
    for client in ("from openai import OpenAI", "client.responses.create", "import anthropic", "from ollama import Client",
                   "from langchain_ollama import"):
        assert client in code, client


@pytest.mark.bundled
@pytest.mark.parametrize("example", [code for _, code in EXAMPLES],
                         ids=[f"{index}-{re.sub(r'[^a-z]+', '-', heading.lower()).strip('-')}"
                              for index, (heading, _) in enumerate(EXAMPLES)])
def test_a_readme_example_runs_against_a_real_server(bundled_worker: ServerProcess, example: str) -> None:
    assert README_ADDRESS in example, "an example that names no server address cannot be pointed at the test's"
    code = example.replace(README_ADDRESS, bundled_worker.url)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), "NO_PROXY": "127.0.0.1,localhost",
           "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "ALL_PROXY": DEAD_PROXY}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=REPO, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(printed) >= code.count("\nprint(") + code.startswith("print("), run.stdout
