"""Run a sweep spec as Ray Tune trials, logging to MLflow, and leave the rule comparison on the
parent run. ``run_sweep`` is what the embedded CLI calls in-process and what a Ray Job runs on a
cluster; calling it again with the same storage resumes an interrupted sweep."""
from __future__ import annotations

import contextlib
import math
import os
import secrets
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from tp_engine.status import DONE, UNFINISHED, TrialStatus
from worker import tracking
from worker.lifecycle import RunOutcome
from worker.paths import data_dir
from worker.spec import SweepSpec

TRIAL_STATES = ("PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR")


def new_sweep_id() -> str:
    return "sw-" + secrets.token_hex(6)


@dataclass
class Progress:
    """What a progress display needs; updated by a Tune callback as trials report."""

    total: int
    done: int = 0
    running: int = 0
    pending: int = 0
    errored: int = 0
    best: dict[str, float] = field(default_factory=dict)  # rule -> best metric so far
    epochs_reported: int = 0
    completed_ids: set = field(default_factory=set)  # trials Tune finished (returned or stopped)
    errored_ids: set = field(default_factory=set)  # trials out of retries

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("completed_ids"), d.pop("errored_ids")
        return d


@dataclass
class SweepResult:
    sweep_id: str
    state: str  # a RunOutcome
    experiment_id: str
    experiment_name: str
    parent_run_id: str
    tracking_uri: str
    n_trials: int
    trial_status: dict[str, int]
    table: list[dict[str, Any]]
    table_markdown: str
    artifacts: list[str]
    storage_path: str
    seconds: float
    progress: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)  # TrialTimer.summary() of this run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _init_ray(num_cpus: int | None = None, attempts: int = 3, first_delay_s: float = 5.0) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Our own progress display replaces Tune's console reporter.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = os.environ.get("RAY_ADDRESS")
    # The service's RAY_ADDRESS is the Jobs API URL (http://...); ray.init cannot use that, and a
    # Ray Job's own environment already points ray.init at its cluster.
    if address and not address.startswith("http"):
        ray.init(address=address, log_to_driver=False)
        return
    # A fresh local Ray on 127.0.0.1 only. Ray gives its raylet 30 s to register, which a loaded
    # machine can exceed: such a start is cleaned up and retried, with backoff, saying so.
    import psutil
    from ray._private import ray_constants

    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        # Ray swaps a 127.0.0.1 node address for the interface address, and its servers then
        # listen there, unless it believes multi-node clusters are off: a local Ray is one node.
        multi_node = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            # "local": always a fresh cluster, even if `ray start` left one on this machine.
            # SWEEP_DATA_DIR made absolute for the trials: Tune runs each in a working directory
            # of its own, where the default <cwd>/sweep_data gave every trial its own download
            # cache (MNIST fetched again, about 4 s a trial) and its own MLflow spool.
            env = {"PYTHONWARNINGS": "ignore", "SWEEP_DATA_DIR": str(data_dir().resolve())}
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            delay = first_delay_s * 2 ** (attempt - 1)
            print(f"worker.sweep: starting the local Ray timed out (attempt {attempt} of {attempts}): "
                  f"{e}; retrying in {delay:.0f} s", file=sys.stderr, flush=True)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
        # What the failed start left running (its GCS, raylet, ...): this process's new children.
        ray.shutdown()
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        for p in psutil.wait_procs(left, timeout=10)[1]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        time.sleep(delay)


