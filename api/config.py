"""All configuration, in one place.

Settings come from `.env` (if present) and then the process environment, which wins. Every key is
declared once in `FIELDS` with its default, its parser and a one-line description; `.env.example`
documents the same keys (a test keeps the two in step). A bad value raises `ConfigError`, whose
message is the single line an entry point prints before exiting: it names the key, the value and
what was expected.

This module must stay cheap to import and free of gpt4all: the supervisor imports it too.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from api.protocol import EXIT_CONFIG

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_FILE_VARIABLE = "ENV_FILE"  # points at another .env file (tests point it at an empty one)


class ConfigError(ValueError):
    """A configuration value that cannot be used; str() is a one-line message for the user."""

    def __init__(self, key: str, value: str, expected: str) -> None:
        super().__init__(f"configuration error: {key}={value!r} is invalid: expected {expected}")
        self.key = key
        self.value = value
        self.expected = expected


# -- parsers: each takes the raw string and returns the typed value or raises ValueError(expected)


def _text(raw: str) -> str:
    return raw


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("true or false")


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        expected = f"a whole number >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(expected) from None
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(expected)
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("a number of seconds > 0") from None
    if not value > 0:
        raise ValueError("a number of seconds > 0")
    return value


def _optional_integer(minimum: int) -> Callable[[str], int | None]:
    """A whole number, or nothing (empty: no limit)."""
    whole = _integer(minimum)

    def parse(raw: str) -> int | None:
        if not raw.strip():
            return None
        try:
            return whole(raw)
        except ValueError:
            raise ValueError(f"empty (no limit) or a whole number >= {minimum}") from None

    return parse


def _ip_address(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ValueError("an IP address such as 127.0.0.1 or ::1") from None


# Paths of the other interfaces (api/wire/): ROUTE may not take them over.
RESERVED_PATHS = ("/health", "/check", "/generate", "/agenerate", "/embeddings", "/docs", "/openapi.json")
RESERVED_PREFIXES = ("/v0/", "/v1/", "/docs/")


def _route(raw: str) -> str:
    route = raw.strip()
    if not re.fullmatch(r"/[A-Za-z0-9_\-./]*", route) or "//" in route or route == "/":
        raise ValueError("a URL path such as /gpt4all_api")
    route = route.rstrip("/")
    if route in RESERVED_PATHS or route in ("/v0", "/v1") or route.startswith(RESERVED_PREFIXES):
        raise ValueError("a URL path such as /gpt4all_api that no other interface uses (not " + ", ".join(RESERVED_PATHS)
                         + ", /v0/..., /v1/...)")
    return route


def _model_file_name(raw: str) -> str:
    from api.model_names import ModelNameError, check_model_file_name

    try:
        return check_model_file_name(raw.strip())
    except ModelNameError as error:
        raise ValueError(str(error)) from None


_DEVICE_NAMES = {"cpu", "gpu", "kompute", "cuda", "amd", "nvidia", "metal"}


def _device(raw: str) -> str:
    device = raw.strip().lower()
    if device in _DEVICE_NAMES or re.fullmatch(r"(cuda|kompute):.+", device):
        return device
    raise ValueError("one of cpu, gpu, kompute, cuda, amd, nvidia, metal, cuda:<name>, kompute:<name>")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value
    return parse


_worker_start_method = _choice("auto", "forkserver", "spawn")


def _address_list(raw: str) -> tuple[str, ...]:
    """Comma- or space-separated IP addresses, networks (CIDR) or host names."""
    entries = tuple(entry for entry in re.split(r"[,\s]+", raw.strip()) if entry)
    for entry in entries:
        if not re.fullmatch(r"[A-Za-z0-9.:_/\-\[\]]+", entry):
            raise ValueError("a comma-separated list of IP addresses, networks or host names")
    return entries


@dataclass(frozen=True)
class Field:
    key: str
    default: str
    parse: Callable[[str], Any]
    help: str
    attribute: str = ""
    """The Settings attribute, when the key's own name (kept from the original server) says less."""

    @property
    def name(self) -> str:
        return self.attribute or self.key.lower()


