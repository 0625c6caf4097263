#!/usr/bin/env bash
# The multi-box recipe simulated on one machine (root, Docker; after deploy/test.sh has built the
# images muralist:cpu and muralist-postgres:15):
#   API box  = deploy/compose.api-box.yaml as written (PostgreSQL, Ray head and API; host network)
#   GPU box  = the worker that deploy/compose.gpu-box.yaml runs (same image, command, variables and
#              read-only models folder), in a network namespace of its own so that it has another
#              IP, as a second machine would; no GPU here, so --devices cpu and no GPU reservation.
# Checks that the worker joins through the head's address, /healthz turns ready, a txt2img runs on
# that worker, then removes everything. Prints one summary line; exits non-zero on any failure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${MURALIST_DEPLOY_WORK:-/var/lib/muralist-deploy}/multibox
PORT=${MURALIST_MULTIBOX_PORT:-17861}
DOCKER=/usr/bin/docker
T0=$(date +%s)
[ "$(id -u)" = 0 ] || { echo "deploy/multibox.sh: run as root" >&2; exit 2; }
for image in muralist:cpu muralist-postgres:15; do
    $DOCKER image inspect "$image" >/dev/null 2>&1 || { echo "deploy/multibox.sh: no image $image; run deploy/test.sh first" >&2; exit 2; }
done
fail() {
    api_box logs --no-color --tail 25 muralist ray-head >&2 || true
    echo "multibox test: FAILED: $*" >&2
    exit 1
}
log() { echo "[$(($(date +%s) - T0))s] $*" >&2; }

mkdir -p "$WORK"
NODE_IP=$(hostname -I | cut -d' ' -f1)
export COMPOSE_PROJECT_NAME=muralist-multibox MURALIST_IMAGE=muralist:cpu POSTGRES_IMAGE=muralist-postgres:15 \
    POSTGRES_PASSWORD=$(openssl rand -hex 16) RAY_AUTH_TOKEN=$(openssl rand -hex 24) \
    MURALIST_NODE_IP=$NODE_IP MURALIST_MODELS=$WORK/models MURALIST_HOST_PORT=$PORT POSTGRES_HOST_PORT=55433
api_box() { docker-compose -f "$ROOT/deploy/compose.api-box.yaml" "$@"; }
cleanup() {
    rc=$?
    set +e
    $DOCKER rm -f muralist-gpu-box >/dev/null 2>&1
    $DOCKER network rm muralist-gpu-box >/dev/null 2>&1
    api_box down -v --remove-orphans >/dev/null 2>&1
    rm -rf "$WORK/models"
    [ "$rc" = 0 ] && echo "multibox test: OK in $(($(date +%s) - T0))s; worker on $WORKER_IP joined $NODE_IP:6380; $SUMMARY"
    exit "$rc"
}
WORKER_IP="?"
SUMMARY=""
trap cleanup EXIT

log "the models folder both boxes mount read-only"
rm -rf "$WORK/models"
$DOCKER run --rm --user 0 -v "$WORK:/out" muralist:cpu \
    sh -c 'muralist models make-tiny --data-dir /tmp/d >/dev/null && cp -r /tmp/d/models /out/ && chmod -R a+rX /out/models'

log "API box up"
api_box up -d
API=http://127.0.0.1:$PORT
for _ in $(seq 1 90); do
    code=$(curl -s -o "$WORK/health.json" -w '%{http_code}' "$API/healthz" || true)
    [ "$code" = 503 ] || [ "$code" = 200 ] && break
    sleep 2
done
[ "$code" = 503 ] || fail "before any worker, /healthz answered $code (expected 503)"
grep -q "no worker" "$WORK/health.json" || fail "/healthz does not say why it is not ready: $(cat "$WORK/health.json")"

log "GPU box: the worker joins $NODE_IP:6380"
$DOCKER network create muralist-gpu-box >/dev/null
$DOCKER run -d --name muralist-gpu-box --network muralist-gpu-box --shm-size 1g \
    -e MURALIST_CLUSTER="$NODE_IP:6380" -e RAY_AUTH_TOKEN="$RAY_AUTH_TOKEN" \
    -v "$WORK/models:/data/models:ro" muralist:cpu worker --devices cpu >/dev/null
WORKER_IP=$($DOCKER inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' muralist-gpu-box)
for _ in $(seq 1 120); do
    code=$(curl -s -o "$WORK/health.json" -w '%{http_code}' "$API/healthz" || true)
    [ "$code" = 200 ] && break
    sleep 2
done
[ "$code" = 200 ] || fail "/healthz stayed $code after the worker started: $(cat "$WORK/health.json"); worker: $($DOCKER logs muralist-gpu-box 2>&1 | tail -3)"
SUMMARY="ready_after_join=$(($(date +%s) - T0))s"
# The image's HEALTHCHECK command in each role: the API's asks /healthz, a worker's (no HTTP
# server) must pass while it runs, or Docker marks every GPU box "unhealthy".
$DOCKER exec muralist-gpu-box muralist-entrypoint healthcheck || fail "the worker container's health check fails"
$DOCKER exec "$(api_box ps -q muralist)" muralist-entrypoint healthcheck || fail "the API container's health check fails"
$DOCKER exec "$(api_box ps -q ray-head)" muralist-entrypoint healthcheck || fail "the Ray head container's health check fails"

KEY=$(api_box logs --no-color muralist | grep -F 'its API key (shown once):' | grep -oE 'mur_[A-Za-z0-9_-]{24,}' | tail -1)
[ -n "$KEY" ] || fail "no first admin key in the API's log"
log "txt2img on the GPU box's worker"
curl -fsS -m 600 -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"prompt": "two boxes", "steps": 3, "width": 64, "height": 64, "seed": 5}' \
    "$API/sdapi/v1/txt2img" -o "$WORK/t2i.json" || fail "txt2img failed"
python3 - "$WORK/t2i.json" <<'PY' || fail "txt2img answer: $(head -c 300 "$WORK/t2i.json")"
import base64, json, sys
d = json.load(open(sys.argv[1]))
assert base64.b64decode(d["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"
assert "Seed: 5" in json.loads(d["info"])["infotexts"][0]
PY
curl -fsS -H "Authorization: Bearer $KEY" "$API/api/v1/admin/workers" -o "$WORK/workers.json"
# The only worker of the cluster (the API's own Ray node takes no work) is the GPU box's, named
# after its host name.
python3 - "$WORK/workers.json" "$($DOCKER inspect -f '{{.Config.Hostname}}' muralist-gpu-box)" <<'PY' \
    || fail "the cluster's workers are not the GPU box's: $(cat "$WORK/workers.json")"
import json, sys
workers, host = json.load(open(sys.argv[1])), sys.argv[2]
assert workers and all(w["name"].startswith(host) for w in workers), workers
PY
SUMMARY="$SUMMARY first_image=$(($(date +%s) - T0))s"
