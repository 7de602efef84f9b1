#!/usr/bin/env bash
# The single definition of how each process of the sweep stack starts.
#
#   scripts/entrypoint.sh ROLE [EXTRA_ARGS...]
#
# ROLE is one of: mlflow, ray-head, ray-worker, service.
# EXTRA_ARGS are appended to the role's command (e.g. `ray-worker --resources='{"big": 1}'`).
#
# Helper roles (not processes):
#   check ROLE   exit 0 when ROLE's process on this host answers its health endpoint
#   env-names    print every environment variable name this stack reads, one per line
#
# docker-compose.yml (image ENTRYPOINT + `command: [ROLE]`) and scripts/local_cluster both
# start every process through this file, so the two launchers cannot drift.
set -euo pipefail

# Every environment variable name the deployment may set: the names the Python code reads,
# the Ray/MLflow settings we rely on, and this script's own launch variables.
# tests/test_compose.py parses this array: keep one name per line and no comments inside.
ENV_NAMES=(
    MLFLOW_TRACKING_URI
    RAY_ADDRESS
    SWEEP_SERVICE_URL
    SWEEP_DATA_DIR
    SWEEP_DB_URL
    SWEEP_API_TOKEN
    SWEEP_API_HOST
    SWEEP_API_PORT
    SWEEP_MAX_CONCURRENT
    RAY_AUTH_MODE
    RAY_AUTH_TOKEN
    RAY_AUTH_TOKEN_PATH
    RAY_USAGE_STATS_ENABLED
    RAY_JOB_STOP_SIGNAL
    MLFLOW_HOST
    MLFLOW_PORT
    MLFLOW_WORKERS
    MLFLOW_BACKEND_STORE_URI
    MLFLOW_ARTIFACTS_DESTINATION
    MLFLOW_ALLOWED_HOSTS
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION
    RAY_GCS_PORT
    RAY_DASHBOARD_HOST
    RAY_DASHBOARD_PORT
    RAY_DASHBOARD_AGENT_PORT
    RAY_HEAD_NUM_CPUS
    RAY_HEAD_NUM_GPUS
    RAY_HEAD_ADDRESS
    RAY_WORKER_NUM_CPUS
    RAY_WORKER_NUM_GPUS
    RAY_TEMP_DIR
    RAY_NODE_IP_ADDRESS
    RAY_CLIENT_SERVER_PORT
)

ROLES=(mlflow ray-head ray-worker service)

die() {
    echo "entrypoint: $*" >&2
    exit 2
}

usage() {
    local IFS='|'
    echo "usage: $0 {${ROLES[*]}} [EXTRA_ARGS...] | check ROLE | env-names" >&2
    exit 2
}

# ---- settings shared by every role ------------------------------------------------------
# Defaults suit a single machine; docker-compose.yml and scripts/local_cluster override them.
SWEEP_DATA_DIR="${SWEEP_DATA_DIR:-$PWD/sweep_data}"
export SWEEP_DATA_DIR
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
# Ray sends this signal to a job's driver on `ray job stop`; Tune saves its state on SIGINT.
export RAY_JOB_STOP_SIGNAL="${RAY_JOB_STOP_SIGNAL:-SIGINT}"

MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
RAY_GCS_PORT="${RAY_GCS_PORT:-6379}"
RAY_DASHBOARD_HOST="${RAY_DASHBOARD_HOST:-127.0.0.1}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
SWEEP_API_HOST="${SWEEP_API_HOST:-127.0.0.1}"
SWEEP_API_PORT="${SWEEP_API_PORT:-8000}"

# Address to probe a server bound to HOST from the same machine.
probe_host() {
    case "$1" in
        "" | 0.0.0.0 | "::" | "[::]" | "*") echo 127.0.0.1 ;;
        *) echo "$1" ;;
    esac
}

is_loopback() {
    case "$1" in
        127.* | localhost | ::1 | "[::1]") return 0 ;;
        *) return 1 ;;
    esac
}

# Exit 0 when every URL answers 200 within a few seconds.
http_ok() {
    python - "$@" <<'PY'
import sys
import urllib.request

for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            if response.status != 200:
                sys.exit(1)
    except Exception:
        sys.exit(1)
PY
}

