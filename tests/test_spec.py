"""The sweep spec: validation errors (path + reason), expansion, defaults, loading safety."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tp_engine.config import RULE_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the editable install may not map the packages yet
    sys.path.insert(0, str(ROOT))

from worker.spec import DOCUMENT, FieldError, SpecError, SweepSpec, load_spec  # noqa: E402

SMOKE = ROOT / "configs" / "smoke.yaml"
SEED_SEARCH = ROOT / "configs" / "seed_search.yaml"


def errors_of(text: str) -> list[FieldError]:
    with pytest.raises(SpecError) as info:
        SweepSpec.from_yaml(textwrap.dedent(text))
    return info.value.errors


def reason_at(text: str, path: str) -> str:
    errors = errors_of(text)
    found = [e.reason for e in errors if e.path == path]
    assert found, f"no error at {path!r}; got {[str(e) for e in errors]}"
    return found[0]


# ---- invalid specs: (id, yaml, exact path, substrings of the reason) ---------------------------

INVALID = [
    ("wrong-type-int", "name: x\nsearch: {num_samples: many}\n",
     "search.num_samples", ["valid integer"]),
    ("wrong-type-float-as-string", "name: x\nparameters:\n  alpha: {distribution: uniform, min: '0.5', max: 1}\n",
     "parameters.alpha.min", ["valid number"]),
    ("wrong-type-name", "name: 12\n", "name", ["valid string"]),
    ("unknown-rule-in-values", "name: x\nparameters:\n  rule: {distribution: values, values: [bp, foo, dtp]}\n",
     "parameters.rule.values[1]", ["'bp', 'dtp', 'rlstp', 'lstp', 'fa', 'dfa', 'drl', 'ddtp_linear', 'ldrl' or 'fwdtp'"]),
    ("unknown-rule-in-base", "name: x\nbase: {rule: sgd}\n", "base.rule", ["'bp', 'dtp', 'rlstp', 'lstp', 'fa', 'dfa', 'drl', 'ddtp_linear', 'ldrl' or 'fwdtp'"]),
    ("misspelt-rule-suggests", "name: x\nbase: {rule: ddtp_lin}\n", "base.rule", ["did you mean ddtp_linear?"]),
    ("misspelt-dataset-suggests", "name: x\nbase: {dataset: fashion_mnst}\n", "base.dataset",
     ["did you mean fashion_mnist?", "'mnist', 'fashion_mnist', 'cifar10'"]),
    ("unknown-rule-override-key", "name: x\nrule_overrides: {dtpp: {alpha: 0.1}}\n", "rule_overrides.dtpp",
     ["did you mean dtp or fwdtp?"]),
    ("negative-epochs", "name: x\nbase: {epochs: -1}\n", "base.epochs", ["greater than or equal to 1"]),
    ("negative-epochs-in-values", "name: x\nparameters:\n  epochs: {distribution: values, values: [2, -3]}\n",
     "parameters.epochs.values[1]", ["greater than or equal to 1"]),
    ("loguniform-min-zero", "name: x\nparameters:\n  optimizer.lr: {distribution: loguniform, min: 0, max: 0.1}\n",
     "parameters.optimizer.lr.min", ["greater than 0"]),
    ("qloguniform-min-negative",
     "name: x\nparameters:\n  gamma: {distribution: qloguniform, min: -1, max: 1, q: 0.1}\n",
     "parameters.gamma.min", ["greater than 0"]),
    ("min-above-max", "name: x\nparameters:\n  alpha: {distribution: uniform, min: 2, max: 1}\n",
     "parameters.alpha.min", ["less than max"]),
    ("randint-min-above-max", "name: x\nparameters:\n  rinv_steps: {distribution: randint, min: 4, max: 1}\n",
     "parameters.rinv_steps.min", ["less than max"]),
    ("range-outside-trialconfig",
     "name: x\nparameters:\n  optimizer.lr: {distribution: loguniform, min: 1.0e-4, max: 100}\n",
     "parameters.optimizer.lr.max", ["less than or equal to 10"]),
    ("quniform-not-multiple", "name: x\nparameters:\n  alpha: {distribution: quniform, min: 0.52, max: 1, q: 0.05}\n",
     "parameters.alpha.min", ["multiple of q"]),
    ("infinite-bound", "name: x\nparameters:\n  alpha: {distribution: uniform, min: 0.5, max: .inf}\n",
     "parameters.alpha.max", ["finite"]),
    ("unknown-top-level-key", "name: x\nsaerch: {}\n", "saerch", ["unknown key", "did you mean search?"]),
    ("unknown-key-in-search", "name: x\nsearch: {metrc: loss}\n", "search.metrc", ["unknown key", "metric"]),
    ("unknown-key-in-early-stop", "name: x\nearly_stop: {grace: 1}\n", "early_stop.grace",
     ["unknown key", "grace_period"]),
    ("unknown-key-in-resources", "name: x\nresources: {cpus: 2}\n", "resources.cpus",
     ["unknown key", "cpus_per_trial"]),
    ("unknown-key-in-failure", "name: x\nfailure: {retries: 2}\n", "failure.retries", ["unknown key"]),
    ("unknown-key-in-parameter",
     "name: x\nparameters:\n  alpha: {distribution: uniform, min: 0.5, max: 1, step: 0.1}\n",
     "parameters.alpha.step", ["unknown key"]),
    ("misspelled-parameter-path", "name: x\nparameters:\n  optimiser.lr: {distribution: choice, values: [0.1]}\n",
     "parameters.optimiser.lr", ["unknown parameter path", "did you mean optimizer.lr"]),
    ("misspelled-parameter-path-2", "name: x\nparameters:\n  rinv_step: {distribution: values, values: [1]}\n",
     "parameters.rinv_step", ["unknown parameter path", "rinv_steps"]),
    ("seed-as-parameter", "name: x\nparameters:\n  seed: {distribution: values, values: [1, 2]}\n",
     "parameters.seed", ["search.seeds"]),
    ("seed-in-base", "name: x\nbase: {seed: 3}\n", "base.seed", ["search.seeds"]),
    ("both-seeds-and-repeats", "name: x\nsearch: {seeds: [0, 1], repeats: 2}\n",
     "search.repeats", ["either search.seeds or search.repeats"]),
    ("duplicate-seed", "name: x\nsearch: {seeds: [0, 1, 0]}\n", "search.seeds[2]", ["duplicate"]),
    ("negative-seed", "name: x\nsearch: {seeds: [0, -1]}\n", "search.seeds[1]", ["greater than or equal to 0"]),
    ("reduction-factor-below-2", "name: x\nearly_stop: {enabled: true, reduction_factor: 1.5}\n",
     "early_stop.reduction_factor", ["greater than or equal to 2"]),
    ("grace-period-above-max-t", "name: x\nbase: {epochs: 2}\nearly_stop: {enabled: true, grace_period: 3}\n",
     "early_stop.grace_period", ["<= max_t (2)"]),
    ("negative-cpus", "name: x\nresources: {cpus_per_trial: -1}\n", "resources.cpus_per_trial", ["greater than 0"]),
    ("negative-gpus", "name: x\nresources: {gpus_per_trial: -0.5}\n", "resources.gpus_per_trial",
     ["greater than or equal to 0"]),
    ("fractional-gpus-above-one", "name: x\nresources: {gpus_per_trial: 1.5}\n", "resources.gpus_per_trial",
     ["whole number"]),
    ("max-failures-below-minus-one", "name: x\nfailure: {max_failures: -2}\n", "failure.max_failures",
     ["greater than or equal to -1"]),
    ("missing-name", "base: {epochs: 2}\n", "name", ["required"]),
    ("empty-name", "name: '  '\n", "name", ["empty"]),
    ("name-too-long", f"name: {'n' * 201}\n", "name", ["200"]),
    ("name-not-printable", 'name: "a\\nb"\n', "name", ["printable"]),
    ("bad-search-method", "name: x\nsearch: {method: bayes}\n", "search.method", ["'grid', 'random' or 'optuna'"]),
    ("bad-mode", "name: x\nsearch: {mode: maximize}\n", "search.mode", ["'max' or 'min'"]),
    ("bad-metric", "name: x\nsearch: {metric: 'valid acc'}\n", "search.metric", ["metric name"]),
    ("uniform-on-integer-field", "name: x\nparameters:\n  rinv_steps: {distribution: uniform, min: 1, max: 3}\n",
     "parameters.rinv_steps.distribution", ["integer field", "randint"]),
    ("loguniform-on-integer-field",
     "name: x\nparameters:\n  batch_size: {distribution: loguniform, min: 16, max: 256}\n",
     "parameters.batch_size.distribution", ["integer field"]),
    ("range-on-non-numeric-field", "name: x\nparameters:\n  rule: {distribution: randint, min: 1, max: 2}\n",
     "parameters.rule.distribution", ["not numeric"]),
    ("randint-float-bounds", "name: x\nparameters:\n  rinv_steps: {distribution: randint, min: 1.5, max: 3}\n",
     "parameters.rinv_steps.min", ["valid integer"]),
    ("invalid-choice-value", "name: x\nparameters:\n  activation: {distribution: choice, values: [tanh, swish]}\n",
     "parameters.activation.values[1]", ["'tanh'"]),
    ("boolean-for-number", "name: x\nparameters:\n  epochs: {distribution: values, values: [true, 2]}\n",
     "parameters.epochs.values[0]", ["boolean"]),
    ("duplicate-value", "name: x\nparameters:\n  rule: {distribution: values, values: [bp, dtp, bp]}\n",
     "parameters.rule.values[2]", ["duplicate of values[0]"]),
    ("empty-values", "name: x\nparameters:\n  rule: {distribution: values, values: []}\n",
     "parameters.rule.values", ["at least 1"]),
    ("inconsistent-value", "name: x\nbase: {mode: autoencoder}\n"
     "parameters:\n  loss: {distribution: values, values: [l2, softmax_ce]}\n",
     "parameters.loss.values[1]", ["needs mode classification"]),
    ("missing-distribution", "name: x\nparameters:\n  alpha: {min: 0.5, max: 1}\n",
     "parameters.alpha.distribution", ["required", "loguniform"]),
    ("unknown-distribution", "name: x\nparameters:\n  alpha: {distribution: normal, min: 0.5, max: 1}\n",
     "parameters.alpha.distribution", ["unknown distribution 'normal'"]),
    ("fixed-value-as-parameter", "name: x\nparameters:\n  alpha: 0.5\n", "parameters.alpha",
     ["explicit distribution", "base"]),
    ("parameters-not-a-mapping", "name: x\nparameters: [alpha]\n", "parameters", ["mapping", "list"]),
    ("values-with-optuna", "name: x\nsearch: {method: optuna}\n"
     "parameters:\n  rule: {distribution: values, values: [bp, dtp]}\n",
     "parameters.rule.distribution", ["optuna", "choice"]),
    ("several-seeds-with-optuna", "name: x\nsearch: {method: optuna, seeds: [0, 1]}\n"
     "parameters:\n  rule: {distribution: choice, values: [bp, dtp]}\n",
     "search.seeds", ["optuna", "single seed"]),
    ("repeats-with-optuna", "name: x\nsearch: {method: optuna, repeats: 3}\n", "search.repeats", ["single seed"]),
    ("list-choice-with-optuna", "name: x\nsearch: {method: optuna}\n"
     "parameters:\n  hidden: {distribution: choice, values: [[32], [64, 64]]}\n",
     "parameters.hidden.values[0]", ["scalars"]),
    ("base-unknown-key", "name: x\nbase: {epoch: 3}\n", "base.epoch", ["unknown key", "did you mean epochs?"]),
    ("base-dotted-key", "name: x\nbase: {optimizer.lr: 0.1}\n", "base.optimizer.lr", ["nested"]),
    ("base-nested-invalid", "name: x\nbase: {optimizer: {lr: -1}}\n", "base.optimizer.lr", ["greater than 0"]),
    ("base-nested-unknown-key", "name: x\nbase: {optimizer: {lrate: 0.1}}\n", "base.optimizer.lrate",
     ["unknown key"]),
    ("base-not-a-mapping", "name: x\nbase: [1, 2]\n", "base", ["mapping", "list"]),
    ("section-not-a-mapping", "name: x\nsearch: grid\n", "search", ["mapping", "string"]),
    ("too-many-trials", "name: x\nsearch: {num_samples: 100000, repeats: 2}\n", "search.num_samples",
     ["200000 trials", "limit"]),
    # The document itself.
    ("empty-file", "", DOCUMENT, ["spec is empty"]),
    ("only-whitespace", "   \n\n", DOCUMENT, ["spec is empty"]),
    ("only-comments", "# nothing here\n", DOCUMENT, ["spec is empty"]),
    ("only-null", "~\n", DOCUMENT, ["spec is empty"]),
    ("yaml-list", "- name: x\n- name: y\n", DOCUMENT, ["mapping", "list"]),
    ("yaml-scalar", "just a string\n", DOCUMENT, ["mapping", "string"]),
    ("yaml-number", "42\n", DOCUMENT, ["mapping", "number"]),
    ("python-tag", "name: !!python/object/apply:os.system ['echo pwned']\n", DOCUMENT,
     ["line 1, column 7", "python/object/apply:os.system", "not allowed"]),
    ("python-name-tag", "name: x\nbase: !!python/name:os.system\n", DOCUMENT, ["line 2", "not allowed"]),
    ("local-tag", "name: !secret x\n", DOCUMENT, ["tag !secret is not allowed"]),
    ("alias-bomb",
     "a: &a ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol']\n"
     "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "name: x\n",
     DOCUMENT, ["line 1, column 4", "aliases are not allowed"]),
    ("alias-without-anchor", "name: x\nbase: *nothing\n", DOCUMENT, ["aliases are not allowed"]),
    ("yaml-syntax-error", "name: x\nbase:\n  epochs: 3\n    batch_size: 4\n", DOCUMENT,
     ["line 4, column 15", "YAML syntax error"]),
    ("yaml-unclosed-flow", "name: x\nbase: {epochs: 3\n", DOCUMENT, ["line 3", "YAML syntax error"]),
    ("yaml-tab-indent", "name: x\n\tbase: {}\n", DOCUMENT, ["line 2, column 1", "YAML syntax error"]),
    ("multiple-documents", "name: x\n---\nname: y\n", DOCUMENT, ["line 2", "single YAML document"]),
    ("duplicate-key", "name: x\nbase: {epochs: 2}\nname: y\n", DOCUMENT, ["line 3, column 1", "duplicate key 'name'"]),
    ("deep-nesting", "name: x\nbase: " + "[" * 3000 + "\n", DOCUMENT, ["nested too deeply"]),
    ("huge-document", "name: x\ndescription: " + "x" * (1 << 20) + "\n", DOCUMENT, ["larger than 1 MiB"]),
]


@pytest.mark.parametrize("text,path,needles", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_names_the_field(text, path, needles):
    reason = reason_at(text, path)
    for needle in needles:
        assert needle in reason, f"{path}: {reason!r} does not mention {needle!r}"


def test_at_least_twenty_kinds_of_invalid_spec():
    assert len({c[0] for c in INVALID}) >= 20


def test_all_errors_are_reported_together_one_per_line():
    text = """\
    name: x
    search: {method: bayes, num_samples: 0}
    resources: {cpus_per_trial: -1}
    early_stop: {reduction_factor: 1}
    """
    errors = errors_of(text)
    paths = {e.path for e in errors}
    assert {"search.method", "search.num_samples", "resources.cpus_per_trial",
            "early_stop.reduction_factor"} <= paths
    with pytest.raises(SpecError) as info:
        SweepSpec.from_yaml(textwrap.dedent(text))
    lines = str(info.value).splitlines()
    assert len(lines) == len(errors)
    assert all(": " in line for line in lines)
    assert "search.method: Input should be 'grid', 'random' or 'optuna'" in lines


def test_several_bad_values_each_reported_at_their_index():
    errors = errors_of("""\
    name: x
    parameters:
      rule: {distribution: values, values: [bp, nope, dtp, nada]}
      optimizer.lr: {distribution: loguniform, min: 1.0e-4, max: 50}
    """)
    assert [e.path for e in errors] == ["parameters.rule.values[1]", "parameters.rule.values[3]",
                                        "parameters.optimizer.lr.max"]


def test_spec_error_is_a_value_error_and_pickles():
    err = SpecError([FieldError("a.b", "bad"), FieldError("c[0]", "worse")])
    assert isinstance(err, ValueError)
    assert str(err) == "a.b: bad\nc[0]: worse"
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == err.errors and str(again) == str(err)


def test_huge_file_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("name: x\ndescription: " + "x" * (2 << 20) + "\n")
    with pytest.raises(SpecError) as info:
        SweepSpec.from_file(big)
    assert info.value.errors[0].path == DOCUMENT
    assert "larger than 1 MiB" in info.value.errors[0].reason


def test_missing_file():
    with pytest.raises(SpecError) as info:
        load_spec("does/not/exist.yaml")
    assert info.value.errors[0].path == DOCUMENT and "cannot read" in info.value.errors[0].reason


def test_model_validate_raises_pydantic_error_with_the_same_messages():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate({"name": "x", "parameters": {"optimiser.lr": {"distribution": "choice",
                                                                              "values": [0.1]}}})
    assert "did you mean optimizer.lr" in str(info.value)


# ---- valid specs ------------------------------------------------------------------------------


def test_smoke_config_loads():
    spec = load_spec(SMOKE)
    assert spec.name and spec.search.method == "grid"
    assert spec.search.max_concurrent_trials == 2
    assert spec.parameters["rule"].values == ["bp", "lstp", "rlstp", "dtp"]
    assert spec.seeds == [0, 1]
    assert spec.n_trials() == 8 == len(spec.expand())
    cfg = spec.trial_config({"rule": "bp", "seed": 1})
    assert cfg.dataset in ("spiral", "xor") and cfg.hidden == [32, 32] and cfg.activation == "tanh"
    assert (cfg.epochs, cfg.batch_size, cfg.seed) == (3, 50, 1)
    # load_spec also takes a path as a string.
    assert load_spec(str(SMOKE)) == spec


def test_seed_search_config_loads():
    spec = load_spec(SEED_SEARCH)
    assert spec.search.method == "random" and spec.search.num_samples == 8
    p = spec.parameters
    assert p["rule"].distribution == "values" and p["rule"].values == ["bp", "lstp", "rlstp", "dtp"]
    assert (p["gamma"].distribution, p["gamma"].min, p["gamma"].max) == ("loguniform", 1e-6, 1.0)
    assert (p["alpha"].distribution, p["alpha"].min, p["alpha"].max) == ("uniform", 0.5, 1.0)
    assert (p["noise"].distribution, p["noise"].min, p["noise"].max) == ("loguniform", 1e-4, 1e2)
    for path in ("optimizer.lr", "inverse_optimizer.lr"):
        assert (p[path].distribution, p[path].min, p[path].max) == ("loguniform", 1e-4, 1e-1)
    assert (p["rinv_lr"].distribution, p["rinv_lr"].min, p["rinv_lr"].max) == ("loguniform", 1e-4, 10.0)
    assert (p["rinv_steps"].distribution, p["rinv_steps"].min, p["rinv_steps"].max) == ("randint", 1, 4)
    cfg = spec.trial_config({"rule": "dtp"})
    assert cfg.dataset == "mnist" and cfg.mode == "classification"
    assert cfg.hidden == [240] * 4 and cfg.activation == "relu" and cfg.batch_size == 100
    assert spec.n_trials() == 4 * 8
    # Every previewed trial is a valid TrialConfig.
    for trial in spec.expand(sample_seed=3):
        spec.trial_config({**trial["params"], "seed": trial["seed"]})


EXAMPLE = """\
name: tp-rules-mnist
description: "four rules, three seeds"
base:
  dataset: mnist
  epochs: 5
