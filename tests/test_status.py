"""One sweep lifecycle for both modes, and what `status` shows of it.

The same tiny spec is run for real (a local Ray, a SQLite MLflow store, both started once for the
module) the embedded way (`python -m service.submit SPEC`, in-process) and the service way
(`python -m worker.job ID` as a Ray job would run it, then the dispatcher's end-of-job
bookkeeping). Both leave the same files, and `status` shows the same comparison for either (but
for the measured seconds per epoch), read from the local queue or through the API, in a table when
the terminal is wide and two lines per rule when it is narrow.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from service import status as status_cli
from service import submit as submit_cli
from service.api import ServerThread, create_app
from service.dispatcher import Dispatcher
from service.queue import SweepQueue, SweepState
from service.settings import load
from worker import job as job_cli
from worker.lifecycle import (INTERRUPTED, Outcome, SweepFolder, SweepRun, crashed, final_progress,
                              outcome_of, read_json)
from worker.sweep import Progress

# 2 rules x 2 seeds, 2 epochs of 400 rows: seconds of training; the time goes into Ray and MLflow.
# dtp's recipe blows up in its second epoch (training loss ~1e5 times the first's, past
# divergence_factor): each dtp trial ends diverged after one finite epoch, for status to show.
SPEC = """\
name: lifecycle
base: {dataset: xor, subset: 400, hidden: [8], epochs: 2, batch_size: 50, diag_size: 100}
rule_overrides: {dtp: {activation: linear, alpha: 100, optimizer: {name: sgd, momentum: 0, lr: 3}}}
parameters:
  rule: {distribution: values, values: [bp, dtp]}
