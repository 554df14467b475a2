"""The inference API: a worker process that serves one gpt4all model over HTTP.

Run one with `python -m api`. Importing this package is cheap and never imports gpt4all: only
`api.engine` does, so the supervisor can share `api.config` and `api.protocol` safely.
"""