parameters:
  rule: {distribution: values, values: [bp, lstp, rlstp, dtp]}
  optimizer.lr: {distribution: loguniform, min: 1.0e-4, max: 1.0e-2}
  rinv_steps: {distribution: randint, min: 1, max: 4}
  gamma: {distribution: choice, values: [0.001, 0.01]}
  alpha: {distribution: quniform, min: 0.5, max: 1.0, q: 0.05}
search:
  method: grid
  num_samples: 2
  metric: valid_accuracy
  mode: max
  max_concurrent_trials: 2
  time_budget_s: null
  seeds: [0, 1, 2]
early_stop:
  enabled: true
  grace_period: 1
  reduction_factor: 2
  max_t: null
resources: {cpus_per_trial: 1, gpus_per_trial: 0.5}
failure: {max_failures: -1}
priority: 3
"""


def test_expand_counts_and_shape():
    spec = SweepSpec.from_yaml(EXAMPLE)
    trials = spec.expand()
    assert spec.n_trials() == len(trials) == 4 * 3 * 2
    assert [t["trial"] for t in trials] == list(range(24))
    for t in trials:
        assert set(t) == {"trial", "params", "seed"}
        assert list(t["params"]) == ["rule", "optimizer.lr", "rinv_steps", "gamma", "alpha"]
        assert 1e-4 <= t["params"]["optimizer.lr"] <= 1e-2
        assert t["params"]["gamma"] in (0.001, 0.01)
        assert 0.5 <= t["params"]["alpha"] <= 1.0
        assert abs(t["params"]["alpha"] / 0.05 - round(t["params"]["alpha"] / 0.05)) < 1e-9
    # Every (rule, seed) grid point appears num_samples times.
    from collections import Counter

    counts = Counter((t["params"]["rule"], t["seed"]) for t in trials)
    assert set(counts.values()) == {2} and len(counts) == 12
    # Same preview for the same sample_seed; different draws for another.
    assert spec.expand(0) == trials
    assert spec.expand(1) != trials
    assert spec.max_t() == 5


def test_randint_bounds_are_inclusive():
    spec = SweepSpec.from_yaml("name: x\nparameters:\n  rinv_steps: {distribution: randint, min: 1, max: 4}\n"
                               "search: {num_samples: 400}\n")
    drawn = {t["params"]["rinv_steps"] for t in spec.expand()}
    assert drawn == {1, 2, 3, 4}


def test_repeats_and_default_seeds():
    assert SweepSpec.from_yaml("name: x\nsearch: {repeats: 3}\n").seeds == [0, 1, 2]
    spec = SweepSpec.from_yaml("name: x\n")
    assert spec.seeds == [0] and spec.n_trials() == 1
    assert spec.expand() == [{"trial": 0, "params": {}, "seed": 0}]


def test_optuna_counts_and_single_seed():
    spec = SweepSpec.from_yaml(textwrap.dedent("""\
        name: x
        search: {method: optuna, num_samples: 5, seeds: [7]}
        parameters:
          rule: {distribution: choice, values: [bp, dtp]}
          optimizer.lr: {distribution: loguniform, min: 1.0e-4, max: 1.0e-2}
        """))
    trials = spec.expand()
    assert spec.n_trials() == len(trials) == 5
    assert {t["seed"] for t in trials} == {7}


def test_trial_config_applies_per_rule_defaults():
    spec = SweepSpec.from_yaml(EXAMPLE)
    dtp = spec.trial_config({"rule": "dtp", "seed": 2})
    assert dtp.optimizer.lr == pytest.approx(0.01489)
    assert dtp.inverse_optimizer.lr == pytest.approx(0.00501)
    assert dtp.epochs == 5 and dtp.seed == 2
    bp = spec.trial_config({"rule": "bp"})
    assert bp.optimizer.lr == pytest.approx(RULE_DEFAULTS["bp"]["optimizer"]["lr"]) and bp.alpha == 1.0
    overridden = spec.trial_config({"rule": "dtp", "optimizer.lr": 0.003, "rinv_steps": 3})
    assert overridden.optimizer.lr == 0.003 and overridden.rinv_steps == 3
    assert overridden.optimizer.name == "rmsprop_centered"  # the rest of the rule's optimizer stays
    # base is not mutated by overrides
    assert spec.base == {"dataset": "mnist", "epochs": 5}


def test_trial_config_accepts_numpy_scalars_and_reports_paths():
    np = pytest.importorskip("numpy")
    spec = SweepSpec.from_yaml(EXAMPLE)
    cfg = spec.trial_config({"rule": "rlstp", "rinv_steps": np.int64(3), "gamma": np.float64(0.01),
                             "seed": np.int64(1)})
    assert cfg.rinv_steps == 3 and cfg.seed == 1 and type(cfg.rinv_steps) is int
    with pytest.raises(SpecError) as info:
        spec.trial_config({"optimizer.lr": -1.0})
    assert [e.path for e in info.value.errors] == ["optimizer.lr"]


def test_round_trip_yaml_and_model_dump():
    spec = SweepSpec.from_yaml(EXAMPLE)
    assert SweepSpec.from_yaml(spec.to_yaml()) == spec
    assert SweepSpec.model_validate(spec.model_dump()) == spec
    assert SweepSpec.from_dict(spec.model_dump(mode="json")) == spec
    for path in (SMOKE, SEED_SEARCH):
        s = load_spec(path)
        assert SweepSpec.from_yaml(s.to_yaml()) == s


def test_json_text_is_accepted():
    spec = load_spec('{"name": "j", "parameters": {"rule": {"distribution": "values", "values": ["bp", "dtp"]}},'
                     ' "search": {"repeats": 2}}')
    assert spec.n_trials() == 4


def test_yaml_12_floats_and_no_timestamps():
    spec = SweepSpec.from_yaml("name: 2024-01-01\n"
                               "parameters:\n  optimizer.lr: {distribution: loguniform, min: 1e-4, max: 1e-2}\n")
    assert spec.name == "2024-01-01"
    assert spec.parameters["optimizer.lr"].min == 1e-4


def test_quniform_and_qloguniform_ok():
    spec = SweepSpec.from_yaml("""\