class TrialTimer:
    """Where a sweep's trial slots spend their time, seen from the driver.

    ``slots`` trials run at once. A trial takes the slot freed longest ago (at the start, all are
    free from when Tune started); its *span* runs from then until Tune has its last result, and
    its *overhead* is the span less the epoch seconds it reported (``trained_s`` of its results):
    starting or resetting its process, imports, data, MLflow, checkpoints, Tune's scheduling. A
    trial retried after a failure counts once per attempt. Work a trial leaves to a background
    thread (its model) is no trial's overhead; it runs beside the next trial's epochs.
    Efficiency: epoch seconds over slots x cores per trial x wall seconds."""

    def __init__(self, slots: int, cpus_per_trial: float, start: float | None = None):
        self.start = time.time() if start is None else start
        self.cores = slots * cpus_per_trial
        self.free = [self.start] * max(1, slots)
        self.busy: dict[str, tuple[int, float]] = {}  # trial id -> (slot, its span's start)
        self.trained: dict[str, float] = {}
        self.segments: list[dict[str, Any]] = []
        self.end: float | None = None

    def started(self, trial_id: str) -> None:
        if trial_id in self.busy:
            return
        i = min(range(len(self.free)), key=self.free.__getitem__)
        if math.isinf(self.free[i]):  # more trials than slots: should not happen
            self.free.append(self.start)
            i = len(self.free) - 1
        self.busy[trial_id] = (i, self.free[i])
        self.free[i] = math.inf
        self.trained[trial_id] = 0.0

    def result(self, trial_id: str, trained_s: Any) -> None:
        if trial_id in self.trained and isinstance(trained_s, (int, float)) and math.isfinite(trained_s):
            self.trained[trial_id] += float(trained_s)

    def ended(self, trial_id: str, now: float | None = None) -> None:
        got = self.busy.pop(trial_id, None)
        if got is None:
            return
        now = time.time() if now is None else now
        i, since = got
        trained = self.trained.pop(trial_id, 0.0)
        self.segments.append({"trial_id": trial_id, "span_s": now - since, "train_s": trained,
                              "overhead_s": now - since - trained})
        self.free[i] = now

    def summary(self, end: float | None = None) -> dict[str, Any]:
        end = self.end if end is None else end
        wall = (time.time() if end is None else end) - self.start
        train = sum(seg["train_s"] for seg in self.segments) + sum(self.trained.values())
        overheads = [seg["overhead_s"] for seg in self.segments]
        return {
            "wall_s": wall,
            "cores": self.cores,
            "train_s": train,
            "efficiency": train / (self.cores * wall) if wall > 0 and self.cores else None,
            "trials_timed": len(overheads),
            "trial_overhead_median_s": statistics.median(overheads) if overheads else None,
            "trial_overhead_s": overheads,
        }


# Tune pickles its run config (callbacks included); listeners such as a live display cannot be
# pickled, so the callback (a module-level class, pickled by reference) refers to them by key.
# The key is the sweep id: a resumed sweep runs with the callback pickled by its first run, which
# must find the progress and listener of the run_sweep call now running.
_LISTENERS: dict[str, tuple] = {}  # sweep id -> (Progress, listener or None, TrialTimer or None)


