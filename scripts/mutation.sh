#!/usr/bin/env bash
# Mutation score of the engine's core (issue 15, item 4); docs/testing.md has the last result.
#
# Runs mutmut (pinned in pyproject.toml's `mutation` extra) over tp_engine/ops.py,
# tp_engine/rules/, tp_engine/engine.py, tp_engine/optimizers.py and the optimizer kernels
# (tp_engine/backends/numpy_kernels.py), against the quick test files only. mutmut rewrites
# sources, so it works on a throwaway copy of the committed tree (git HEAD), never on this
# checkout. Not run by CI. 1706 mutants at e1a22d1; on the shared 2-core machine at load 5-25
# and nice 19, mutmut's stats and clean-test runs took ~30 min and mutants ran at 1-7 a minute.
#
#   bash scripts/mutation.sh                 # run, then print the score and the survivors
#   MUT_DIR=/tmp/m MUT_JOBS=1 bash scripts/mutation.sh
#   bash scripts/mutation.sh tp_engine.ops*  # only the mutants whose names match (mutmut globs)
#   MUT_RESUME=1 bash scripts/mutation.sh     # continue a stopped run in MUT_DIR: mutmut keeps
#                                             # each mutant's result (MUT_JOBS may change)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MUT_DIR="${MUT_DIR:-/tmp/tp-mutation}"
JOBS="${MUT_JOBS:-2}"
[[ -x .venv/bin/mutmut ]] || .venv/bin/python -m pip install -q -c constraints.txt -e '.[mutation]'

if [[ "${MUT_RESUME:-0}" == 1 && -f "$MUT_DIR/pyproject.toml" ]]; then
    echo "mutation: resuming in $MUT_DIR (the sources of the commit that made it)" >&2
    cd "$MUT_DIR"
else
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
    "tests/test_fused_kernels.py",
]
# test_rules_modern.py's quick part: the MNIST trainings are left out.
pytest_add_cli_args = [
    "-p", "no:cacheprovider", "-q",
    "-k", "not mnist and not fixed_feedback and not fa_forward and not dfa_updates and not reconstructs and not least_squares_optimum and not jacobian_approaches and not every_registered",
]
# forkserver, not fork: a worker forked after TensorFlow started its threads deadlocks.
process_isolation = "forkserver"
# A worker's wall-clock limit is (the covering tests' measured time + constant) * multiplier. At
# mutmut's default (15, 1) a hung mutant of Engine.__init__ (~260 s of tests) would hold a worker
# 65 min; (4, 20) was too tight at load 10-25 (false timeouts); timeouts get a second pass anyway.
timeout_multiplier = 6.0
timeout_constant = 60.0
TOML
fi
export TF_CPP_MIN_LOG_LEVEL=2 SWEEP_DATA_DIR="${SWEEP_DATA_DIR:-$ROOT/sweep_data}" PYTHONDONTWRITEBYTECODE=1
IMPORT_TIME='\.x_(defop|defopt|_iterative_rinv|_piecewise_rinv)__mutmut_'
# The first pass skips the import-time mutants (below): they can only survive it, each after its
# covering tests' full run (~30 s each, about an hour for the 105 of them at e1a22d1).
"$ROOT/.venv/bin/mutmut" run "tp_engine.__generate_only__*" >/dev/null 2>&1 || true  # writes mutants/
mapfile -t ALL < <("$ROOT/.venv/bin/mutmut" results --all true | sed 's/^ *//' | cut -d: -f1)
wanted() {  # mutant name $1 matches one of the globs after it (every name when none is given)
    local n=$1 g; shift
    (( $# )) || return 0
    for g in "$@"; do [[ $n == $g ]] && return 0; done
    return 1
}
NAMES=()
for n in "${ALL[@]}"; do
    [[ $n =~ $IMPORT_TIME ]] || ! wanted "$n" "$@" || NAMES+=("$n")
done
echo "mutation: first pass over ${#NAMES[@]} of ${#ALL[@]} mutants" >&2
(( ${#NAMES[@]} )) && { "$ROOT/.venv/bin/mutmut" run --max-children "$JOBS" "${NAMES[@]}" || true; }
"$ROOT/.venv/bin/mutmut" results --all true | sed 's/^ *//' > results.txt || true

# Second pass, each survivor switched on through MUTANT_UNDER_TEST (what mutmut's trampolines in
# mutants/ read) in a fresh pytest process, MUT_JOBS at a time; nothing is rewritten, so the
# processes do not interfere:
# - code that runs only at import time (defop/defopt and the f_rinv factories build the op and
#   optimizer tables when the module loads) is never switched on in mutmut's workers, which fork
#   after the import, so mutmut reports all of it as survived: it gets the full test set here;
# - a timeout (on a loaded machine often a slow worker, not a hung mutant) gets the full set too,
#   with 900 s to finish;
# - any other survivor passed the full set already: it gets tests/test_mutation_kills.py.
export ROOT KFILTER="not mnist and not fixed_feedback and not fa_forward and not dfa_updates and not reconstructs and not least_squares_optimum and not jacobian_approaches and not every_registered"
recheck() {
    local m=$1 status=$2 files
    if [[ $status == timeout || $m =~ \.x_(defop|defopt|_iterative_rinv|_piecewise_rinv)__mutmut_ ]]; then
        # test_ops.py first: most of these die there, before TensorFlow is imported.
        files=(tests/test_ops.py tests/test_mutation_kills.py tests/test_rule_references.py tests/test_engine.py
               tests/test_rules_modern.py tests/test_fused_kernels.py)
    else
        files=(tests/test_mutation_kills.py tests/test_fused_kernels.py)
    fi
    if (cd mutants && MUTANT_UNDER_TEST=$m timeout 900 "$ROOT/.venv/bin/python" -m pytest -x -q -p no:cacheprovider \
            -k "$KFILTER" "${files[@]}" >/dev/null 2>&1); then
        echo "$m: survived"
    else
        echo "$m: killed"
    fi
}
export -f recheck
# the import-time mutants, never run in the first pass, and the first pass's survivors and timeouts
{ grep -E ': (survived|timeout)$' results.txt
  grep -E "${IMPORT_TIME}[0-9]+: not checked$" results.txt | while IFS= read -r l; do
      n=${l%%:*}; if wanted "$n" "$@"; then echo "$n: survived"; fi; done
} | sed 's/: / /' | xargs -r -P "$JOBS" -L1 bash -c 'recheck "$1" "$2"' _ > recheck.txt
echo "mutation: results in $MUT_DIR/results.txt, the survivors' second pass in $MUT_DIR/recheck.txt" >&2
echo "first pass:" >&2
awk -F': ' 'NF == 2 {n[$2]++} END {for (k in n) print "  " k, n[k]}' results.txt | sort >&2
echo "second pass (survivors and timeouts):" >&2
awk -F': ' 'NF == 2 {n[$2]++} END {for (k in n) print "  " k, n[k]}' recheck.txt | sort >&2
