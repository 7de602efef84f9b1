#!/usr/bin/env bash
# Screenshots of the MLflow UI as a new user sees it after a sweep: a fresh headless Chromium
# profile for every page, on `mlflow ui` over the given store (loopback only).
#
#   scripts/ui_screenshots.sh STORE_URI OUTDIR      e.g. sqlite:///$PWD/mlflow.db shots/
#
# Pages: the experiments list, the experiment as a new browser opens it, its runs table, the
# latest sweep's trials (table and charts, the links of the parent run's description), the
# parent run, and its comparison table and plot. Installs Debian's chromium if missing (as root).
# Env: PORT (5077), EXPERIMENT (its name; default: the experiment of the latest sweep). Artifacts
# are read where the store says they are (a copied store needs its paths rewritten).
# Not part of CI: Chromium and an MLflow UI take a minute to start on a busy machine.
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 STORE_URI OUTDIR" >&2; exit 2; }
STORE=$1 OUT=$2 PORT=${PORT:-5077}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
MLFLOW=${MLFLOW:-$ROOT/.venv/bin/mlflow}
mkdir -p "$OUT"

if ! command -v chromium >/dev/null; then
    [[ $(id -u) == 0 ]] || { echo "ui_screenshots: chromium missing (apt-get install chromium, as root)" >&2; exit 1; }
    echo "ui_screenshots: installing chromium (apt-get)..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

LOG=$(mktemp -t ui_screenshots_log.XXXXXX)
args=(ui --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" --workers 1)
# Its own process group, so its workers stop with it.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$MLFLOW" "${args[@]}" >"$LOG" 2>&1 &
SERVER=$!
PROFILES=$(mktemp -d -t ui_profiles.XXXXXX)
stop() {
    kill -- "-$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    rm -rf "$PROFILES"
}
trap stop EXIT
URL=http://127.0.0.1:$PORT
for _ in $(seq 120); do
    curl -fs -o /dev/null "$URL/health" && break
    kill -0 "$SERVER" 2>/dev/null || { echo "ui_screenshots: mlflow ui exited; its log:" >&2; cat "$LOG" >&2; exit 1; }
    sleep 2
done
curl -fs -o /dev/null "$URL/health" || { echo "ui_screenshots: mlflow ui did not answer in 240 s ($LOG)" >&2; exit 1; }

# name <TAB> url <TAB> window height. The sweep's trials pages are the links of its parent run's
# description (built the same way for a sweep older than those links).
PAGES=$(PYTHONPATH=$ROOT "$PY" - "$URL" "${EXPERIMENT:-}" <<'EOF'
import re
import sys

from mlflow import MlflowClient

from worker import tracking

url, name = sys.argv[1], sys.argv[2]
c = MlflowClient(url)
exps = [c.get_experiment_by_name(name)] if name else c.search_experiments()
flt = f"tags.`{tracking.TAG_KIND}` = '{tracking.KIND_SWEEP}'"
runs = c.search_runs([e.experiment_id for e in exps if e], filter_string=flt, max_results=1,
                     order_by=["attributes.start_time DESC"])
if not runs:
    sys.exit(f"no sweep's parent run in {'experiment ' + name if name else 'this store'}")
p = runs[0]
exp, pid, sweep = p.info.experiment_id, p.info.run_id, p.data.tags[tracking.TAG_SWEEP]
links = dict(re.findall(r"\[([^\]]+)\]\((#/[^)\s]+)\)", p.data.tags.get(tracking.TAG_NOTE, "")))
if "table" not in links:  # a sweep older than the links: its spec's metric orders its trials
    import tempfile

    import yaml

    from worker.spec.sections import SearchConfig

    spec = yaml.safe_load(open(c.download_artifacts(pid, "spec.yaml", tempfile.mkdtemp()))) or {}
    search = {**SearchConfig().model_dump(), **(spec.get("search") or {})}
    for label, charts in (("table", False), ("charts", True)):
        links[label] = tracking.ui_link(exp, trials_of=sweep, metric=search["metric"], mode=search["mode"], charts=charts)
runs_ml = tracking.ui_link(exp)
pngs = [f.path for f in c.list_artifacts(pid, "comparison") if f.path.endswith(".png")]
plot = next((a for a in pngs if a.endswith("learning_curves.png")), pngs[0] if pngs else None)
pages = [
    ("01_experiments", "#/experiments", 900),
    ("02_experiment_as_opened", f"#/experiments/{exp}", 900),  # no workflowType: a new browser's choice
    ("03_runs", runs_ml, 900),
    ("04_runs_charts", runs_ml + "&compareRunsMode=CHART", 900),
    ("05_trials_table", links["table"], 900),
    ("06_trials_charts", links["charts"], 1300),
    ("07_parent_run", tracking.ui_link(exp, pid), 1500),
    ("08_comparison_table", tracking.ui_link(exp, pid, artifact="comparison/comparison.md"), 900),
]
if plot:
    pages.append(("09_comparison_plot", tracking.ui_link(exp, pid, artifact=plot), 1100))
for n, link, h in pages:
    print(f"{n}\t{url}/{link}\t{h}")
EOF
)

# One page at a time, each in a new profile (no remembered sidebar choice, no closed panels).
while IFS=$'\t' read -r name link height; do
    prof=$(mktemp -d -p "$PROFILES")
    timeout 180 chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$prof" \
        --window-size="1400,$height" --virtual-time-budget=20000 --screenshot="$OUT/$name.png" "$link" \
        >/dev/null 2>&1 || echo "ui_screenshots: $name failed" >&2
    echo "$OUT/$name.png  $link"
done <<<"$PAGES"
