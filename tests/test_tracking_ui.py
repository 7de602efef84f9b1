"""What a user sees first in the MLflow UI, against a real MLflow store: the experiment's kind is
model training, each trial's run names its data (Dataset column), the parent run's description
links the rule comparison and the sweep's trials (flat, best first, on the UI's runs side), and
the experiment's description gives the latest sweep's figures and those links. What a browser
shows of it: scripts/ui_screenshots.sh and docs/mlflow_ui.md."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pytest
from mlflow import MlflowClient

from worker import tracking
from worker.spec.sections import SearchConfig


def test_experiment_kind_is_model_training_unless_the_user_chose_one(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = tracking.experiment_id(c, "fresh")
    assert c.get_experiment(new).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    # An experiment made before the tag existed gets it; one whose kind a user set keeps it.
    old = c.create_experiment("older")
    assert tracking.TAG_EXPERIMENT_KIND not in c.get_experiment(old).tags
    assert tracking.experiment_id(c, "older") == old
    assert c.get_experiment(old).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    mine = c.create_experiment("mine", tags={tracking.TAG_EXPERIMENT_KIND: "finetuning"})
    assert tracking.experiment_id(c, "mine") == mine
    assert c.get_experiment(mine).tags[tracking.TAG_EXPERIMENT_KIND] == "finetuning"


def test_parent_run_description_points_at_the_comparison(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(c, "e")
    run_id = tracking.parent_run(c, exp, "sw-0123456789ab", "name: e\n", "my study of rules")
    note = c.get_run(run_id).data.tags[tracking.TAG_NOTE]
    assert note.startswith("my study of rules\n\n")
    assert "sw-0123456789ab" in note and "comparison/comparison.md" in note
    # Without a metric, the trials are sorted by a spec's default one: sorted by time, the UI
    # would nest them under the parent again.
    assert _query(_links(note)["table"])[1]["orderByKey"] == f"metrics.`{SearchConfig().metric}`"
    with pytest.raises(ValueError):
        tracking.ui_link(exp, trials_of="sw-0123456789ab")


def test_dataset_input_names_the_data_and_tells_different_data_apart(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(c, "e")
    rng = np.random.default_rng(0)
    x, y = rng.random((300, 20), dtype=np.float32), rng.integers(0, 10, 300)
    digests = []
    for features in (x, x.copy(), x[:200]):
        run = c.create_run(exp)
        digests.append(tracking.log_dataset(c, run.info.run_id, "mnist", features, y[: len(features)]))
        (inp,) = c.get_run(run.info.run_id).inputs.dataset_inputs
        assert inp.dataset.name == "mnist" and inp.dataset.digest == digests[-1]
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
    assert digests[0] == digests[1] != digests[2]  # same rows, same digest; a subset differs


def _links(markdown: str) -> dict[str, str]:
    """label -> target of the Markdown links in a description."""
    return dict(re.findall(r"\[([^\]]+)\]\(([^)\s]+)\)", markdown))


def _query(link: str) -> tuple[str, dict[str, str]]:
    path, _, q = link.partition("?")
    return path, {k: v[0] for k, v in parse_qs(q).items()}


def _trial(c, exp, parent_id, sweep_id, trial_id, acc):
    run = c.create_run(exp, run_name=trial_id, tags={
        tracking.TAG_SWEEP: sweep_id, tracking.TAG_TRIAL: trial_id, tracking.TAG_KIND: tracking.KIND_TRIAL,
        tracking.TAG_PARENT: parent_id})
    c.log_metric(run.info.run_id, "valid_accuracy", acc)
    return run.info.run_id


@pytest.mark.parametrize("mode", ["max", "min"])
def test_trials_link_lists_the_sweeps_trials_flat_best_first(tmp_path, mode):
    """The parent's 'table' and 'charts' links, run as the UI runs them (its search filter and
    order), give this sweep's trials and nothing else, best first; every link opens on the runs
    side of the UI, whatever a new browser's sidebar switch says."""
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(c, "e")
    parent = tracking.parent_run(c, exp, "sw-aaaaaaaaaaaa", "name: e\n", metric="valid_accuracy", mode=mode)
    mine = {_trial(c, exp, parent, "sw-aaaaaaaaaaaa", f"t{i}", acc): acc for i, acc in enumerate((0.5, 0.9, 0.7))}
    other = tracking.parent_run(c, exp, "sw-bbbbbbbbbbbb", "name: e\n", metric="valid_accuracy", mode=mode)
    _trial(c, exp, other, "sw-bbbbbbbbbbbb", "t0", 0.99)
    links = _links(c.get_run(parent).data.tags[tracking.TAG_NOTE])
    for label in ("table", "charts"):
        path, q = _query(links[label])
        assert path == f"#/experiments/{exp}/runs" and q["workflowType"] == "machine_learning"
        assert q["orderByKey"] == "metrics.`valid_accuracy`" and q["orderByAsc"] == ("true" if mode == "min" else "false")
        order = f"{q['orderByKey']} {'ASC' if q['orderByAsc'] == 'true' else 'DESC'}"
        got = [r.info.run_id for r in c.search_runs([exp], filter_string=q["searchFilter"], order_by=[order])]
        assert got == sorted(mine, key=mine.get, reverse=mode == "max")
    assert _query(links["charts"])[1]["compareRunsMode"] == "CHART" and "compareRunsMode" not in _query(links["table"])[1]