# Ray's token auth: the token comes from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH,
# or ~/.ray/auth_token. Every Ray process and every Jobs API client needs the same one.
require_ray_token() {
    [[ "${RAY_AUTH_MODE}" == token ]] || return 0
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        [[ -s "${RAY_AUTH_TOKEN_PATH}" ]] && return 0
        die "RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH} is missing or empty"
    fi
    [[ -s "${HOME:-/nonexistent}/.ray/auth_token" ]] && return 0
    die "RAY_AUTH_MODE=token but no Ray token: set RAY_AUTH_TOKEN (the same value on every" \
        "node and the service), e.g. from: python -c 'import secrets; print(secrets.token_hex(32))'"
}

# ---- roles ------------------------------------------------------------------------------
run_mlflow() {
    local backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${SWEEP_DATA_DIR}/mlflow/mlflow.db}"
    local artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-${SWEEP_DATA_DIR}/mlflow/artifacts}"
    local allowed="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*}"
    # MLflow's server-side job runner (GenAI scorers) is unused here; its consumer
    # processes outlive a SIGTERM to the server, so keep it off unless asked for.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
    if [[ "${backend}" == sqlite:///* ]]; then
        mkdir -p "$(dirname "${backend#sqlite:///}")"
    fi
    if [[ "${artifacts}" == /* ]]; then
        mkdir -p "${artifacts}"
    fi
    local cmd=(mlflow server
        --host "${MLFLOW_HOST}"
        --port "${MLFLOW_PORT}"
        --backend-store-uri "${backend}"
        --serve-artifacts
        --artifacts-destination "${artifacts}"
        --allowed-hosts "${allowed}")
    if [[ -n "${MLFLOW_WORKERS:-}" ]]; then
        cmd+=(--workers "${MLFLOW_WORKERS}")
    fi
    exec "${cmd[@]}" "$@"
}

# Flags shared by both kinds of Ray node; only those whose variable is set.
ray_common_args() {
    RAY_ARGS=()
    # The node's address: Ray's servers (GCS, raylet, object manager, agents, workers) listen on it.
    if [[ -n "${RAY_NODE_IP_ADDRESS:-}" ]]; then
        RAY_ARGS+=("--node-ip-address=${RAY_NODE_IP_ADDRESS}")
    fi
    if [[ -n "${RAY_DASHBOARD_AGENT_PORT:-}" ]]; then
        RAY_ARGS+=("--dashboard-agent-listen-port=${RAY_DASHBOARD_AGENT_PORT}")
    fi
    if [[ -n "${RAY_TEMP_DIR:-}" ]]; then
        RAY_ARGS+=("--temp-dir=${RAY_TEMP_DIR}")
    fi
    # `ray start`, or the same CLI through RAY_CLI when a loopback node address or
    # RAY_CLIENT_SERVER_PORT=off asks for what the plain CLI cannot do.
    RAY_START=(ray start)
    if is_loopback "${RAY_NODE_IP_ADDRESS:-}" || [[ "${RAY_CLIENT_SERVER_PORT:-}" == off ]]; then
        RAY_START=(python -c "${RAY_CLI}" start)
    fi
}

# The `ray` CLI, with two changes:
# - 127.0.0.1 and localhost in --address and --node-ip-address stay as given. Ray replaces them
#   with this machine's network address (ray-project/ray#59110), where a loopback head does not
#   listen, and the switch the head uses for that (below) refuses a second node.
# - RAY_CLIENT_SERVER_PORT=off: no Ray Client server. It is not used here, and it gives up after
#   30 s without its node's info on a loaded machine, which takes the whole head down.
RAY_CLI='
import os
import sys

from ray._private import services
from ray.scripts import scripts

_resolve = services.resolve_ip_for_localhost
services.resolve_ip_for_localhost = lambda host: "127.0.0.1" if host in ("127.0.0.1", "localhost") else _resolve(host)
if os.environ.get("RAY_CLIENT_SERVER_PORT") == "off":
    scripts.get_ray_client_dependency_error = lambda: ImportError("RAY_CLIENT_SERVER_PORT=off")
sys.argv[0] = "ray"
sys.exit(scripts.main())
'

run_ray_head() {
    require_ray_token
    # RAY_ADDRESS is the Jobs API URL for clients; Ray's own processes must not see it
    # (the job supervisor sets the right one for each driver).
    unset RAY_ADDRESS
    mkdir -p "${SWEEP_DATA_DIR}"
    ray_common_args
    if is_loopback "${RAY_NODE_IP_ADDRESS:-}"; then
        # Ray replaces a loopback node address with the interface address unless it thinks
        # multi-node clusters are off (its Windows/macOS switch). The head's processes, the job
        # drivers it starts included, inherit this, so they keep to 127.0.0.1 too.
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    fi
    if [[ -n "${RAY_CLIENT_SERVER_PORT:-}" && "${RAY_CLIENT_SERVER_PORT}" != off ]]; then
        RAY_ARGS+=("--ray-client-server-port=${RAY_CLIENT_SERVER_PORT}")
    fi
    local cmd=("${RAY_START[@]}" --head --block
        "--port=${RAY_GCS_PORT}"
        --include-dashboard=true
        "--dashboard-host=${RAY_DASHBOARD_HOST}"
        "--dashboard-port=${RAY_DASHBOARD_PORT}"
        --disable-usage-stats)
    if [[ -n "${RAY_HEAD_NUM_CPUS:-}" ]]; then
        cmd+=("--num-cpus=${RAY_HEAD_NUM_CPUS}")
    fi
    if [[ -n "${RAY_HEAD_NUM_GPUS:-}" ]]; then
        cmd+=("--num-gpus=${RAY_HEAD_NUM_GPUS}")
    fi
    exec "${cmd[@]}" "${RAY_ARGS[@]}" "$@"
}

run_ray_worker() {
    require_ray_token
    unset RAY_ADDRESS
    [[ -n "${RAY_HEAD_ADDRESS:-}" ]] || die "ray-worker needs RAY_HEAD_ADDRESS (HOST:GCS_PORT of the head)"
    mkdir -p "${SWEEP_DATA_DIR}"
    ray_common_args
    local cmd=("${RAY_START[@]}" --block "--address=${RAY_HEAD_ADDRESS}")
    if [[ -n "${RAY_WORKER_NUM_CPUS:-}" ]]; then
        cmd+=("--num-cpus=${RAY_WORKER_NUM_CPUS}")
    fi
    if [[ -n "${RAY_WORKER_NUM_GPUS:-}" ]]; then
        cmd+=("--num-gpus=${RAY_WORKER_NUM_GPUS}")
    fi
    exec "${cmd[@]}" "${RAY_ARGS[@]}" "$@"
}

run_service() {
    require_ray_token
    if ! is_loopback "${SWEEP_API_HOST}" && [[ -z "${SWEEP_API_TOKEN:-}" ]]; then
        die "SWEEP_API_HOST=${SWEEP_API_HOST} is reachable beyond this machine: set SWEEP_API_TOKEN"
    fi
    mkdir -p "${SWEEP_DATA_DIR}"
    exec python -m service.api --host "${SWEEP_API_HOST}" --port "${SWEEP_API_PORT}" "$@"
}

check_role() {
    local agent_port="${RAY_DASHBOARD_AGENT_PORT:-52365}"
    case "${1:-}" in
        mlflow)
            http_ok "http://$(probe_host "${MLFLOW_HOST}"):${MLFLOW_PORT}/health" ;;
        ray-head)
            # Dashboard (Jobs API) up and this node's raylet + GCS healthy. Both are public
            # endpoints, so no token is needed.
            http_ok "http://$(probe_host "${RAY_DASHBOARD_HOST}"):${RAY_DASHBOARD_PORT}/api/gcs_healthz" \
                "http://127.0.0.1:${agent_port}/api/healthz" ;;
        ray-worker)
            http_ok "http://127.0.0.1:${agent_port}/api/local_raylet_healthz" ;;
        service)
            http_ok "http://$(probe_host "${SWEEP_API_HOST}"):${SWEEP_API_PORT}/health" ;;
        *) usage ;;
    esac
}

role="${1:-}"
[[ $# -gt 0 ]] && shift
case "${role}" in
    mlflow) run_mlflow "$@" ;;
    ray-head) run_ray_head "$@" ;;
    ray-worker) run_ray_worker "$@" ;;
    service) run_service "$@" ;;
    check) check_role "$@" ;;
    env-names) printf '%s\n' "${ENV_NAMES[@]}" ;;
    *) usage ;;
esac
