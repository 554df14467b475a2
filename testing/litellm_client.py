"""A litellm client of the Ollama routes, run with .venv-litellm's python (litellm's pins conflict
with nothing here, but its 60 packages stay out of the main venv): tests/test_litellm_client.py.

    .venv-litellm/bin/python testing/litellm_client.py BASE_URL MODEL

Prints one JSON object: the reply and the streamed reply of `ollama_chat/MODEL` with greedy sampling,
litellm's usage, and every network address the process tried to reach that is not loopback (an
audit hook sees each socket connect and name lookup, and blocks it), which must be none. Standard library and
litellm only: this file is not imported by the project.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
reached: list[str] = []


def _is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return True  # a Unix socket path or similar: not the network
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def audit(event: str, args: tuple) -> None:
    """Record and block (the hook runs before the call) a connect or lookup beyond loopback."""
    attempt = None
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            attempt = f"connect {address[0]}:{address[1]}"
    elif event == "socket.getaddrinfo" and not _is_loopback(args[0]):
        attempt = f"lookup {args[0]}"
    if attempt is not None:
        reached.append(attempt)
        raise PermissionError(f"no network beyond loopback in the tests ({attempt})")


def main(base_url: str, model: str) -> None:
    sys.addaudithook(audit)
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # else importing litellm fetches the cost map
    import litellm

    litellm.telemetry = False
    messages = [{"role": "user", "content": "Hello"}]
    common = {"model": f"ollama_chat/{model}", "api_base": base_url, "messages": messages, "temperature": 0}
    reply = litellm.completion(**common)
    pieces = [chunk.choices[0].delta.content or "" for chunk in litellm.completion(**common, stream=True)]
    short = litellm.completion(**common, max_tokens=3)
    print(json.dumps({
        "text": reply.choices[0].message.content, "finish_reason": reply.choices[0].finish_reason,
        "usage": {"prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": reply.usage.completion_tokens},
        "streamed": pieces, "short": short.choices[0].message.content, "short_finish_reason": short.choices[0].finish_reason,
        "non_loopback": reached, "litellm": litellm.__version__ if hasattr(litellm, "__version__") else None,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