search: {method: grid, metric: valid_accuracy, mode: max, seeds: [0, 1], max_concurrent_trials: 2}
"""
N = 4
STATUSES = {"completed": 2, "diverged": 2}
# What two runs of one spec may differ in: the run ids and the measured times.
MEASURED = ("best_trial_run_id", "seconds_per_epoch", "train_seconds")


def run_embedded(spec: Path) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert submit_cli.main([str(spec), "--json", "--num-cpus", "2"]) == 0
    res = json.loads(out.getvalue().strip().splitlines()[-1])
    assert res["state"] == "succeeded", res
    return res


def run_as_service_job(settings) -> str:
    """What the dispatcher and the Ray job do, minus the Jobs API: claim, write the spec, run
    worker.job (on the local Ray already up), and on the job's end copy its files into the queue
    and mark the sweep."""
    with SweepQueue(settings.db_url) as q:
        rec = q.submit("lifecycle", SPEC)
        rec = q.claim_next()
        SweepFolder(settings.data_dir, rec.id).write_spec(rec.spec_yaml)
        assert job_cli.main([rec.id]) == 0
        d = Dispatcher(settings, q)
        d._finish(q.get(rec.id), SweepState.SUCCEEDED, None)
        return rec.id


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Both sweeps, run once for the module: the embedded one starts the local Ray (as
    `service.submit` does), the service-mode job runs on it; Ray is shut down at the end."""
    import mlflow
    import ray

    root = tmp_path_factory.mktemp("lifecycle")
    mp = pytest.MonkeyPatch()
    for k in ("SWEEP_SERVICE_URL", "SWEEP_DB_URL", "RAY_ADDRESS", "SWEEP_API_TOKEN"):
        mp.delenv(k, raising=False)
    mp.setenv("SWEEP_DATA_DIR", str(root / "data"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    # Set here so they are undone at the end (worker.sweep._init_ray sets them for good).
    for k, v in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AIR_NEW_OUTPUT", "0"),
                 ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")):
        mp.setenv(k, v)
    (root / "spec.yaml").write_text(SPEC)
    if ray.is_initialized():
        ray.shutdown()
    try:
        settings = load()
        embedded = run_embedded(root / "spec.yaml")
        assert ray.is_initialized()  # the embedded run's local Ray, which the job below reuses
        service = run_as_service_job(settings)
        yield SimpleNamespace(root=root, settings=settings, embedded=embedded["sweep_id"], embedded_out=embedded,
                              service=service)
    finally:
        ray.shutdown()
        mlflow.set_tracking_uri(None)
        mp.undo()


def _measured_out(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in MEASURED}


def test_both_modes_leave_the_same_files_and_queue_record(sweeps):
    from mlflow.tracking import MlflowClient

    from worker import tracking

    settings, root = sweeps.settings, sweeps.root
    with SweepQueue(settings.db_url) as q:
        recs = {sid: q.get(sid) for sid in (sweeps.embedded, sweeps.service)}
    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("lifecycle")
    tables = {}
    for sid, rec in recs.items():
        folder = SweepFolder(settings.data_dir, sid)
        assert rec.state is SweepState.SUCCEEDED and rec.error is None
        # The queue names the sweep's experiment and parent run as MLflow has them.
        parent = c.get_run(rec.mlflow_parent_run_id)
        assert rec.mlflow_experiment_id == exp.experiment_id == parent.info.experiment_id
        assert parent.data.tags[tracking.TAG_SWEEP] == sid and parent.data.tags[tracking.TAG_KIND] == "sweep"
        started = folder.started()
        assert (started["experiment_id"], started["parent_run_id"]) == (rec.mlflow_experiment_id,
                                                                        rec.mlflow_parent_run_id)
        assert started["tracking_uri"] == f"sqlite:///{root / 'mlflow.db'}"
        assert started["tracking_uri_set_by_user"] is True
        result = folder.result()
        assert result["state"] == "succeeded" and {r["rule"] for r in result["table"]} == {"bp", "dtp"}
        tables[sid] = result["table"]
        children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(children) == N
        assert Counter(r.data.tags[tracking.TAG_STATUS] for r in children) == STATUSES
        # The final progress has the result's counts, in the queue and in progress.json alike.
        assert rec.progress == folder.progress()
        assert {k: rec.progress[k] for k in ("total", "done", "running", "pending", "errored")} == \
            {"total": N, "done": N, "running": 0, "pending": 0, "errored": 0}
        assert rec.progress["trial_status"] == STATUSES
        # The best epoch each rule reported, as MLflow has the trials' histories.
        best: dict[str, float] = {}
        for r in children:
            values = [m.value for m in c.get_metric_history(r.info.run_id, "valid_accuracy")]
            rule = r.data.tags[tracking.TAG_RULE]
            best[rule] = max(values + ([best[rule]] if rule in best else []))
        assert rec.progress["best"] == best and set(best) == {"bp", "dtp"}
        assert not any(p.name.endswith(".tmp") for p in folder.path.iterdir())
    assert sweeps.embedded_out["table"] == tables[sweeps.embedded]
    # One spec, the same seeds: the same comparison from either mode, but for run ids and times.
    assert [_measured_out(r) for r in tables[sweeps.embedded]] == [_measured_out(r) for r in tables[sweeps.service]]


def _comparison(text: str) -> str:
    return text[text.index(status_cli.COMPARISON_TITLE):]


# The s/epoch figures: the only numbers in the comparison printed with exactly two decimals.
SECONDS = re.compile(r"(?<![\d.])\d+\.\d\d(?![\d.])")


@pytest.mark.parametrize("columns", [80, 99, 160])
def test_status_shows_the_same_comparison_for_both_modes(sweeps, capsys, monkeypatch, columns):
    settings = sweeps.settings
    monkeypatch.setenv("COLUMNS", str(columns))
    outputs = {}
    with SweepQueue(settings.db_url) as q, ServerThread(create_app(settings, queue=q, dispatcher=False)) as srv:
        for sid in (sweeps.embedded, sweeps.service):
            for source, extra in (("local", []), ("service", ["--service", srv.url])):
                capsys.readouterr()
                assert status_cli.main([sid, *extra]) == 0
                outputs[sid, source] = capsys.readouterr().out
    sections = {k: _comparison(v) for k, v in outputs.items()}
    tables = {sid: SweepFolder(settings.data_dir, sid).result()["table"] for sid in (sweeps.embedded, sweeps.service)}
    for sid, table in tables.items():
        # From the queue or through the API: the same text.
        assert sections[sid, "local"] == sections[sid, "service"], sections
        # Each sweep's own seconds per epoch, in the rows' order.
        assert SECONDS.findall(sections[sid, "local"]) == [f"{r['seconds_per_epoch']:.2f}" for r in table]
    # Both modes: the same comparison but for those measured times.
    assert len({SECONDS.sub("s.ss", s) for s in sections.values()}) == 1, sections
    text = sections[sweeps.embedded, "local"]
    lines = text.splitlines()
    assert all(len(line) <= columns for line in lines)
    assert "…" not in "".join(outputs.values())
    assert "trials 2 (2 diverged)" in text or "2 (2 diverged)" in text
    for row in tables[sweeps.embedded]:
        assert f"{row['metric_mean']:.4f} ± {row['metric_std']:.4f}" in text
        assert f"{row['test_mean']:.4f} ± {row['test_std']:.4f}" in text
    if columns < 100:  # vertical: a block per rule
        assert [line.split()[0] for line in lines[1:] if line and not line.startswith(" ")] == ["bp", "dtp"]
    else:  # one table, every header whole
        header = next(line for line in lines if "s/epoch" in line)
        assert re.findall(r"valid_accuracy \(mean ± std\)|test acc|best|config|s/epoch|trials", header) == \
            ["valid_accuracy (mean ± std)", "test acc", "best", "config", "s/epoch", "trials"]


def test_sweep_run_throttles_progress_and_maps_outcomes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from worker.spec import SweepSpec

    saved = []
    folder = SweepFolder(tmp_path, "sw-000000000001")
    run = SweepRun(folder, SweepSpec.from_yaml(SPEC), "sqlite:////x/mlflow.db", throttle_s=3600,
                   on_saved=saved.append)
    run.started("3", "p")
    assert folder.started()["tracking_uri_set_by_user"] is False  # the default store
    p = Progress(total=2, pending=2)
    for done in (0, 1, 1, 2):
        p.done = done
        run.progress(p)
    assert [d["done"] for d in saved] == [0, 2]  # the first, then (throttled) only the last
    assert read_json(folder.path / "progress.json")["done"] == 2

    assert outcome_of("succeeded", {"completed": 2}) == Outcome("succeeded", None, 0)
    assert outcome_of("interrupted", {"completed": 1, "pending": 1}) is INTERRUPTED
    assert INTERRUPTED.queue_state == SweepState.QUEUED.value and INTERRUPTED.exit_code == 130
    failed = outcome_of("failed", {"failed": 2})
    assert failed.queue_state == "failed" and failed.exit_code == 1 and "failed" in failed.error
    assert crashed(RuntimeError("boom")).error == "RuntimeError: boom"
    # Final progress: the result's counts win over what the callbacks saw last.
    fp = final_progress({"done": 1, "running": 1, "best": {"bp": 0.5}},
                        {"n_trials": 3, "trial_status": {"completed": 1, "pending": 1}})
    assert (fp["done"], fp["running"], fp["pending"], fp["best"]) == (1, 0, 2, {"bp": 0.5})


def _row(rule: str, mean: float, test: float, statuses: str) -> dict:
    return {"rule": rule, "trials": 6, "seeds": 3, "best_config": "lr_scale=1.0", "metric": "valid_accuracy",
            "metric_mean": mean, "metric_std": 0.0076, "test_mean": test, "test_std": 0.01,
            "best_trial_run_id": "r" * 32, "best_trial_metric": mean + 0.007, "epochs": 3.0,
            "seconds_per_epoch": 3.51, "train_seconds": 12.0, "statuses": statuses}


# Sample comparison rows for the renderer alone (no sweep needed to measure text widths).
TABLE = [_row("bp", 0.9483, 0.9426, "completed:6"), _row("dtp", 0.9474, 0.9424, "completed:5 diverged:1")]


def test_comparison_is_never_cut_at_any_width():
    from rich.console import Console

    grouped = [{**r, "dataset": d, "group": f"{r['rule']}/{d}", "group_by": "dataset", "rule": rule}
               for d in ("mnist", "fashion_mnist") for rule in ("ddtp_linear", "bp") for r in TABLE[:1]]
    for rows in (TABLE, grouped):
        for width in range(60, 200, 3):
            console = Console(width=width, record=True, file=io.StringIO())
            console.print(status_cli.comparison_view(rows, console, status_cli.COMPARISON_TITLE))
            text = console.export_text()
            assert "…" not in text and max(map(len, text.splitlines())) <= width, (width, text)
            assert "fashion_mnist" in text or rows is TABLE
