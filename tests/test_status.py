"""One sweep lifecycle for both modes, and what `status` shows of it.

A sweep is run the embedded way (`python -m service.submit SPEC`, in-process) and the service way
(`python -m worker.job ID` as a Ray job would run it, then the dispatcher's end-of-job
bookkeeping), with Ray replaced by a stand-in `run_sweep` that drives the same callbacks and returns
a fixed result. Both leave the same files, and `status` shows the same comparison for either,
read from the local queue or through the API, in a table when the terminal is wide and two lines
per rule when it is narrow.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from service import status as status_cli
from service import submit as submit_cli
from service.api import ServerThread, create_app
from service.dispatcher import Dispatcher
from service.queue import SweepQueue, SweepState
from service.settings import load
from worker import job as job_cli
from worker import sweep as sweep_mod
from worker.lifecycle import (INTERRUPTED, Outcome, SweepFolder, SweepRun, crashed, final_progress,
                              outcome_of, read_json)
from worker.sweep import Progress, SweepResult

SPEC = """\
name: lifecycle
base: {dataset: spiral, hidden: [8], epochs: 2}
parameters:
  rule: {distribution: values, values: [bp, dtp]}
  lr_scale: {distribution: values, values: [0.5, 1.0]}
search: {method: grid, metric: valid_accuracy, mode: max, seeds: [0, 1, 2]}
"""
N = 12


def _row(rule: str, mean: float, test: float, statuses: str) -> dict:
    return {"rule": rule, "trials": 6, "seeds": 3, "best_config": "lr_scale=1.0", "metric": "valid_accuracy",
            "metric_mean": mean, "metric_std": 0.0076, "test_mean": test, "test_std": 0.01,
            "best_trial_run_id": "r" * 32, "best_trial_metric": mean + 0.007, "epochs": 3.0,
            "seconds_per_epoch": 3.51, "train_seconds": 12.0, "statuses": statuses}


TABLE = [_row("bp", 0.9483, 0.9426, "completed:6"), _row("dtp", 0.9474, 0.9424, "completed:5 diverged:1")]


def fake_run_sweep(spec, tracking_uri=None, storage_path=None, *, sweep_id, on_progress=None, on_start=None,
                   num_cpus=None, extra_env=None):
    """What run_sweep does to its callers, without Ray or MLflow."""
    on_start("7", f"parent-{sweep_id}")
    p = Progress(total=N, pending=N)
    for done in range(N + 1):
        p.done, p.running, p.pending = done, min(2, N - done), max(N - done - 2, 0)
        p.best = {"bp": 0.95, "dtp": 0.94} if done else {}
        on_progress(p)
    # The callbacks missed the last trial's end; the result has it.
    return SweepResult(sweep_id, "succeeded", "7", spec.name, f"parent-{sweep_id}", tracking_uri, N,
                       {"completed": 11, "diverged": 1}, TABLE, "| rule |\n", [], str(storage_path), 1.0,
                       {**p.as_dict(), "done": N - 1, "running": 1, "pending": 0})


@pytest.fixture
def env(tmp_path, monkeypatch):
    for k in ("SWEEP_SERVICE_URL", "SWEEP_DB_URL", "RAY_ADDRESS", "SWEEP_API_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(sweep_mod, "run_sweep", fake_run_sweep)
    (tmp_path / "spec.yaml").write_text(SPEC)
    return tmp_path


def run_embedded(env: Path, capsys) -> str:
    capsys.readouterr()
    assert submit_cli.main([str(env / "spec.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["state"] == "succeeded" and out["table"] == TABLE
    return out["sweep_id"]


def run_as_service_job(settings) -> str:
    """What the dispatcher and the Ray job do, minus Ray: claim, write the spec, run worker.job,
    and on the job's end copy its files into the queue and mark the sweep."""
    with SweepQueue(settings.db_url) as q:
        rec = q.submit("lifecycle", SPEC)
        rec = q.claim_next()
        SweepFolder(settings.data_dir, rec.id).write_spec(rec.spec_yaml)
        assert job_cli.main([rec.id]) == 0
        d = Dispatcher(settings, q)
        d._finish(q.get(rec.id), SweepState.SUCCEEDED, None)
        return rec.id


def test_both_modes_leave_the_same_files_and_queue_record(env, capsys):
    settings = load()
    embedded = run_embedded(env, capsys)
    service = run_as_service_job(settings)
    with SweepQueue(settings.db_url) as q:
        recs = {sid: q.get(sid) for sid in (embedded, service)}
    for sid, rec in recs.items():
        folder = SweepFolder(settings.data_dir, sid)
        assert rec.state is SweepState.SUCCEEDED and rec.error is None
        assert (rec.mlflow_experiment_id, rec.mlflow_parent_run_id) == ("7", f"parent-{sid}")
        started = folder.started()
        assert started["tracking_uri"] == f"sqlite:///{env / 'mlflow.db'}"
        assert started["tracking_uri_set_by_user"] is True
        result = folder.result()
        assert result["table"] == TABLE and result["state"] == "succeeded"
        # The final progress has the result's counts, in the queue and in progress.json alike.
        assert rec.progress == folder.progress()
        assert {k: rec.progress[k] for k in ("total", "done", "running", "pending", "errored")} == \
            {"total": N, "done": N, "running": 0, "pending": 0, "errored": 0}
        assert rec.progress["trial_status"] == {"completed": 11, "diverged": 1}
        assert rec.progress["best"] == {"bp": 0.95, "dtp": 0.94}
        assert not any(p.name.endswith(".tmp") for p in folder.path.iterdir())


def _comparison(text: str) -> str:
    return text[text.index(status_cli.COMPARISON_TITLE):]


@pytest.mark.parametrize("columns", [80, 99, 160])
def test_status_shows_the_same_comparison_for_both_modes(env, capsys, monkeypatch, columns):
    settings = load()
    embedded = run_embedded(env, capsys)
    service = run_as_service_job(settings)
    monkeypatch.setenv("COLUMNS", str(columns))
    outputs = {}
    with SweepQueue(settings.db_url) as q, ServerThread(create_app(settings, queue=q, dispatcher=False)) as srv:
        for sid in (embedded, service):
            for source, extra in (("local", []), ("service", ["--service", srv.url])):
                capsys.readouterr()
                assert status_cli.main([sid, *extra]) == 0
                outputs[sid, source] = capsys.readouterr().out
    sections = {k: _comparison(v) for k, v in outputs.items()}
    assert len(set(sections.values())) == 1, sections
    text = next(iter(sections.values()))
    lines = text.splitlines()
    assert all(len(line) <= columns for line in lines)
    assert "…" not in "".join(outputs.values())
    assert "trials 6 (1 diverged)" in text or "6 (1 diverged)" in text
    for rule, row in (("bp", TABLE[0]), ("dtp", TABLE[1])):
        assert f"{row['metric_mean']:.4f} ± 0.0076" in text and f"{row['test_mean']:.4f} ± 0.0100" in text
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
