"""The inference API: a worker process that serves one gpt4all model over HTTP.

Run one with `python -m api`. Importing this package is cheap and never imports gpt4all: only
`api.engine` does, so the supervisor can share `api.config`, `api.protocol`, `api.access` and
`api.accept_gate` safely. Layers, from the bottom: the engine (`engine`, behind the contract of
`inference` and `sampling`), the generation service (`generation`), the wire formats (`wire/`), the
app (`app`, `openapi`), and the worker process around them (`worker/`); `runtime` holds a worker's
models and service and opens the models through an engine loader.
"""
