"""The test harness, shared by tests/ and bench/. Nothing here is imported by the daemon.

- `servers`: real workers and daemons on loopback ports, stopped with everything they started.
- `tiny_models`: the tiny GGUF models the tests build (exact, millisecond replies in gpt4all).
- `fake_engine`, `apps`: the app in-process, with no model or on an engine without gpt4all, for
  wire shapes and statuses; never where sampling, stop strings or cancellation are under test.
- `contract`: the OpenAPI contract cases and the check of an answer against the document.
- `raw_http`, `loopback`, `assertions`, `summary`: raw sockets, loopback model servers, shared checks.
"""