name: q
parameters:
  alpha: {distribution: quniform, min: 0.5, max: 1.0, q: 0.05}
  optimizer.lr: {distribution: qloguniform, min: 0.001, max: 0.1, q: 0.001}
search: {num_samples: 50}
""")
    for t in spec.expand():
        spec.trial_config(t["params"])
        assert 0.001 <= t["params"]["optimizer.lr"] <= 0.1


def _check_quantized(values, lo: float, hi: float, q: float) -> None:
    assert all(lo <= v <= hi for v in values), [v for v in values if not lo <= v <= hi]
    # A multiple of q up to float rounding (0.003 is not exactly 3 * 0.001 in binary).
    off = [v for v in values if abs(v / q - round(v / q)) > 1e-9]
    assert not off, off
    assert len(set(values)) >= 10, sorted(set(values))  # drawn across the range, not pinned


def test_q_distributions_draw_multiples_of_q():
    """Both samplers, the dry-run preview's and Tune's (what trials get), return multiples of q
    within [min, max]; qloguniform also spreads over the decades, as a log scale should."""
    spec = SweepSpec.from_yaml("""\
name: q
parameters:
  alpha: {distribution: quniform, min: 0.5, max: 1.0, q: 0.05}
  optimizer.lr: {distribution: qloguniform, min: 0.001, max: 0.1, q: 0.001}