def test_comparison_links_name_the_parent_runs_artifacts(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(c, "e")
    parent = tracking.parent_run(c, exp, "sw-0123456789ab", "name: e\n", metric="valid_accuracy")
    c.log_text(parent, "| rule |\n", "comparison/comparison.md")  # as worker.report.publish leaves it
    links = _links(c.get_run(parent).data.tags[tracking.TAG_NOTE])
    prefix = f"#/experiments/{exp}/runs/{parent}/artifacts/"
    for label, kind in (("the table", "file"), ("the plots", "dir")):
        path, q = _query(links[label])
        assert path.startswith(prefix) and q == {"workflowType": "machine_learning"}
        artifact = path[len(prefix):]
        listed = {f.path: f.is_dir for f in c.list_artifacts(parent, str(Path(artifact).parent).strip("."))}
        assert listed.get(artifact) is (kind == "dir"), (artifact, listed)


def test_experiment_description_is_the_latest_sweeps_unless_a_user_wrote_one(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(c, "e")
    note = {}
    for sweep in ("sw-aaaaaaaaaaaa", "sw-bbbbbbbbbbbb"):
        parent = tracking.parent_run(c, exp, sweep, "name: e\n", metric="valid_accuracy")
        links = tracking.sweep_links(exp, parent, sweep, "valid_accuracy")
        note[sweep] = tracking.experiment_note(sweep, "succeeded", 4, 4, "valid_accuracy", {"bp": 0.9483, "dtp": 0.94}, links)
        assert tracking.describe_experiment(c, exp, note[sweep])
        assert c.get_experiment(exp).tags[tracking.TAG_NOTE] == note[sweep]  # the latest replaces ours
    head, _, figures = note["sw-bbbbbbbbbbbb"].partition("\n\n")
    # Folded on the runs page to about a line: the links are in it, the figures after.
    assert head.startswith("Latest sweep sw-bbbbbbbbbbbb (succeeded, 4 trials): [rule comparison](")
    assert len(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", head)) < 100  # as rendered: the links' labels
    assert figures == "valid_accuracy, mean over seeds of each rule's best config: bp 0.9483, dtp 0.9400."
    partial = tracking.experiment_note("sw-cccccccccccc", "interrupted", 1, 4, "valid_accuracy", {"bp": 0.9}, links)
    assert partial.startswith("Latest sweep sw-cccccccccccc (interrupted, 1 of 4 trials done): ")
    got = _links(note["sw-bbbbbbbbbbbb"])
    assert got["rule comparison"] == links["comparison"] and got["trials"] == links["trials"]
    c.set_experiment_tag(exp, tracking.TAG_NOTE, "my notes")
    assert not tracking.describe_experiment(c, exp, note["sw-aaaaaaaaaaaa"])
    assert c.get_experiment(exp).tags[tracking.TAG_NOTE] == "my notes"


def test_a_sweep_describes_its_experiment_with_its_figures_and_links(tmp_path, monkeypatch):
    """A real sweep (Ray Tune, two trials on xor) leaves the experiment's description: its
    figures, per rule as in its comparison, and links to its own comparison and trials."""
    import ray

    from worker.spec import SweepSpec
    from worker.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "sweep_data"))
    spec = SweepSpec.from_yaml(
        "name: tp-test-ui\n"
        "base: {dataset: xor, hidden: [8], epochs: 2, batch_size: 50, subset: 600, diag_size: 100}\n"
        "parameters:\n  rule: {distribution: values, values: [bp, dtp]}\n"
        "search: {method: grid, seeds: [0], max_concurrent_trials: 2}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    c.create_experiment(spec.name, artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        res = run_sweep(spec, uri, str(tmp_path / "tune"), num_cpus=2)
    finally:
        ray.shutdown()
    assert res.state == "succeeded"
    note = c.get_experiment(res.experiment_id).tags[tracking.TAG_NOTE]
    figures = ", ".join(f"{r['rule']} {r['metric_mean']:.4f}" for r in res.table)
    assert note.startswith(f"Latest sweep {res.sweep_id} (succeeded, 2 trials): ")
    assert note.endswith(f"\n\nvalid_accuracy, mean over seeds of each rule's best config: {figures}.")
    links = _links(note)
    path, _ = _query(links["rule comparison"])
    assert path == f"#/experiments/{res.experiment_id}/runs/{res.parent_run_id}/artifacts/comparison/comparison.md"
    assert "comparison/comparison.md" in {f.path for f in c.list_artifacts(res.parent_run_id, "comparison")}
    _, q = _query(links["trials"])
    trials = c.search_runs([res.experiment_id], filter_string=q["searchFilter"], order_by=["metrics.`valid_accuracy` DESC"])
    assert sorted(r.data.tags[tracking.TAG_RULE] for r in trials) == ["bp", "dtp"]
    assert {r.data.tags[tracking.TAG_PARENT] for r in trials} == {res.parent_run_id}
