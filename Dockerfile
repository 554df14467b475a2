# The daemon as a container image: the supervisor (watchdog_main.py) is PID 1 and its workers run
# beside it, with the two bundled models prepared at build time by the same step ./start.sh runs.
#   docker build -t gpt4all-api .          (or: podman build -t gpt4all-api .)
#   docker run --rm -p 127.0.0.1:5000:5000 gpt4all-api
# Configuration is by environment (README "Configuration", .env.example): -e WORKERS=2 -e API_KEY=...
# Models of your own: mount a folder at /app/models (the MODEL_PATH volume) and set MODEL_NAME.
# The build needs PyPI (requirements*.txt). BASE_IMAGE may be any Debian-like image with
# Python 3.11+ and its venv module (see deploy/README.md for one built without a registry).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VENV_NAME=/app/.venv \
    MODEL_PATH=/app/models \
    LOG_FOLDER_NAME=/var/lib/gpt4all-api/logs \
    WATCHDOG_TEMPFILE=/var/lib/gpt4all-api/run \
    LISTEN_PORT=5000

RUN groupadd --system --gid 10001 gpt4all \
 && useradd --system --uid 10001 --gid gpt4all --home-dir /app --shell /usr/sbin/nologin gpt4all \
 && mkdir -p /app/models /var/lib/gpt4all-api \
 && chown gpt4all:gpt4all /app /app/models /var/lib/gpt4all-api

WORKDIR /app
USER 10001:10001

# pip's own configuration for the build steps only (ARGs do not stay in the image): an offline
# build points it at a mounted wheelhouse (deploy/podman-smoke.sh). Unset, pip uses PyPI.
ARG PIP_CONFIG_FILE

# Dependencies first (a layer that changes only with the requirement files), then the code.
COPY --chown=gpt4all:gpt4all requirements.txt requirements-models.txt ./
COPY --chown=gpt4all:gpt4all scripts/ scripts/
RUN bash -c 'SETUP_PROG=docker-build; . scripts/_common.sh && setup_runtime' \
 && rm -rf /app/.cache/pip
COPY --chown=gpt4all:gpt4all . .
RUN bash -c 'SETUP_PROG=docker-build; . scripts/_common.sh && setup_runtime && setup_models'

# Only inside the image is listening on every interface right: the container's network is its own,
# and publishing a port (-p) is the operator's choice. The default elsewhere stays 127.0.0.1.
ENV LISTEN_IP=0.0.0.0
EXPOSE 5000
VOLUME ["/app/models"]

# 200 only while a worker can take a request now (README "Health, readiness and overload").
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LISTEN_PORT', '5000'), timeout=4)"]

# SIGTERM: stop accepting, finish requests in flight within GRACEFUL_TIMEOUT, exit 0. Exec form,
# so the supervisor itself is PID 1 and gets the signal (no shell in between).
STOPSIGNAL SIGTERM
CMD ["/app/.venv/bin/python", "watchdog_main.py"]
