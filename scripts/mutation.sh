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
process_isolation = "fork"
TOML
export TF_CPP_MIN_LOG_LEVEL=2 SWEEP_DATA_DIR="${SWEEP_DATA_DIR:-$ROOT/sweep_data}" PYTHONDONTWRITEBYTECODE=1
"$ROOT/.venv/bin/mutmut" run --max-children "$JOBS" "$@" || true
"$ROOT/.venv/bin/mutmut" results --all true > results.txt || true
echo "mutation: results in $MUT_DIR/results.txt" >&2
awk -F': ' 'NF == 2 {n[$2]++} END {for (k in n) print k, n[k]}' results.txt | sort >&2