class _ProgressCallback(Callback):
    def __init__(self, metric: str, mode: str, key: str):
        self.metric, self.mode, self.key = metric, mode, key

    def __setstate__(self, state):
        # Sweeps first run by an older version also pickled a copy of their progress.
        state.pop("progress", None), state.pop("_progress", None)
        self.__dict__.update(state)

    def _entry(self):
        entry = _LISTENERS.get(self.key)
        if entry is None and len(_LISTENERS) == 1:
            # Older versions keyed the callback by a random token, not the sweep id; the one
            # run_sweep call in this process is the one resuming it.
            entry = next(iter(_LISTENERS.values()))
        return entry

    @property
    def timer(self) -> "TrialTimer | None":
        entry = self._entry()
        return entry[2] if entry is not None and len(entry) > 2 else None

    def _time(self, what: str, trial, *args) -> None:
        timer = self.timer
        if timer is not None and trial is not None:
            getattr(timer, what)(trial.trial_id, *args)

    @property
    def progress(self) -> Progress:
        return self._entry()[0]

    def _update(self, trials):
        p = self.progress
        counts = {s: 0 for s in TRIAL_STATES}
        for t in trials:
            # Tune calls on_trial_complete before it marks the trial TERMINATED.
            status = "TERMINATED" if t.trial_id in p.completed_ids and t.status != "ERROR" else t.status
            counts[status] = counts.get(status, 0) + 1
        p.done = counts["TERMINATED"] + counts["ERROR"]
        p.errored = counts["ERROR"]
        p.running = counts["RUNNING"]
        p.pending = max(p.total - p.done - p.running, counts["PENDING"])
        listener = self._entry()[1]
        if listener is not None:
            listener(p)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from worker.trainable import TRAINED_KEY

        self._time("result", trial, result.get(TRAINED_KEY))
        self.progress.epochs_reported += 1
        rule, value = result.get("rule"), result.get(self.metric)
        if rule is not None and isinstance(value, (int, float)):
            old = self.progress.best.get(rule)
            if old is None or (value > old if self.mode == "max" else value < old):
                self.progress.best[rule] = float(value)
        self._update(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._time("started", trial)
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._time("ended", trial)
        self.progress.completed_ids.add(trial.trial_id)
        self._update(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._time("ended", trial)
        self.progress.errored_ids.add(trial.trial_id)
        self._update(trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._time("ended", trial)  # failed; it will be retried


class _PruneCheckpoints(Callback):
    """Tune keeps every checkpoint directory (num_to_keep=None); this drops the bulk of the older
    ones instead. Tune's own rotation deletes the checkpoint its last experiment-state snapshot
    names before the next snapshot lands, so a driver killed in between left a trial that could
    not be resumed ("does not exist on storage anymore")."""

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        from worker.trainable import prune_checkpoints

        prune_checkpoints(checkpoint)


def _progress_callback(progress: Progress, metric: str, mode: str, on_progress, key: str,
                       timer: TrialTimer | None = None):
    _LISTENERS[key] = (progress, on_progress, timer)
    return _ProgressCallback(metric, mode, key)


def _slots(spec: SweepSpec) -> int:
    """How many trials of ``spec`` run at once on this Ray cluster."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    per = spec.resources.cpus_per_trial or 1
    slots = max(1, int(cpus // per)) if per else 1
    if spec.search.max_concurrent_trials:
        slots = min(slots, spec.search.max_concurrent_trials)
    return min(slots, spec.n_trials())


def storage_root(storage_path: str | None = None) -> str:
    if storage_path:
        return os.path.abspath(storage_path)
    return str(data_dir() / "tune")


def run_sweep(
    spec: SweepSpec,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    *,
    sweep_id: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[str, str], None] | None = None,
    num_cpus: int | None = None,
) -> SweepResult:
    """Run (or resume, when ``storage_path/sweep_id`` holds an interrupted run) a sweep.

    ``on_start(experiment_id, parent_run_id)`` is called once the parent run exists."""
    from ray import tune

    from worker.report import compare_sweep, log_timing, publish
    from worker.search_space import to_param_space, to_scheduler, to_search_alg
    from worker.trainable import TrialContext, run_trial

    t0 = time.time()
    tracking_uri = tracking_uri or tracking.default_tracking_uri()
    sweep_id = sweep_id or new_sweep_id()
    root = storage_root(storage_path)
    Path(root).mkdir(parents=True, exist_ok=True)
    c = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(c, spec.name)
    parent_id = tracking.parent_run(c, exp_id, sweep_id, spec.to_yaml(), spec.description or "",
                                    spec.search.metric, spec.search.mode)
    c.set_tag(parent_id, tracking.TAG_TRIALS, str(spec.n_trials()))
    if on_start:
        on_start(exp_id, parent_id)

    _init_ray(num_cpus)
    ctx = TrialContext(spec.model_dump(mode="json"), sweep_id, tracking_uri, exp_id, parent_id)
    resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    progress = Progress(total=spec.n_trials(), pending=spec.n_trials())
    timer = TrialTimer(_slots(spec), spec.resources.cpus_per_trial or 1)
    run_config = tune.RunConfig(
        name=sweep_id,
        storage_path=root,
        failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # pruned by _PruneCheckpoints
        callbacks=[_progress_callback(progress, spec.search.metric, spec.search.mode, on_progress, sweep_id,
                                      timer),
                   _PruneCheckpoints()],
        verbose=0,
    )
    exp_path = os.path.join(root, sweep_id)
    if tune.Tuner.can_restore(exp_path):
        # Resume: finished trials stay finished; unfinished and errored ones run again, each from
        # its last checkpoint. The param space is the one saved with the sweep (it holds no
        # object references to refresh), so a sweep started with an older layout resumes too.
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_param_space(spec),
            tune_config=tune.TuneConfig(
                num_samples=spec.search.num_samples,
                max_concurrent_trials=spec.search.max_concurrent_trials,
                search_alg=to_search_alg(spec),
                scheduler=to_scheduler(spec),
                time_budget_s=spec.search.time_budget_s,
                # One process runs trial after trial (run_trial keeps nothing of a trial but its
                # dataset and its queued epilogue; tests/test_reuse.py), so a process start and
                # its imports are paid once per slot, not per trial.
                reuse_actors=True,
            ),
            run_config=run_config,
        )
    # Tune prints its own banners to stdout; keep stdout for the caller's --json.
    timer.start = time.time()
    timer.free = [timer.start] * len(timer.free)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            results = tuner.fit()
    finally:
        timer.end = time.time()
        _LISTENERS.pop(sweep_id, None)

    trial_status = _reconcile(c, exp_id, sweep_id, results, progress, ctx)
    unfinished = sum(v for k, v in trial_status.items() if k in UNFINISHED)
    # The display's last word: the reconciled counts (a resumed sweep whose trials had all
    # finished before its driver died gets no Tune event at all).
    progress.done, progress.running, progress.pending = sum(trial_status.get(k, 0) for k in DONE), 0, unfinished
    if on_progress is not None:
        on_progress(progress)
    if unfinished:
        state = RunOutcome.INTERRUPTED
    elif trial_status.get(TrialStatus.FAILED, 0) == spec.n_trials():
        state = RunOutcome.FAILED
    else:
        state = RunOutcome.SUCCEEDED
    timing = timer.summary()
    try:
        log_timing(c, parent_id, timing)
    except Exception as e:  # noqa: BLE001  figures about the sweep, not its results
        print(f"worker.sweep: could not log the sweep's timing: {e}", file=sys.stderr, flush=True)
    cmp = compare_sweep(c, exp_id, parent_id, spec)
    artifacts = [str(p) for p in publish(c, parent_id, cmp, Path(exp_path) / "comparison")]
    for k, v in trial_status.items():
        c.log_metric(parent_id, f"trials/{k}", v)
    try:  # the experiment's description: this sweep's figures and its pages in the MLflow UI
        best = {r.get("group", r["rule"]): r["metric_mean"] for r in cmp.rows if r["metric_mean"] is not None}
        links = tracking.sweep_links(exp_id, parent_id, sweep_id, spec.search.metric, spec.search.mode)
        tracking.describe_experiment(c, exp_id, tracking.experiment_note(
            sweep_id, state, progress.done, spec.n_trials(), spec.search.metric, best, links))
    except Exception as e:  # noqa: BLE001  a pointer to the results, not a result
        print(f"worker.sweep: could not describe the experiment: {e}", file=sys.stderr, flush=True)
    timing["run_wall_s"] = time.time() - t0
    c.set_tag(parent_id, tracking.TAG_SWEEP_STATE, state)
    c.set_terminated(parent_id, {RunOutcome.SUCCEEDED: "FINISHED", RunOutcome.FAILED: "FAILED"}.get(state, "KILLED"))
    return SweepResult(
        # Plain strings: printed, a dict of StrEnum keys reads {<TrialStatus.COMPLETED: 'completed'>: 24}.
        sweep_id, state, exp_id, spec.name, parent_id, tracking_uri, spec.n_trials(),
        {str(k): v for k, v in trial_status.items()}, cmp.rows, cmp.to_markdown(), artifacts, exp_path, time.time() - t0,
        progress.as_dict(),
        {k: v for k, v in timing.items() if k != "trial_overhead_s"},
    )


def _reconcile(c, exp_id: str, sweep_id: str, results, progress: Progress, ctx=None) -> dict[str, int]:
    """Give every trial's child run its final status, also for trials that could not say it
    themselves (stopped early by ASHA, or out of retries, or whose process died while logging
    its model after its last report: settled here from its last checkpoint). Trials neither
    finished nor failed are 'running' or 'pending': the sweep was interrupted and can be
    resumed."""
    from tp_engine.status import SETTLED

    counts: dict[str, int] = {}
    S = TrialStatus
    for r in results:
        last = r.metrics or {}
        trial_id = last.get("trial_id")
        run = tracking.find_run(c, exp_id, **{tracking.TAG_SWEEP: sweep_id, tracking.TAG_TRIAL: trial_id}) if trial_id else None
        tagged = run.data.tags.get(tracking.TAG_STATUS) if run is not None else None
        if run is not None:
            # Points a trial's process still held when it was stopped (MLflow away or slow to
            # answer then): its spool, on shared storage, is sent from here (never twice).
            tracking.replay_spool(c, run.info.run_id)
        reported = last.get("status")
        if reported in (S.COMPLETED, S.DIVERGED):
            status = S(reported)
        elif trial_id in progress.errored_ids or (r.error is not None and trial_id not in progress.completed_ids and tagged == S.FAILED):
            status = S.FAILED
        elif trial_id in progress.completed_ids:
            status = S.EARLY_STOPPED  # Tune ended it before its last epoch: ASHA
        elif tagged in (S.EARLY_STOPPED, S.FAILED):
            status = S(tagged)  # settled by an earlier run of this sweep
        else:
            status = S.RUNNING if reported else S.PENDING
        counts[status] = counts.get(status, 0) + 1
        if run is not None and status in (S.COMPLETED, S.DIVERGED) and tagged not in SETTLED and ctx is not None:
            _settle(c, ctx, r, run.info.run_id, trial_id)
        if run is not None and status in (S.FAILED, S.EARLY_STOPPED) and tagged != status:
            c.set_tag(run.info.run_id, tracking.TAG_STATUS, status)
            c.set_terminated(run.info.run_id, "FAILED" if status == S.FAILED else "FINISHED")
        elif run is not None and status in UNFINISHED:
            c.set_terminated(run.info.run_id, "KILLED")
    return counts


def _settle(c, ctx, result, run_id: str, trial_id: str) -> None:
    """A finished trial whose run its process did not get to settle (see run_trial)."""
    from worker.trainable import finish_from_checkpoint

    try:
        if finish_from_checkpoint(c, ctx, dict(result.config or {}), run_id, result.checkpoint):
            print(f"worker.sweep: trial {trial_id}: its process ended before logging its model; "
                  "logged it from the trial's last checkpoint", file=sys.stderr, flush=True)
            return
        why = "no checkpoint to rebuild its model from"
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    print(f"worker.sweep: trial {trial_id}: its run could not be settled ({why})", file=sys.stderr, flush=True)