search: {num_samples: 300}
""")
    trials = spec.expand()
    previews = {path: [t["params"][path] for t in trials] for path in ("alpha", "optimizer.lr")}
    pytest.importorskip("ray.tune")
    from worker.search_space import to_param_space

    space = to_param_space(spec)
    drawn = {path: [float(v) for v in space[path].sample(size=300, random_state=0)]
             for path in ("alpha", "optimizer.lr")}
    for values in (previews, drawn):
        _check_quantized(values["alpha"], 0.5, 1.0, 0.05)
        _check_quantized(values["optimizer.lr"], 0.001, 0.1, 0.001)
        lr = values["optimizer.lr"]
        # Log-uniform over [0.001, 0.1]: about half the draws below 0.01 (uniform: ~9%).
        assert 0.3 < sum(v < 0.0105 for v in lr) / len(lr) < 0.7


def test_grid_points_run_longest_first_and_keep_the_spec_order_otherwise():
    spec = SweepSpec.from_yaml(EXAMPLE)  # rule: [bp, lstp, rlstp, dtp] x seeds [0, 1, 2]
    points = spec.grid_points()
    # By the rules' measured costs (tp_engine/rules: lstp 3.9, rlstp 3.6, dtp 2.5, bp 1 epoch of
    # bp); equal costs (a rule's seeds) keep the spec's order.
    assert [(p["rule"], p["seed"]) for p in points] == [
        (r, s) for r in ("lstp", "rlstp", "dtp", "bp") for s in (0, 1, 2)]
    # The dry run shows that order, repeated for each sample.
    trials = spec.expand()
    assert [(t["params"]["rule"], t["seed"]) for t in trials] == [(p["rule"], p["seed"]) for p in points] * 2

    # Epochs, training rows and the network's size count as much as the rule.
    spec = SweepSpec.from_yaml(textwrap.dedent("""\
        name: sizes
        base: {rule: dtp, dataset: mnist}
        parameters:
          epochs: {distribution: values, values: [2, 5]}
          subset: {distribution: values, values: [1000, 20000]}
          hidden: {distribution: values, values: [[16], [256, 256]]}
        search: {seeds: [0]}
        """))
    order = [(p["epochs"], p["subset"], tuple(p["hidden"])) for p in spec.grid_points()]
    assert order[0] == (5, 20000, (256, 256)) and order[-1] == (2, 1000, (16,))
    from tp_engine.cost import trial_cost

    costs = [trial_cost(spec.trial_config(p)) for p in spec.grid_points()]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)


def test_load_is_fast_and_imports_nothing_heavy():
    code = textwrap.dedent(f"""\
        import sys, time
        t0, c0 = time.perf_counter(), time.process_time()
        import worker.spec
        spec = worker.spec.load_spec({str(SEED_SEARCH)!r})
        spec.expand()
        worker.spec.load_spec({str(SMOKE)!r}).expand()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        heavy = sorted(m for m in ("ray", "tensorflow", "mlflow", "numpy", "optuna") if m in sys.modules)
        print(cpu, wall)
        print(",".join(heavy))
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    cpu, wall = map(float, out[0].split())
    # CPU time (about 0.5 s when idle) is the budget; wall time only gets a loose bound, because a
    # busy machine (parallel test runs) stretches it.
    assert cpu < 1.0, f"import + load + expand took {cpu:.2f} s of CPU"
    assert wall < 5.0
    assert out[1] == "", f"worker.spec imported {out[1]}"


