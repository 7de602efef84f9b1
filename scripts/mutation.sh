#!/usr/bin/env bash
# Mutation score of the engine's core (issue 15, item 4); docs/testing.md has the last result.
#
# Runs mutmut (pinned in pyproject.toml's `mutation` extra) over tp_engine/ops.py,
# tp_engine/rules/, tp_engine/engine.py, tp_engine/optimizers.py and the optimizer kernels
# (tp_engine/backends/numpy_kernels.py), against the quick test files only. mutmut rewrites
# sources, so it works on a throwaway copy of the committed tree (git HEAD), never on this
# checkout. About 40-60 minutes on 2 cores. Not run by CI.
#
#   bash scripts/mutation.sh                 # run, then print the score and the survivors
#   MUT_DIR=/tmp/m MUT_JOBS=1 bash scripts/mutation.sh
#   bash scripts/mutation.sh tp_engine.ops*  # only the mutants whose names match (mutmut globs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MUT_DIR="${MUT_DIR:-/tmp/tp-mutation}"
JOBS="${MUT_JOBS:-2}"
[[ -x .venv/bin/mutmut ]] || .venv/bin/python -m pip install -q -c constraints.txt -e '.[mutation]'

rm -rf "$MUT_DIR" && mkdir -p "$MUT_DIR"
git archive HEAD | tar -x -C "$MUT_DIR"
cd "$MUT_DIR"
cat >> pyproject.toml <<'TOML'

[tool.mutmut]
source_paths = ["tp_engine"]
only_mutate = [
    "tp_engine/ops.py",
    "tp_engine/rules/*",
    "tp_engine/engine.py",
    "tp_engine/optimizers.py",
    "tp_engine/backends/numpy_kernels.py",
]
pytest_add_cli_args_test_selection = [
    "tests/test_ops.py",
    "tests/test_engine.py",
    "tests/test_rule_references.py",
    "tests/test_rules_modern.py",
    "tests/test_mutation_kills.py",
]
# test_rules_modern.py's quick part: the MNIST trainings are left out.
pytest_add_cli_args = [
    "-p", "no:cacheprovider", "-q",
    "-k", "not mnist and not fixed_feedback and not fa_forward and not dfa_updates and not reconstructs and not least_squares_optimum and not jacobian_approaches and not every_registered",
]
# forkserver, not fork: a worker forked after TensorFlow started its threads deadlocks.
process_isolation = "forkserver"
TOML
export TF_CPP_MIN_LOG_LEVEL=2 SWEEP_DATA_DIR="${SWEEP_DATA_DIR:-$ROOT/sweep_data}" PYTHONDONTWRITEBYTECODE=1
"$ROOT/.venv/bin/mutmut" run --max-children "$JOBS" "$@" || true
"$ROOT/.venv/bin/mutmut" results --all true | sed 's/^ *//' > results.txt || true

# Second pass, each survivor applied to the copy's source and tested in a fresh pytest process:
# - code that runs only at import time (defop/defopt and the f_rinv factories build the op and
#   optimizer tables when the module loads) is never switched on in mutmut's workers, which fork
#   after the import, so mutmut reports all of it as survived: it gets the full test set here;
# - any other survivor passed the full set already: it gets tests/test_mutation_kills.py.
PYTEST=("$ROOT/.venv/bin/python" -m pytest -x -q -p no:cacheprovider)
KFILTER="not mnist and not fixed_feedback and not fa_forward and not dfa_updates and not reconstructs and not least_squares_optimum and not jacobian_approaches and not every_registered"
QUICK=(tests/test_ops.py tests/test_mutation_kills.py tests/test_rule_references.py tests/test_engine.py tests/test_rules_modern.py)
cp -a tp_engine .pristine_tp_engine
: > recheck.txt
grep ': survived$' results.txt | cut -d: -f1 | while read -r m; do
    "$ROOT/.venv/bin/mutmut" apply "$m" >/dev/null 2>&1
    if [[ $m =~ \.x_(defop|defopt|_iterative_rinv|_piecewise_rinv)__mutmut_ ]]; then
        files=("${QUICK[@]}")
    else
        files=(tests/test_mutation_kills.py)
    fi
    if timeout 900 "${PYTEST[@]}" -k "$KFILTER" "${files[@]}" >/dev/null 2>&1; then
        echo "$m: survived" >> recheck.txt
    else
        echo "$m: killed" >> recheck.txt
    fi
    rm -rf tp_engine && cp -a .pristine_tp_engine tp_engine
done
echo "mutation: results in $MUT_DIR/results.txt, the survivors' second pass in $MUT_DIR/recheck.txt" >&2
echo "first pass:" >&2
awk -F': ' 'NF == 2 {n[$2]++} END {for (k in n) print "  " k, n[k]}' results.txt | sort >&2
echo "second pass (survivors only):" >&2
awk -F': ' 'NF == 2 {n[$2]++} END {for (k in n) print "  " k, n[k]}' recheck.txt | sort >&2
