#!/usr/bin/env bash
# End-to-end deployment test (issue 15). Needs root and a few minutes; not part of the quick test.
#   deploy/test.sh [--rebuild-base]
# Installs and starts Docker if absent, builds a Debian base with debootstrap (kept as
# muralist-base:bookworm between runs; --rebuild-base makes it again), builds the CPU and
# PostgreSQL images, brings up compose (API + PostgreSQL + Ray head + one CPU worker) on loopback,
# generates through /sdapi/v1 and /api/v1, restarts the API mid-job, stops and restarts
# everything, checks that no job or image was lost, and removes its containers and volumes.
# Prints one summary line; exits non-zero on any failure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${MURALIST_DEPLOY_WORK:-/var/lib/muralist-deploy}
PORT=${MURALIST_DEPLOY_PORT:-17860}
BASE_IMAGE=muralist-base:bookworm
APP_IMAGE=muralist:cpu
PG_IMAGE=muralist-postgres:15
PROJECT=muralist-e2e
REBUILD_BASE=0
for arg in "$@"; do
    case "$arg" in
    --rebuild-base) REBUILD_BASE=1 ;;
    *) echo "usage: deploy/test.sh [--rebuild-base]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "deploy/test.sh: run as root (it installs and starts Docker)" >&2; exit 2; }
mkdir -p "$WORK"
T0=$(date +%s)
STEP=start
NUMBERS=""
PIDS_TO_STOP=()

log() { echo "[$(($(date +%s) - T0))s] $*" >&2; }
fail() {
    echo "deploy test: FAILED at '$STEP': $*" >&2
    exit 1
}
step() { STEP=$1; log "$1"; }
note() { NUMBERS="$NUMBERS $1"; log "measured: $1"; }

# Debian's docker CLI has BuildKit built in (a newer CLI without the buildx plugin cannot build
# with secrets), so prefer it.
DOCKER=/usr/bin/docker
compose() {
    docker-compose -p "$PROJECT" -f "$ROOT/deploy/compose.yaml" --env-file "$WORK/e2e.env" "$@"
}

