"""The rule comparison, grouped by rule and by the grid parameters a spec names
(`report: {group_by: [dataset]}`), on child runs written straight to a SQLite MLflow store (no Ray):
row order from the rule registry, published figures keyed by rule or by group, every trial's
dataset in record.json, one plot panel per dataset, and paths a reader can use.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from service import report as report_cli  # noqa: E402
from service.queue import SweepQueue, SweepState  # noqa: E402
from worker import tracking  # noqa: E402
from worker.lifecycle import SweepFolder  # noqa: E402
from worker.report import compare_sweep, rule_order  # noqa: E402
from worker.spec import SpecError, SweepSpec  # noqa: E402

pytestmark = pytest.mark.timeout(300)

RULES = ["lstp", "dtp", "bp"]  # not in registry order: the table must put them in it
DATASETS = ["xor", "spiral"]  # the grid's order, which the table keeps
SEEDS = [0, 1]
SPEC = f"""\
name: grouped
base: {{dataset: spiral, hidden: [8], epochs: 2}}
parameters:
  rule: {{distribution: values, values: {json.dumps(RULES)}}}
  dataset: {{distribution: values, values: {json.dumps(DATASETS)}}}
search: {{method: grid, metric: valid_accuracy, mode: max, seeds: {json.dumps(SEEDS)}}}
"""
GROUPED = SPEC + """\
report: {group_by: [dataset]}
published: {source: "a paper", metric: test_error, values: {dtp/xor: 0.1, bp: 0.2}}
"""


def accuracy(rule: str, dataset: str, seed: int) -> float:
    return 0.5 + 0.1 * RULES.index(rule) + 0.2 * DATASETS.index(dataset) + 0.01 * seed


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep's parent run and its 12 child runs, as the trainable logs them."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "grouped")
    parent = tracking.parent_run(c, exp, "sw-00000000000a", SPEC)
    spec = SweepSpec.from_yaml(SPEC)
    n = 0
    for rule in RULES:
        for dataset in DATASETS:
            for seed in SEEDS:
                cfg = spec.trial_config({"rule": rule, "dataset": dataset, "seed": seed})
                run_id, _ = tracking.child_run(c, exp, parent, "sw-00000000000a", f"t{n}",
                                               {"rule": rule, "dataset": dataset, "seed": str(seed)},
                                               cfg.flat(), f"{rule}-{dataset}-s{seed}")
                n += 1
                acc = accuracy(rule, dataset, seed)
                for epoch in (1, 2):
                    tracking.log_metrics(c, run_id, {"valid_accuracy": acc - 0.1 / epoch, "test_accuracy": acc - 0.02,
                                                     "seconds_per_epoch": 1.5, "angle_bp/1": 30.0 + epoch,
                                                     "angle_bp/2": 20.0}, step=epoch)
                tracking.log_metrics(c, run_id, {"final/epochs": 2, "final/best_epoch": 2,
                                                 "final/best_valid_accuracy": acc - 0.05,
                                                 "final/test_accuracy_at_best_valid": acc - 0.02,
                                                 "final/seconds_per_epoch": 1.5}, step=2)
                c.set_tag(run_id, tracking.TAG_STATUS, "completed")
                c.set_terminated(run_id, "FINISHED")
    return {"uri": uri, "client": c, "exp": exp, "parent": parent, "dir": tmp}


def test_default_groups_by_rule_in_registry_order(store):
    cmp = compare_sweep(store["client"], store["exp"], store["parent"], SweepSpec.from_yaml(SPEC))
    order = [r for r in rule_order() if r in RULES]
    assert [r["rule"] for r in cmp.rows] == order and order[0] == "bp"
    # Rows keep the keys they always had: reports made before grouping existed read the same.
    assert list(cmp.rows[0]) == ["rule", "trials", "seeds", "best_config", "metric", "metric_mean", "metric_std",
                                 "test_mean", "test_std", "best_trial_run_id", "best_trial_metric", "epochs",
                                 "seconds_per_epoch", "train_seconds", "statuses"]
    assert all(r["trials"] == 4 and r["seeds"] == 2 for r in cmp.rows)
    assert cmp.to_markdown().splitlines()[0].startswith("| rule | trials | seeds | best config |")
    assert {tr.dataset for tr in cmp.trials} == set(DATASETS)


def test_grouped_by_dataset(store):
    cmp = compare_sweep(store["client"], store["exp"], store["parent"], SweepSpec.from_yaml(GROUPED))
    order = [r for r in rule_order() if r in RULES]
    assert [(r["dataset"], r["rule"]) for r in cmp.rows] == [(d, r) for d in DATASETS for r in order]
    for r in cmp.rows:
        assert r["group"] == f"{r['rule']}/{r['dataset']}" and r["group_by"] == "dataset"
        assert r["trials"] == r["seeds"] == 2 and r["best_config"] == ""  # the dataset is no config choice
        expected = sum(accuracy(r["rule"], r["dataset"], s) - 0.05 for s in SEEDS) / 2
        assert r["metric_mean"] == pytest.approx(expected)
    md = cmp.to_markdown().splitlines()
    assert md[0].startswith("| rule | dataset | trials |") and "| published test error |" in md[0]
    cells = {(line.split("|")[1].strip(), line.split("|")[2].strip()): line for line in md[2:] if line.startswith("| `")}
    assert "| 10.00% |" in cells["`dtp`", "xor"] and "| – |" in cells["`dtp`", "spiral"]  # keyed by group
    assert "| 20.00% |" in cells["`bp`", "xor"] and "| 20.00% |" in cells["`bp`", "spiral"]  # keyed by rule
    assert "| – |" in cells["`lstp`", "xor"]
    assert set(cmp.curves) == set(cmp.angles) == {f"{r}/{d}" for r in RULES for d in DATASETS}


def test_spec_group_by_and_published_keys_are_validated():
    def errors(text: str) -> dict[str, str]:
        with pytest.raises(SpecError) as e:
            SweepSpec.from_yaml(text)
        return {fe.path: fe.reason for fe in e.value.errors}

    got = errors(SPEC + "report: {group_by: [dataset, rule, hidden, dataset]}\n")
    assert set(got) == {"report.group_by[1]", "report.group_by[2]", "report.group_by[3]"}
    assert "not a grid parameter" in got["report.group_by[2]"]
    got = errors(SPEC + "report: {group_by: [dataset]}\n"
                        "published: {source: s, values: {dtp/mnist: 0.1, bp/xor/x: 0.2}}\n")
    assert "'mnist' is not a value of dataset" in got["published.values.dtp/mnist"]
    assert "rule/dataset" in got["published.values.bp/xor/x"]
    assert "published.values.nope" in errors(SPEC + "published: {source: s, values: {nope: 0.1}}\n")


def _sweep_record(store, data_dir: Path, spec_text: str) -> str:
    """The queue record and started.json of the sweep in ``store``, as a finished run leaves them
    (its MLflow store the default one of the directory it ran from)."""
    with SweepQueue(f"sqlite:///{data_dir / 'queue.db'}") as q:
        rec = q.submit("grouped", spec_text)
        q.claim_next()
        q.update(rec.id, mlflow_experiment_id=store["exp"], mlflow_parent_run_id=store["parent"])
        q.mark(rec.id, SweepState.SUCCEEDED)
    SweepFolder(data_dir, rec.id).write_started(store["exp"], store["parent"], store["uri"], "grouped",
                                                set_by_user=False)
    return rec.id


def test_report_cli_grouped_record_plots_and_paths(store, tmp_path, monkeypatch, capsys):
    for k in ("SWEEP_SERVICE_URL", "SWEEP_DB_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    sid = _sweep_record(store, tmp_path / "data", SPEC)  # ran without grouping ...
    (tmp_path / "grouped.yaml").write_text(GROUPED)  # ... reported with it: a report-only change
    host = tmp_path / "docs" / "HOST.md"
    host.parent.mkdir()
    host.write_text("<!-- report:grouped:start -->\n<!-- report:grouped:end -->\n")
    argv = [sid, "--spec", "grouped.yaml", "--outdir", str(tmp_path / "results" / "g"), "--into", str(host)]
    assert report_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "…" not in out and all(len(line) <= 80 for line in out.splitlines())
    assert "dtp/xor 10.00% (ours 41.50% ± 0.71)" in " ".join(out.split())  # published figures, on their own lines
    assert "results/g/learning_curves.png" in out and str(tmp_path) not in out

    outdir = tmp_path / "results" / "g"
    rec = json.loads((outdir / "record.json").read_text())
    assert rec["group_by"] == ["dataset"] and len(rec["trials"]) == len(RULES) * len(DATASETS) * len(SEEDS)
    assert all(t["group"] == f"{t['rule']}/{t['dataset']}" and t["dataset"] in DATASETS for t in rec["trials"])
    assert rec["published"]["values"] == {"dtp/xor": 0.1, "bp": 0.2}
    # The store is the default one of the directory the sweep ran from: shown relative to it.
    assert rec["mlflow"]["tracking_uri"] == "sqlite:///mlflow.db"
    assert str(tmp_path) not in rec["report_command"]
    assert rec["report_command"].endswith("--outdir results/g --into docs/HOST.md")

    text = host.read_text()
    assert str(tmp_path) not in text and "(sqlite:///mlflow.db)" in text
    assert "](../results/g/learning_curves.png)" in text and "](../results/g/published.png)" in text
    assert "| rule | dataset |" in text

    from matplotlib.image import imread

    one_panel = imread(outdir / "published.png").shape[1]
    assert imread(outdir / "learning_curves.png").shape[1] == 2 * one_panel  # a panel per dataset
    assert imread(outdir / "angle_bp.png").shape[1] == imread(outdir / "learning_curves.png").shape[1]

    # A spec that changes the trials is still refused.
    (tmp_path / "other.yaml").write_text(GROUPED.replace("epochs: 2", "epochs: 3"))
    assert report_cli.main([sid, "--spec", "other.yaml", "--outdir", "r2"]) == 2
    assert "differs in: base" in capsys.readouterr().err


def test_shown_uri():
    from service.report import REPO, shown_uri

    assert shown_uri("http://u:secret@mlflow:5000", True) == "http://u:***@mlflow:5000"
    assert shown_uri("sqlite:////data/x.db", True) == "sqlite:////data/x.db"  # as the user set it
    assert shown_uri(f"sqlite:///{REPO / 'mlflow.db'}", True) == f"sqlite:///{REPO / 'mlflow.db'}"
    assert shown_uri(f"sqlite:///{REPO / 'mlflow.db'}", None) == "sqlite:///mlflow.db"
    assert shown_uri("sqlite:////tmp/fresh/mlflow.db", None) == "sqlite:///mlflow.db"  # a fresh clone's default
    assert shown_uri("sqlite:////tmp/fresh/runs.db", False) == "sqlite:///runs.db"
    assert shown_uri("sqlite:////tmp/fresh/runs.db", None) == "sqlite:////tmp/fresh/runs.db"  # cannot tell
