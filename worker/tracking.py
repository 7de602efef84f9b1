"""MLflow layout of a sweep: one experiment per spec name, one parent run per sweep, one child run
per trial. Runs are made with MlflowClient so a trial can attach to its parent from any process (the
fluent API needs the parent active in the same process), and so a retried trial finds its run
again by tags instead of making a duplicate."""
from __future__ import annotations

from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from tp_engine.status import TrialStatus
from worker.paths import default_tracking_uri  # noqa: F401  (re-exported)

# Every MLflow tag a sweep writes or reads, named once. Tags of both runs:
TAG_SWEEP = "sweep_id"
TAG_KIND = "tp.kind"  # KIND_SWEEP (parent) or KIND_TRIAL (child)
KIND_SWEEP, KIND_TRIAL = "sweep", "trial"
# The parent run's:
TAG_TRIALS = "tp.trials"  # trials the spec expands to
TAG_SWEEP_STATE = "sweep_state"  # how the last run of the sweep ended (worker.lifecycle.RunOutcome)
# A child run's:
TAG_TRIAL = "trial_id"
TAG_STATUS = "status"  # a TrialStatus
TAG_RULE = "rule"
TAG_BACKEND = "backend"
TAG_DATASET = "dataset"
TAG_SEED = "seed"
TAG_CONFIG_HASH = "config_hash"
MACHINE_PREFIX = "machine."  # machine.<key>: where the trial ran (tp_engine.machine)
# MLflow's own:
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"  # a run's description


def machine_tags() -> dict[str, str]:
    """Where a trial ran, as ``machine.*`` tags (for the results record)."""
    from tp_engine.machine import describe

    return {f"{MACHINE_PREFIX}{k}": v for k, v in describe().items()}


def client(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def find_run(c: MlflowClient, exp_id: str, **tags: str):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([exp_id], filter_string=flt, max_results=2, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def parent_run(c: MlflowClient, exp_id: str, sweep_id: str, spec_yaml: str, description: str = "") -> str:
    """The sweep's parent run, created once; a resumed sweep reopens it."""
    run = find_run(c, exp_id, **{TAG_SWEEP: sweep_id, TAG_KIND: KIND_SWEEP})
    if run is not None:
        c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = c.create_run(
        exp_id,
        run_name=f"sweep {sweep_id}",
        tags={TAG_SWEEP: sweep_id, TAG_KIND: KIND_SWEEP, TAG_NOTE: description or ""},
    )
    c.log_text(run.info.run_id, spec_yaml, "spec.yaml")
    return run.info.run_id


def child_run(c: MlflowClient, exp_id: str, parent_id: str, sweep_id: str, trial_id: str,
              tags: dict[str, str], params: dict[str, Any], name: str) -> tuple[str, bool]:
    """(run_id, created). A retried trial gets its existing run back."""
    run = find_run(c, exp_id, **{TAG_SWEEP: sweep_id, TAG_TRIAL: trial_id})
    if run is not None:
        c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, False
    all_tags = {TAG_SWEEP: sweep_id, TAG_TRIAL: trial_id, TAG_KIND: KIND_TRIAL,
                TAG_PARENT: parent_id, TAG_STATUS: TrialStatus.RUNNING.value, **tags}
    run = c.create_run(exp_id, run_name=name, tags=all_tags)
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id, True


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    import math
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    # MLflow metric names cannot hold every character; '/' is allowed.
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)]
    if ms:
        c.log_batch(run_id, metrics=ms)