FIELDS: tuple[Field, ...] = (
    # -- the original server's keys
    Field("MODEL_PATH", "models", _text, "Folder holding the model files (relative to the project folder)."),
    Field("MODEL_NAME", "SmolLM2-135M-Instruct.Q4_1.gguf", _model_file_name,
          "Chat model: a bare .gguf file name inside MODEL_PATH. The default is bundled (no download)."),
    Field("ROUTE", "/gpt4all_api", _route, "Path of the original POST {prompt, persona} route."),
    Field("LISTEN_IP", "127.0.0.1", _ip_address, "Address to listen on. 0.0.0.0 exposes the server to your network."),
    Field("LISTEN_PORT", "5000", _integer(1, 65535), "TCP port to listen on."),
    Field("AUTHORIZED_URLS", "", _address_list,
          "If set: only these client addresses, networks (CIDR) or host names may call the API (403 otherwise)."),
    Field("VENV_NAME", ".venv", _text, "Virtualenv folder that start.sh / start.bat create and use."),
    Field("DEBUG", "false", _boolean, "Verbose logging (never exposes stack traces to clients)."),
    Field("STREAM", "false", _boolean, "Default of `stream` for the original route when a request leaves it out."),
    Field("WATCHDOG_TEMPFILE", "run", _text, "Folder for the workers' sentinel files and the supervisor's pid file.",
          attribute="run_dir"),
    Field("LOG_FOLDER_NAME", "logs", _text, "Folder for the log files.", attribute="log_dir"),
    Field("HEADER", "", _text, "Text put before the prompt of the original route (empty: nothing)."),
    Field("FOOTER", "", _text, "Text put after the prompt of the original route (empty: nothing)."),
    # -- models and inference
    Field("EMBEDDING_MODEL_NAME", "all-MiniLM-L6-v2.f16.gguf", _model_file_name,
          "Embedding model for /v1/embeddings: a bare .gguf file name inside MODEL_PATH (bundled by default)."),
    Field("N_THREADS", "0", _integer(0, 512), "CPU threads per worker for inference (0: cores divided by WORKERS, one core left for "
          "loading replacements when RESTART_AFTER_REQUESTS is on)."),
    Field("N_CTX", "2048", _integer(64, 131072), "Context window in tokens (prompt + reply)."),
    Field("DEVICE", "cpu", _device, "Where inference runs: cpu, or a GPU backend such as kompute, cuda, cuda:<name>."),
    Field("DEFAULT_MAX_TOKENS", "512", _integer(1), "Reply length limit when a request does not set max_tokens."),
    # -- access and limits
    Field("API_KEY", "", _text, "If set: required on every route but /health, as `Authorization: Bearer` or `X-Api-Key`."),
    Field("MAX_REQUEST_BYTES", "1048576", _integer(1024), "Largest request body accepted (413 above it; chunked: framing counts)."),
    Field("REQUEST_TIMEOUT", "300", _seconds, "Longest a generation or embedding may run before it is stopped with a 504."),
    Field("STALL_TIMEOUT", "30", _seconds, "Longest a generation or embedding may go without progress (a token, a group of inputs) "
          "before it is stopped with a 504 and counts as hung."),
    # -- the supervisor
    Field("WORKERS", "1", _integer(1, 64), "Generations that can run at the same time, on this many worker processes "
          "(a warm spare that takes a client waits for a free one)."),
    Field("WARM_SPARES", "1", _integer(0, 64), "Loaded workers kept waiting so a restart never makes a client wait."),
    Field("MAX_QUEUE", "", _optional_integer(0),
          "Requests that may wait for an inference slot; the next gets a 503 with Retry-After at once (0: none may wait; "
          "empty: no limit, clients wait in the accept queue). A worker holds one waiting client: raise WARM_SPARES to let more wait."),
    Field("QUEUE_TIMEOUT", "60", _seconds, "Longest a request waits for an inference slot before it gets a 503."),
    Field("RESTART_AFTER_REQUESTS", "1", _integer(0),
          "Restart a worker after this many inference requests (1: a fresh model for every request; 0: never)."),
    Field("RESTART_JITTER", "0", _integer(0), "Up to this many extra requests, chosen at random, so workers do not all recycle at once."),
    Field("MAX_WORKER_MEMORY_MB", "0", _integer(0), "Recycle a worker whose own memory (USS) grows above this (0: no limit)."),
    Field("GRACEFUL_TIMEOUT", "30", _seconds, "On stop or reload: how long in-flight requests may take to finish."),
    Field("BOOT_TIMEOUT", "120", _seconds, "Longest a worker may take to load its model before it counts as hung."),
    Field("HEALTH_INTERVAL", "5", _seconds, "Seconds between health probes of each worker."),
    Field("WORKER_START_METHOD", "auto", _worker_start_method,
          "How workers start: forkserver (fork from a process that has the code loaded: ~10x less CPU per restart; "
          "Linux), spawn (a fresh `python -m api`), or auto (forkserver where available)."),
    Field("KILL_TIMEOUT", "5", _seconds, "How long a hung worker gets after TERM before its whole process tree is killed."),
    Field("RESTART_BACKOFF_MAX", "30", _seconds,
          "Longest wait between attempts to start a worker that keeps failing (the wait doubles from 0.5 s)."),
    Field("LOG_MAX_BYTES", "10485760", _integer(1024), "Rotate a log file when it reaches this size."),
    Field("LOG_BACKUPS", "5", _integer(0), "Rotated log files kept."),
    # -- model retrieval (off by default: nothing downloads unless a user asks for it)
    Field("ALLOW_DOWNLOAD", "false", _boolean, "Allow fetching models that are not in MODEL_PATH from MODEL_CATALOG_URL."),
    Field("MODEL_CATALOG_URL", "https://gpt4all.io/models/models3.json", _text,
          "Catalog to fetch models from when ALLOW_DOWNLOAD is true (GPT4All's models3.json format; a URL or a file path)."),
    Field("DOWNLOAD_TIMEOUT", "60", _seconds,
          "Longest wait for a model or catalog server to connect or send more data before the download fails."),
    # -- documentation
    Field("DOCS_PUBLIC", "false", _boolean,
          "Serve /docs and /openapi.json without the API key even when API_KEY is set (they need it by default)."),
    # -- operations
    Field("METRICS_PUBLIC", "false", _boolean,
          "Serve the Prometheus metrics (GET /metrics) without the API key even when API_KEY is set."),
    Field("LOG_FORMAT", "text", _choice("text", "json"),
          "Log lines as text, or as one JSON object per line (time, level, worker, pid, request id, route, ...)."),
)


