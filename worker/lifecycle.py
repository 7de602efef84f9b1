"""One sweep's life on disk, the same whether the embedded CLI runs it in-process or a service
runs it as a Ray Job.

A sweep's folder, ``$SWEEP_DATA_DIR/sweeps/<id>/`` (storage every Ray node shares), holds:

- ``spec.yaml``: the spec (a service writes it before it submits the job);
- ``job.json``: the Ray job of the current attempt (service only);
- ``started.json``: the MLflow experiment, parent run and tracking URI, once the parent run exists;
- ``progress.json``: trials done / running / pending, best metric per rule; throttled while the
  sweep runs, final once it ends;
- ``result.json``: the final summary (state, trial statuses, comparison table).

Tune keeps the sweep's own state in ``$SWEEP_DATA_DIR/tune/<id>``; calling ``SweepRun.run`` again
resumes from it. Every file is written atomically, so readers (status, the API, the dispatcher)
never see half of one.

Importable without Ray or MLflow: the service reads these files in its own process.
"""
from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tp_engine.status import TrialStatus

SPEC, JOB, STARTED, PROGRESS, RESULT = "spec.yaml", "job.json", "started.json", "progress.json", "result.json"


class SweepState(str, enum.Enum):
    """A sweep's state in the queue (``service.queue`` holds its transitions): queued -> running ->
    succeeded | failed | cancelled; a failed or interrupted sweep goes back to queued. Named here,
    below the service, because a run's outcome maps to one (``Outcome``)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunOutcome(enum.StrEnum):
    """How one run of a sweep (``worker.sweep.run_sweep``) ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # every trial failed
    INTERRUPTED = "interrupted"  # trials left running or pending: resume it


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None if absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class SweepFolder:
    """The files of one sweep under a data directory (see the module docstring)."""

    def __init__(self, data_dir: str | os.PathLike[str], sweep_id: str):
        self.data_dir = Path(data_dir)
        self.sweep_id = sweep_id
        self.path = self.data_dir / "sweeps" / sweep_id

    @property
    def storage_path(self) -> Path:
        """Tune's storage root (Tune puts this sweep in ``<root>/<sweep id>``)."""
        return self.data_dir / "tune"

    @property
    def spec_path(self) -> Path:
        return self.path / SPEC

    @property
    def log_path(self) -> Path:
        """An embedded run's log: what Ray, Tune and MLflow print, kept off the terminal."""
        return self.path / "embedded.log"

    def _write(self, name: str, data: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / name, data if isinstance(data, str) else json.dumps(data, default=str))

    def write_spec(self, text: str) -> None:
        self._write(SPEC, text)

    def write_job(self, submission_id: str, attempt: int, ray_address: str | None) -> None:
        self._write(JOB, {"submission_id": submission_id, "attempt": attempt, "submitted_at": time.time(),
                          "ray_address": ray_address})

    def write_started(self, experiment_id: str, parent_run_id: str, tracking_uri: str, name: str,
                      set_by_user: bool) -> None:
        """``set_by_user``: the store is the one MLFLOW_TRACKING_URI named, not the default one in
        the directory the sweep ran from; reports show the first as set, the second relative."""
        self._write(STARTED, {"experiment_id": experiment_id, "parent_run_id": parent_run_id,
                              "tracking_uri": tracking_uri, "experiment_name": name,
                              "tracking_uri_set_by_user": set_by_user})

    def write_progress(self, progress: dict[str, Any]) -> None:
        self._write(PROGRESS, progress)

    def write_result(self, result: dict[str, Any]) -> None:
        self._write(RESULT, result)

    def started(self) -> dict[str, Any] | None:
        return read_json(self.path / STARTED)

    def progress(self) -> dict[str, Any] | None:
        return read_json(self.path / PROGRESS)

    def result(self) -> dict[str, Any] | None:
        return read_json(self.path / RESULT)

    def final_progress(self, fallback: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The progress with the final counts of result.json; None before there is a result."""
        result = self.result()
        if not result:
            return None
        return final_progress(self.progress() or fallback or {}, result)


def final_progress(progress: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """``progress`` (the last one the sweep wrote) with the counts of its result: throttled
    progress written from Tune's callbacks can miss the last trial's end, the result cannot."""
    out = {**progress, **(result.get("progress") or {})}
    ts = result.get("trial_status")
    if not isinstance(ts, dict):
        return out
    try:
        ts = {str(k): int(v) for k, v in ts.items()}
        total = int(result.get("n_trials") or sum(ts.values()))
    except (TypeError, ValueError):
        return out
    unfinished = ts.get(TrialStatus.RUNNING, 0) + ts.get(TrialStatus.PENDING, 0)
    out.update(total=total, done=sum(ts.values()) - unfinished, running=0,
               pending=max(0, total - sum(ts.values()) + unfinished), errored=ts.get(TrialStatus.FAILED, 0),
               trial_status=ts)
    return out


# ---- outcomes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """Where a run of a sweep leaves it: the queue state (a ``SweepState`` value), the error to
    record, and the exit code of the process that ran it."""

    queue_state: str  # succeeded | failed | queued (interrupted: resume it)
    error: str | None
    exit_code: int


INTERRUPTED = Outcome(SweepState.QUEUED.value, None, 130)


def outcome_of(state: str, trial_status: dict[str, int]) -> Outcome:
    """The outcome of a sweep that ``run_sweep`` finished with ``state`` (a RunOutcome)."""
    if state == RunOutcome.SUCCEEDED:
        return Outcome(SweepState.SUCCEEDED.value, None, 0)
    if state == RunOutcome.INTERRUPTED:
        return INTERRUPTED
    return Outcome(SweepState.FAILED.value, f"trials: {trial_status}", 1)


def crashed(exc: BaseException) -> Outcome:
    """The outcome of a sweep whose driver raised (its own failure, not bad input)."""
    return Outcome(SweepState.FAILED.value, f"{type(exc).__name__}: {exc}", 1)


# ---- one run ---------------------------------------------------------------------------------


class SweepRun:
    """One attempt at a sweep: runs (or resumes) it with ``worker.sweep.run_sweep`` and keeps its
    folder up to date. The caller hooks in its own bookkeeping:

    - ``on_started(experiment_id, parent_run_id)`` once the MLflow parent run exists;
    - ``on_progress(progress)`` on every Tune event (a live display);
    - ``on_saved(progress_dict)`` whenever progress.json is written (at most every
      ``throttle_s`` seconds, and at the end), e.g. to copy it into a queue.
    """

    def __init__(self, folder: SweepFolder, spec, tracking_uri: str, *, throttle_s: float = 1.0,
                 on_started: Callable[[str, str], None] | None = None,
                 on_progress: Callable[[Any], None] | None = None,
                 on_saved: Callable[[dict[str, Any]], None] | None = None):
        self.folder, self.spec, self.tracking_uri = folder, spec, tracking_uri
        self.throttle_s = throttle_s
        self._on_started, self._on_progress, self._on_saved = on_started, on_progress, on_saved
        self._saved_at = 0.0
        self.last_progress: dict[str, Any] = {}
        # Read now: MLflow sets MLFLOW_TRACKING_URI itself once a client is made.
        self.tracking_uri_set_by_user = os.environ.get("MLFLOW_TRACKING_URI") == tracking_uri

    def started(self, experiment_id: str, parent_run_id: str) -> None:
        self.folder.write_started(experiment_id, parent_run_id, self.tracking_uri, self.spec.name,
                                  self.tracking_uri_set_by_user)
        if self._on_started:
            self._on_started(experiment_id, parent_run_id)

    def progress(self, p) -> None:
        if self._on_progress:
            self._on_progress(p)
        self.last_progress = p.as_dict()
        if time.time() - self._saved_at > self.throttle_s or p.done == p.total:
            self._saved_at = time.time()
            self._save_progress(self.last_progress)

    def _save_progress(self, d: dict[str, Any]) -> None:
        self.folder.write_progress(d)
        if self._on_saved:
            self._on_saved(d)

    def run(self, num_cpus: int | None = None):
        """``run_sweep`` with this folder's storage; returns its SweepResult (see ``finish``)."""
        from worker.sweep import run_sweep

        return run_sweep(self.spec, self.tracking_uri, str(self.folder.storage_path), sweep_id=self.folder.sweep_id,
                         on_progress=self.progress, on_start=self.started, num_cpus=num_cpus)

    def finish(self, result) -> Outcome:
        """Leave the final progress and result.json; say what the sweep's state becomes."""
        res = result.as_dict()
        self._save_progress(final_progress(self.last_progress, res))
        self.folder.write_result(res)
        return outcome_of(result.state, result.trial_status)


__all__ = ["INTERRUPTED", "Outcome", "RunOutcome", "SweepFolder", "SweepRun", "SweepState", "crashed",
           "final_progress", "outcome_of", "read_json", "write_atomic"]