# ---- search space (imports ray.tune) ----------------------------------------------------------


def test_to_param_space_types_and_keys():
    tune = pytest.importorskip("ray.tune")
    from ray.tune.search.sample import Categorical, Float, Integer

    from worker.search_space import to_param_space, to_scheduler, to_search_alg

    spec = SweepSpec.from_yaml(EXAMPLE)
    space = to_param_space(spec)
    # The grid (rule x seed) is one dimension of whole points, longest first; sampled ones stay.
    assert list(space) == ["optimizer.lr", "rinv_steps", "gamma", "alpha", "grid_point"]
    assert space["grid_point"] == tune.grid_search(spec.grid_points())
    assert isinstance(space["optimizer.lr"], Float)
    assert (space["optimizer.lr"].lower, space["optimizer.lr"].upper) == (1e-4, 1e-2)
    assert isinstance(space["rinv_steps"], Integer)
    assert (space["rinv_steps"].lower, space["rinv_steps"].upper) == (1, 5)  # Tune's upper is exclusive
    assert isinstance(space["gamma"], Categorical) and space["gamma"].categories == [0.001, 0.01]
    assert isinstance(space["alpha"], Float)
    assert to_search_alg(spec) is None
    scheduler = to_scheduler(spec)
    assert scheduler is not None and scheduler._max_t == 5

    optuna_spec = SweepSpec.from_yaml("name: o\nsearch: {method: optuna, num_samples: 4, max_concurrent_trials: 2}\n"
                                      "parameters:\n  rule: {distribution: choice, values: [bp, dtp]}\n")
    space = to_param_space(optuna_spec)
    assert space["seed"] == 0 and isinstance(space["rule"], Categorical)
    assert to_search_alg(optuna_spec) is not None
    assert to_scheduler(optuna_spec) is None