@dataclass(frozen=True)
class Settings:
    """Typed, validated configuration. Build it with `load_settings()`; pass it in, never read globals."""

    model_path: Path
    model_name: str
    route: str
    listen_ip: str
    listen_port: int
    authorized_urls: tuple[str, ...]
    venv_name: str
    debug: bool
    stream: bool
    run_dir: Path
    log_dir: Path
    header: str
    footer: str
    embedding_model_name: str
    n_threads: int
    n_ctx: int
    device: str
    default_max_tokens: int
    api_key: str
    max_request_bytes: int
    request_timeout: float
    stall_timeout: float
    workers: int
    warm_spares: int
    max_queue: int | None
    queue_timeout: float
    restart_after_requests: int
    restart_jitter: int
    max_worker_memory_mb: int
    graceful_timeout: float
    boot_timeout: float
    health_interval: float
    worker_start_method: str
    kill_timeout: float
    restart_backoff_max: float
    log_max_bytes: int
    log_backups: int
    allow_download: bool
    model_catalog_url: str
    download_timeout: float
    docs_public: bool
    metrics_public: bool
    log_format: str

    @property
    def chat_model_file(self) -> Path:
        return self.model_path / self.model_name

    @property
    def embedding_model_file(self) -> Path:
        return self.model_path / self.embedding_model_name

    @property
    def threads_per_worker(self) -> int:
        if self.n_threads:
            return self.n_threads
        cores = os.cpu_count() or 1
        # With restarts, a replacement loads while a worker generates: leave it a core, or llama.cpp's
        # busy-waiting threads and the loader slow each other down (measured on 2 cores: 4x per request).
        reserved = 1 if self.restart_after_requests and cores > 1 else 0
        return max(1, (cores - reserved) // self.workers)

_PATH_KEYS = {"MODEL_PATH", "WATCHDOG_TEMPFILE", "LOG_FOLDER_NAME"}


def read_raw_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> dict[str, str]:
    """Merge the defaults, `.env` and the environment (which wins), for the declared keys only."""
    environ = os.environ if environ is None else environ
    if env_file is None:
        env_file = Path(environ.get(ENV_FILE_VARIABLE) or PROJECT_ROOT / ".env")
    from_file = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file.is_file() else {}
    raw = {f.key: f.default for f in FIELDS}
    for source in (from_file, environ):
        raw.update({f.key: source[f.key] for f in FIELDS if f.key in source})
    return raw


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = None,
    root: Path = PROJECT_ROOT,
) -> Settings:
    """Read, parse and check every key. Relative folders are taken relative to `root`."""
    raw = read_raw_settings(environ, env_file)
    values: dict[str, Any] = {}
    for field in FIELDS:
        try:
            value = field.parse(raw[field.key])
        except ValueError as error:
            raise ConfigError(field.key, raw[field.key], str(error)) from None
        if field.key in _PATH_KEYS:
            if not value.strip():
                raise ConfigError(field.key, value, "a folder path")
            value = (root / value.strip()).resolve()
        values[field.name] = value
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    if settings.model_name == settings.embedding_model_name:
        raise ConfigError("EMBEDDING_MODEL_NAME", settings.embedding_model_name, "a different file than MODEL_NAME")
    if settings.stall_timeout > settings.request_timeout:
        raise ConfigError("STALL_TIMEOUT", str(settings.stall_timeout), f"at most REQUEST_TIMEOUT ({settings.request_timeout})")


def check_model_files(settings: Settings) -> None:
    """Refuse to start without the chat model file: a clear line now beats a crash loop later."""
    if not settings.chat_model_file.is_file():
        raise ConfigError(
            "MODEL_NAME", settings.model_name,
            f"a model file in MODEL_PATH ({settings.model_path}); no such file. "
            "Put the .gguf file there, or leave MODEL_NAME unset for the bundled model",
        )


def settings_to_start() -> Settings:
    """The settings of a process started from the command line, with the chat model file checked.

    On a configuration error the process prints it as one line and exits with EXIT_CONFIG: the
    supervisor and a standalone worker refuse a bad start the same way."""
    try:
        settings = load_settings()
        check_model_files(settings)
    except ConfigError as error:
        print(error, file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    return settings


def render_env_example() -> str:
    """The text of `.env.example`: every key with its help line and default (a test keeps it in step)."""
    lines = [
        "# Configuration of the GPT4All API daemon. Copy to .env and change what you need;",
        "# environment variables override this file. Every key is shown with its default.",
        "",
    ]
    for field in FIELDS:
        lines += [f"# {field.help}", f"{field.key}={field.default}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_env_example(), end="")
