#!/usr/bin/env bash
# Install everything the tests need and run the whole suite, from any directory:
#   ./test.sh [pytest options]      e.g. ./test.sh -k health -x
# Same set-up as start.sh plus requirements-test.txt, and .venv-litellm from requirements-litellm.txt
# (each reinstalled only when changed), then
# pytest with the defaults from pyproject.toml. The exit code is pytest's.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")"
SETUP_PROG=test.sh
# shellcheck source=scripts/_common.sh
. scripts/_common.sh

setup_runtime
setup_requirements test requirements-test.txt
setup_side_venv litellm requirements-litellm.txt  # .venv-litellm: litellm's own pins (tests/wire/test_litellm_client.py)
setup_models
# tests/deploy/test_nginx_scale_out.py needs a real nginx; try Debian's quietly, never fail the run for it (it skips)
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Acquire::Retries=0 -o Acquire::http::Timeout=10 nginx \
        >/dev/null 2>&1 || setup_log "nginx not installed: its test will skip"
fi
exec "$PY" -m pytest "$@"