def test_trial_params_reads_both_layouts():
    pytest.importorskip("ray.tune")
    from worker.search_space import GRID_KEY, trial_params

    point = {"rule": "dtp", "lr_scale": 0.5, "seed": 2}
    # Now: the grid point nested under one key, sampled parameters beside it.
    assert trial_params({GRID_KEY: point, "optimizer.lr": 0.01}) == {**point, "optimizer.lr": 0.01}
    # A sweep started with the flat layout (resumed after an upgrade): unchanged.
    assert trial_params({**point, "optimizer.lr": 0.01}) == {**point, "optimizer.lr": 0.01}


def test_an_invalid_grid_combination_is_ordered_last_not_refused():
    # Each value is valid alone; autoencoder x softmax_ce is not. Ordering must not turn that
    # trial's own failure into a failed dry run or sweep start.
    spec = SweepSpec.from_yaml(textwrap.dedent("""\
        name: combo
        base: {dataset: xor, hidden: [8]}
        parameters:
          mode: {distribution: values, values: [autoencoder, classification]}
          loss: {distribution: values, values: [softmax_ce, l2]}
        search: {seeds: [0]}
        """))
    points = spec.grid_points()
    assert len(points) == 4
    assert (points[-1]["mode"], points[-1]["loss"]) == ("autoencoder", "softmax_ce")
    with pytest.raises(SpecError):
        spec.trial_config(points[-1])


def test_docs_state_every_rules_cost():
    """docs/rules.md's cost table is the rules' own figures (tp_engine/rules), every rule once."""
    from tp_engine.rules import RULES

    lines = (ROOT / "docs" / "rules.md").read_text().splitlines()
    at = lines.index("## Cost (`Rule.cost`)")
    header, _, row = [ln for ln in lines[at:] if ln.startswith("|")][:3]
    names = [c.strip().strip("`") for c in header.strip("|").split("|")][1:]
    costs = [float(c) for c in row.strip("|").split("|")[1:]]
    assert dict(zip(names, costs)) == {name: rule.cost for name, rule in RULES.items()}
    assert len(names) == len(RULES)
