#!/bin/sh
# Container entrypoint (run by tini). Roles:
#   serve [flags]   the API + web UI; muralist reads every MURALIST_* variable itself (flags win)
#   worker [flags]  offer this container's devices to the cluster at MURALIST_CLUSTER
#   head            the Ray head (token auth, port MURALIST_RAY_PORT, default 6380)
#   healthcheck     the image's HEALTHCHECK: /healthz for the API; worker and head containers
#                   are healthy while they run (the API's /healthz says whether workers joined)
#   anything else   run as a command (muralist users add ..., bash, ...)
set -eu

demo_models() {
    # Tiny random-weight models, only when asked: lets a fresh install generate without real weights.
    # Under a lock: the API and a worker sharing the volume start together.
    [ "${MURALIST_DEMO_MODELS:-0}" = 1 ] || return 0
    data="${MURALIST_DATA_DIR:-/data}"
    mkdir -p "$data"
    (
        flock 9
        if [ -z "$(ls -A "$data/models/Stable-diffusion" 2>/dev/null)" ]; then
            muralist models make-tiny --data-dir "$data" >/dev/null
        fi
    ) 9>"$data/.demo-models.lock"
}

need_token() {
    if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
        echo "muralist: set RAY_AUTH_TOKEN (the same on every node; e.g. openssl rand -hex 24) to use the cluster" >&2
        exit 2
    fi
    export RAY_AUTH_MODE=token
}

role="${1:-serve}"
[ $# -gt 0 ] && shift
case "$role" in
serve | worker | head) echo "$role" >/tmp/muralist-role ;;
esac
case "$role" in
healthcheck)
    [ "$(cat /tmp/muralist-role 2>/dev/null)" = serve ] || exit 0
    exec python3 -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MURALIST_PORT', '7860'), timeout=4)"
    ;;
serve)
    demo_models
    if [ -n "${MURALIST_CLUSTER:-}" ]; then
        need_token
        # The API process is a Ray driver, and a driver needs a Ray node on its own machine: join
        # the head as a node that takes no work (CPUs and GPUs 0); the workers run elsewhere.
        ray start --address="$MURALIST_CLUSTER" --num-cpus=0 --num-gpus=0 --dashboard-agent-listen-port=0 >/dev/null
    fi
    exec muralist serve "$@"
    ;;
worker)
    demo_models
    need_token
    exec muralist worker "$@"
    ;;
head)
    need_token
    # MURALIST_NODE_IP: the address other machines reach this one at (on the host's network the
    # host name may resolve to a loopback address).
    muralist cluster start-head --port "${MURALIST_RAY_PORT:-6380}" \
        --node-ip-address "${MURALIST_NODE_IP:-$(hostname -i | cut -d' ' -f1)}" >/dev/null
    echo "muralist: Ray head listening on port ${MURALIST_RAY_PORT:-6380}" >&2
    # Stay in the foreground until docker stop, then take the Ray processes down cleanly.
    trap 'ray stop >/dev/null 2>&1; exit 0' TERM INT
    while :; do sleep 3600 & wait $!; done
    ;;
*)
    exec "$role" "$@"
    ;;
esac
