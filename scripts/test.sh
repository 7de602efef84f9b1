#!/usr/bin/env bash
# The test command: installs what the tests need, starts the services they use, runs pytest,
# stops everything. Ray clusters and MLflow servers are started (and stopped) by the test
# fixtures on loopback; PostgreSQL is started here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

need=()
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if ((${#need[@]})); then
    if [[ $(id -u) == 0 ]]; then
        echo "test: installing ${need[*]} from Debian's packages" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "test: missing ${need[*]} (install them, or run as root)" >&2
    fi
fi

export RAY_USAGE_STATS_ENABLED=0 TF_CPP_MIN_LOG_LEVEL=2 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export SWEEP_DATA_DIR="${SWEEP_DATA_DIR:-$PWD/sweep_data}"   # MNIST cache shared by all tests
cleanup() {
    bash scripts/postgres.sh stop >/dev/null 2>&1 || true
    [[ -x scripts/local_cluster ]] && scripts/local_cluster down >/dev/null 2>&1 || true
}
trap cleanup EXIT
bash scripts/postgres.sh start >&2
export TEST_POSTGRES_URL="$(bash scripts/postgres.sh url)"

if (($#)); then
    .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
    exit $?
fi
# The cluster end-to-end tests get their own process: Ray reads its auth mode once per process,
# and they talk to a token-protected cluster while other tests run token-free local Rays.
# --durations: where the run's time went, for whoever has to keep it short.
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 --ignore=tests/test_e2e_cluster.py || rc=$?
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=6 tests/test_e2e_cluster.py || rc=$?
exit $rc