cleanup() {
    rc=$?
    set +e
    if [ -f "$WORK/e2e.env" ] && command -v docker-compose >/dev/null; then
        compose --profile cpu down -v --remove-orphans >/dev/null 2>&1
    fi
    for pid in "${PIDS_TO_STOP[@]}"; do kill "$pid" 2>/dev/null; done
    rm -rf "$WORK/pipsrv" "$WORK/pip.conf"
    if [ "$rc" = 0 ]; then
        echo "deploy test: OK in $(($(date +%s) - T0))s;$NUMBERS"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap "exit 143" TERM
trap "exit 130" INT

# ---------------------------------------------------------------- Docker
step "docker"
if [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/bin/docker ] || ! command -v docker-compose >/dev/null \
        || ! command -v debootstrap >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap >/dev/null
fi
if ! $DOCKER info >/dev/null 2>&1; then
    # No iptables and no default bridge: works inside containers and sandboxes too; compose's own
    # network still connects the services, and published ports go through docker-proxy.
    nohup /usr/sbin/dockerd --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 1; done
    $DOCKER info >/dev/null 2>&1 || fail "dockerd did not start (see $WORK/dockerd.log)"
fi

# ---------------------------------------------------------------- base image (no registry pulls)
step "base image"
if [ "$REBUILD_BASE" = 1 ] || ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || fail "debootstrap failed (see $WORK/debootstrap.log)"
    tar -C "$WORK/rootfs" -c . | $DOCKER import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

# ---------------------------------------------------------------- images
# pip inside the build: the host's CA bundle (a TLS-intercepting proxy) and its local wheel
# folders, served on loopback, both as BuildKit secrets so that neither lands in a layer.
step "images"
CA=$(python3 -m pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)
mkdir -p "$WORK/pipsrv"
: >"$WORK/pip.conf"
links=() indexes=() i=0
for src in $(python3 -m pip config get global.find-links 2>/dev/null) $(python3 -m pip config get global.extra-index-url 2>/dev/null); do
    dir=${src#file://}
    [ -d "$dir" ] || continue
    if [ "$src" = "$dir" ]; then
        ln -sfn "$dir" "$WORK/pipsrv/d$i" && links+=("d$i")
    else  # an index's pages link to ../../files/: serve its parent folder
        ln -sfn "$(dirname "$dir")" "$WORK/pipsrv/d$i" && indexes+=("d$i/$(basename "$dir")")
    fi
    i=$((i + 1))
done
if [ "$i" -gt 0 ]; then
    PIPPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    (cd "$WORK/pipsrv" && exec python3 -m http.server "$PIPPORT" --bind 127.0.0.1 >/dev/null 2>&1) &
    PIDS_TO_STOP+=($!)
    {
        echo "[global]"
        echo "trusted-host = 127.0.0.1"
        [ ${#links[@]} -gt 0 ] && echo "find-links = $(printf "http://127.0.0.1:$PIPPORT/%s/ " "${links[@]}")"
        [ ${#indexes[@]} -gt 0 ] && echo "extra-index-url = $(printf "http://127.0.0.1:$PIPPORT/%s/ " "${indexes[@]}")"
    } >"$WORK/pip.conf"
    sleep 1
fi
build() {  # build IMAGE DOCKERFILE
    DOCKER_BUILDKIT=1 $DOCKER build --network host --build-arg BASE="$BASE_IMAGE" \
        --secret id=pipca,src="$CA" --secret id=pipconf,src="$WORK/pip.conf" \
        -t "$1" -f "$ROOT/$2" "$ROOT" >"$WORK/build-${1//[:\/]/_}.log" 2>&1 \
        || fail "building $1 failed (see $WORK/build-${1//[:\/]/_}.log)"
}
t=$(date +%s); build "$APP_IMAGE" deploy/Dockerfile; note "app_build=$(($(date +%s) - t))s"
build "$PG_IMAGE" deploy/postgres/Dockerfile
size() { $DOCKER image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2fGB", $1 / 1e9}'; }
note "cpu_image=$(size "$APP_IMAGE")"
note "postgres_image=$(size "$PG_IMAGE")"

# ---------------------------------------------------------------- compose up
step "compose up"
cat >"$WORK/e2e.env" <<EOF
MURALIST_IMAGE=$APP_IMAGE
POSTGRES_IMAGE=$PG_IMAGE
POSTGRES_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
RAY_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
MURALIST_BIND=127.0.0.1
MURALIST_HOST_PORT=$PORT
MURALIST_DEMO_MODELS=1
EOF
compose --profile cpu down -v --remove-orphans >/dev/null 2>&1 || true  # leftovers of an aborted run
API=http://127.0.0.1:$PORT
api_container() { compose ps -q muralist; }
wait_healthy() {  # seconds it took
    local t0 s
    t0=$(date +%s)
    for _ in $(seq 300); do
        s=$($DOCKER inspect -f '{{.State.Health.Status}}' "$(api_container)" 2>/dev/null || echo none)
        [ "$s" = healthy ] && { echo $(($(date +%s) - t0)); return 0; }
        sleep 1
    done
    compose logs --tail 40 muralist worker-cpu ray-head >&2
    fail "the API did not become healthy in 300 s (last state: $s)"
}
t_up=$(date +%s)
compose --profile cpu up -d --no-build >"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log" >&2; fail "compose up failed"; }
note "up_to_healthy=$(wait_healthy)s"

# ---------------------------------------------------------------- first admin, a user
step "first admin key"
# The line muralist serve prints once at first start (cli._show_first_key).
FIRST_KEY_LINE='its API key (shown once):'
ADMIN_KEY=$(compose logs --no-color muralist 2>/dev/null | grep -F "$FIRST_KEY_LINE" \
    | grep -oE 'mur_[A-Za-z0-9_-]{24,}' | tail -1 || true)
[ -n "$ADMIN_KEY" ] || fail "no admin key printed in the API's log at first start"
curl -fsS -o /dev/null -H "Authorization: Bearer $ADMIN_KEY" "$API/api/v1/admin/users" || fail "the printed admin key is refused"
code=$(curl -s -o /dev/null -w '%{http_code}' "$API/api/v1/jobs")
[ "$code" = 401 ] || fail "an anonymous request got $code, expected 401"

step "create user"
USER_KEY=$(curl -fsS -H "Authorization: Bearer $ADMIN_KEY" -H 'Content-Type: application/json' \
    -d '{"name": "alice", "admin": false}' "$API/api/v1/admin/users" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])') || fail "cannot create a user"
H=(-H "Authorization: Bearer $USER_KEY" -H 'Content-Type: application/json')

# ---------------------------------------------------------------- generate
jq_() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
step "txt2img via /sdapi/v1"
n=$(curl -fsS "${H[@]}" -d '{"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64, "seed": 1}' \
    "$API/sdapi/v1/txt2img" | jq_ 'len(d["images"])') || fail "/sdapi/v1/txt2img failed"
[ "$n" = 1 ] || fail "/sdapi/v1/txt2img returned $n images"
note "compose_up_to_first_image=$(($(date +%s) - t_up))s"

submit() {  # submit STEPS N_ITER -> job id
    curl -fsS "${H[@]}" -d "{\"type\": \"txt2img\", \"params\": {\"prompt\": \"a harbour\", \"steps\": $1, \"n_iter\": $2, \"width\": 64, \"height\": 64, \"seed\": 7}}" \
        "$API/api/v1/jobs" | jq_ 'd["id"]'
}
job_field() { curl -fsS "${H[@]}" "$API/api/v1/jobs/$1" | jq_ "d$2"; }
wait_job() {  # wait_job ID -> succeeds when the job finished with images
    local s
    for _ in $(seq 600); do
        s=$(job_field "$1" '["status"]' 2>/dev/null || echo unreachable)
        case "$s" in
        succeeded | done | finished) return 0 ;;
        failed | canceled | cancelled) fail "job $1 ended $s: $(job_field "$1" '.get("error")' 2>/dev/null)" ;;
        esac
        sleep 1
    done
    fail "job $1 did not finish in 600 s (status $s)"
}
step "txt2img via /api/v1"
J1=$(submit 4 1) || fail "POST /api/v1/jobs failed"
wait_job "$J1"

# ---------------------------------------------------------------- API restart mid-job
step "API restart mid-job"
J2=$(submit 150 16) || fail "POST /api/v1/jobs failed"
for _ in $(seq 120); do [ "$(job_field "$J2" '["status"]')" = running ] && break; sleep 0.5; done
[ "$(job_field "$J2" '["status"]')" = running ] || fail "job $J2 never started"
compose restart muralist >/dev/null 2>&1 || fail "compose restart failed"  # honours stop_grace_period
wait_healthy >/dev/null
wait_job "$J2"
note "restarted_job_attempts=$(job_field "$J2" '["attempts"]')"

# ---------------------------------------------------------------- stop everything, up again
step "stop all with a job in flight"
J3=$(submit 150 16) || fail "POST /api/v1/jobs failed"
for _ in $(seq 120); do [ "$(job_field "$J3" '["status"]')" = running ] && break; sleep 0.5; done
before=$(curl -fsS "${H[@]}" "$API/api/v1/images" | jq_ 'sorted(i["id"] for i in d["images"])')
compose --profile cpu stop >/dev/null 2>&1 || fail "compose stop failed"
compose --profile cpu up -d --no-build >/dev/null 2>&1 || fail "compose up (second) failed"
wait_healthy >/dev/null
step "nothing lost"
for j in "$J1" "$J2"; do
    [ "$(job_field "$j" '["status"]')" = succeeded ] || fail "job $j is no longer succeeded after the restart"
done
after=$(curl -fsS "${H[@]}" "$API/api/v1/images" | jq_ 'sorted(i["id"] for i in d["images"])')
python3 - "$before" "$after" <<'EOF' || fail "images were lost across docker stop / up"
import ast, sys
before, after = (set(ast.literal_eval(a)) for a in sys.argv[1:3])
sys.exit(0 if before <= after else 1)
EOF
for img in $(echo "$after" | python3 -c 'import ast, sys; print(" ".join(ast.literal_eval(sys.stdin.read())))'); do
    curl -fsS -o /dev/null "${H[@]}" "$API/api/v1/images/$img" || fail "image $img is listed but cannot be read"
done
wait_job "$J3"
n=$(compose logs --no-color muralist | grep -cF "$FIRST_KEY_LINE" || true)
[ "$n" -le 1 ] || fail "the admin key was printed $n times (only the first start may print it)"

step "cleanup"
