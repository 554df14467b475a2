"""A worker process: load the model, serve the Flask app with waitress.

Standalone (`python -m api`) it binds LISTEN_IP:LISTEN_PORT itself. Under the supervisor it
serves a listening socket it inherits (see supervisor/), which is why this module and not the
app decides when to accept connections.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

import waitress

from api.app import create_app
from api.config import ConfigError, Settings, check_model_files, load_settings
from api.runtime import Runtime

log = logging.getLogger("api.worker")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_MODEL_LOAD_FAILED = 11

WAITRESS_THREADS = 4


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(settings: Settings) -> int:
    runtime = Runtime(settings)
    app = create_app(settings, runtime)
    server = waitress.create_server(
        app, host=settings.listen_ip, port=settings.listen_port, threads=WAITRESS_THREADS,
        channel_request_lookahead=1, max_request_body_size=settings.max_request_bytes, ident="gpt4all-api",
    )
    loader = threading.Thread(target=_load, args=(runtime,), name="model-loader", daemon=True)
    loader.start()
    log.info("listening on http://%s:%d", settings.listen_ip, settings.listen_port)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return EXIT_OK


def _load(runtime: Runtime) -> None:
    try:
        runtime.load()
        log.info("model %s loaded; ready", runtime.settings.model_name)
    except Exception as error:
        log.error("model could not be loaded: %s", error)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
        check_model_files(settings)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings)
    return serve(settings)
