"""MLflow layout of a sweep: one experiment per spec name, one parent run per sweep, one child run
per trial. Runs are made with MlflowClient so a trial can attach to its parent from any process (the
fluent API needs the parent active in the same process), and so a retried trial finds its run
again by tags instead of making a duplicate.

MLflow server outages. ``client()`` returns a ``ResilientClient``: against an HTTP tracking server,
every call it makes waits out an outage (it probes ``/health`` with backoff, 0.5 s doubling to
5 s) and is then made again, and ``log_metrics`` does not wait for it: a trial's metrics go into an
outbox that a background thread sends in order, so training goes on while MLflow is away and the
buffered points reach MLflow once it is back (while the server answers, ``log_metrics`` waits up to
``SYNC_WAIT_S`` for its points to be stored, as a plain call would). Each buffered point keeps the timestamp it was
logged with, so a batch sent twice (the server stored it but the answer was lost) is stored once:
MLflow drops a metric identical in key, step, value and timestamp. Calls that change or read a run
first wait for the outbox to be sent, so the run is closed only after all its points. Unsent
points are also kept on disk (``<SWEEP_DATA_DIR>/mlflow_spool/<run id>.jsonl``) until sent; a trial
that resumes in that run (``child_run``) sends what a killed attempt left there.

An outage longer than ``TP_MLFLOW_OUTAGE_LIMIT_S`` seconds (``DEFAULT_OUTAGE_LIMIT_S``, 10
minutes, by default; counted from the first failed call) raises ``MlflowUnavailable`` from the
next call, which fails the trial (Tune retries it from its checkpoint if the spec allows
retries). A file or SQLite tracking URI has no server: those calls are made once, as before."""
from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

import mlflow
from mlflow.tracking import MlflowClient

from tp_engine.status import TrialStatus
from worker.paths import default_tracking_uri  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)
T = TypeVar("T")

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

# How long a trial waits for an unreachable MLflow server before it fails.
OUTAGE_LIMIT_ENV = "TP_MLFLOW_OUTAGE_LIMIT_S"
DEFAULT_OUTAGE_LIMIT_S = 600.0
PROBE_FIRST_S, PROBE_MAX_S = 0.5, 5.0  # backoff between /health probes during an outage
SPOOL_DIR = "mlflow_spool"  # under SWEEP_DATA_DIR
MAX_BATCH = 1000  # metrics per log_batch (MLflow's limit)
SYNC_WAIT_S = 5.0  # log_metrics waits this long for its points while no outage is known
EXIT_FLUSH_S = 10.0  # at interpreter exit, how long buffered points may hold the process


class MlflowUnavailable(RuntimeError):
    """The MLflow server stayed unreachable longer than the outage limit."""


def outage_limit() -> float:
    raw = os.environ.get(OUTAGE_LIMIT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_OUTAGE_LIMIT_S
    except ValueError:
        log.warning("%s=%r is not a number; using %.0f s", OUTAGE_LIMIT_ENV, raw, DEFAULT_OUTAGE_LIMIT_S)
        return DEFAULT_OUTAGE_LIMIT_S
    return max(value, 0.0)


def machine_tags() -> dict[str, str]:
    """Where a trial ran, as ``machine.*`` tags (for the results record)."""
    from tp_engine.machine import describe

    return {f"{MACHINE_PREFIX}{k}": v for k, v in describe().items()}


# ---- outages --------------------------------------------------------------------------------

def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_up(uri: str, timeout: float = 3.0) -> bool:
    """True if the tracking server answers (any answer below 500 counts); always True for a
    tracking URI that is not a server."""
    if not _is_http(uri):
        return True
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def _looks_unavailable(e: BaseException) -> bool:
    """An error that says the server could not be reached (not that it refused the request)."""
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                      TimeoutError)):
        return True
    # MLflow wraps those (after its own retries) in an MlflowException that quotes them; a server
    # that kept answering 500 ("too many 500 error responses") is not unreachable.
    text = str(e)
    status = getattr(e, "get_http_status_code", lambda: None)()
    return status in (502, 503, 504) or any(s in text for s in _UNREACHABLE)


_UNREACHABLE = ("Connection refused", "Failed to establish a new connection", "Connection aborted",
                "Connection reset", "RemoteDisconnected", "Read timed out", "ConnectTimeout", "timed out",
                "too many 502 error", "too many 503 error", "too many 504 error", "503 Service Unavailable",
                "502 Bad Gateway")


class _Outage:
    """Waits out an unreachable server, within the limit; shared by a client's threads."""

    def __init__(self, uri: str, limit: float | None = None):
        self.uri = uri
        self.limit = outage_limit() if limit is None else float(limit)
        self.since: float | None = None  # monotonic time of the first failure of this outage
        self.wall_since: float | None = None
        self._local = threading.local()

    def _begin(self, what: str, e: BaseException | str) -> None:
        if self.since is None:
            self.since, self.wall_since = time.monotonic(), time.time()
            log.warning("MLflow at %s unreachable (%s: %s); waiting up to %.0f s (%s) for it to return",
                        self.uri, what, _one_line(e), self.limit, OUTAGE_LIMIT_ENV)

    def _end(self) -> None:
        if self.since is not None:
            log.warning("MLflow at %s is back after %.1f s", self.uri, time.monotonic() - self.since)
            self.since = self.wall_since = None

    def _check_limit(self, what: str) -> None:
        if self.since is not None and time.monotonic() - self.since > self.limit:
            raise MlflowUnavailable(f"MLflow at {self.uri} unreachable for more than {self.limit:.0f} s "
                                    f"({OUTAGE_LIMIT_ENV}); gave up on {what}")

    def wait_until_up(self, what: str) -> None:
        delay = PROBE_FIRST_S
        while not server_up(self.uri):
            self._begin(what, "the health check failed")
            self._check_limit(what)
            remaining = self.limit - (time.monotonic() - self.since)
            time.sleep(max(0.05, min(delay, remaining + 0.05)))
            delay = min(delay * 2, PROBE_MAX_S)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """fn(), made again after an outage until it gets through or the limit has passed."""
        if not _is_http(self.uri) or getattr(self._local, "depth", 0):
            return fn()  # no server to wait for, or already inside a call that waits
        self._local.depth = 1
        try:
            while True:
                self.wait_until_up(what)
                try:
                    out = fn()
                except MlflowUnavailable:
                    raise
                except Exception as e:  # noqa: BLE001
                    # A refusal from a reachable server is the caller's to see; an unreachable
                    # server (even if it answers the probe again by now) is waited for.
                    if not _looks_unavailable(e) and server_up(self.uri):
                        raise
                    self._begin(what, e)
                    self._check_limit(what)
                    time.sleep(PROBE_FIRST_S)
                    continue
                self._end()
                return out
        finally:
            self._local.depth = 0


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text[:300] + "..." if len(text) > 300 else text


# ---- the outbox of a trial's metrics --------------------------------------------------------

def _spool_path(run_id: str) -> Path:
    from worker.paths import data_dir

    return data_dir() / SPOOL_DIR / f"{run_id}.jsonl"


def _metric_rows(metrics) -> list[list]:
    return [[m.key, m.value, m.timestamp, m.step] for m in metrics]


def _metrics_of(rows) -> list:
    from mlflow.entities import Metric

    return [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in rows]


class _Outbox:
    """Metric batches waiting to be sent, in order, by one background thread."""

    def __init__(self, client: "ResilientClient"):
        self.client = client
        self.items: collections.deque[tuple[int, str, list]] = collections.deque()
        self.cond = threading.Condition()
        self.sending = 0  # metric values taken off the deque but not yet sent
        self.error: BaseException | None = None
        self.put_seq = self.sent_seq = 0  # batches queued / sent so far (sent in order)
        self.thread: threading.Thread | None = None

    def put(self, run_id: str, metrics: list) -> int:
        """Queue a batch; returns its number for wait_sent."""
        self.raise_error()
        with self.cond:  # spooled under the lock: a drain of this run cannot unlink the new line
            try:
                path = _spool_path(run_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(json.dumps(_metric_rows(metrics)) + "\n")
            except OSError as e:  # the spool is a second line of defence; the outbox still holds them
                log.warning("could not spool metrics of run %s: %s", run_id, e)
            self.put_seq += 1
            self.items.append((self.put_seq, run_id, metrics))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
                self.thread.start()
            self.cond.notify_all()
            return self.put_seq

    def wait_sent(self, seq: int, timeout: float) -> bool:
        """Wait up to timeout seconds for batch seq to be sent; True if it was."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.sent_seq < seq and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return self.sent_seq >= seq

    def pending(self) -> int:
        """Metric values not yet sent."""
        with self.cond:
            return self.sending + sum(len(m) for _, _, m in self.items)

    def raise_error(self) -> None:
        if self.error is not None:
            raise MlflowUnavailable(str(self.error)) from self.error

    def flush(self) -> None:
        """Wait until every queued point is sent (or the outage limit is passed: raises)."""
        with self.cond:
            while (self.items or self.sending) and self.error is None:
                self.cond.wait(1.0)
        self.raise_error()

    def _take(self) -> tuple[int, str, list]:
        """The oldest batch merged with the following ones of the same run (caller holds cond):
        (number of the last batch taken, run id, metrics)."""
        seq, run_id, metrics = self.items.popleft()
        metrics = list(metrics)
        while self.items and self.items[0][1] == run_id and len(metrics) + len(self.items[0][2]) <= MAX_BATCH:
            seq, _, more = self.items.popleft()
            metrics.extend(more)
        return seq, run_id, metrics

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    if not self.cond.wait(30.0) and not self.items:
                        return  # idle: the next put starts a new thread
                if self.error is not None:
                    return
                seq, run_id, metrics = self._take()
                self.sending = len(metrics)
            try:
                self.client._outage.call(lambda: MlflowClient.log_batch(self.client, run_id, metrics=metrics),
                                         f"logging {len(metrics)} metric value(s)")
            except BaseException as e:  # noqa: BLE001  (given to the trial's next call)
                with self.cond:
                    self.error = e
                    self.sending = 0
                    self.cond.notify_all()
                log.error("MLflow: could not send %d metric value(s) of run %s: %s", len(metrics), run_id,
                          _one_line(e))
                return
            with self.cond:
                # The spool goes before waiters wake: flush() returning means nothing is left to
                # resend (a process that exits right after must not leave its points spooled).
                if not any(r == run_id for _, r, _ in self.items):
                    try:
                        _spool_path(run_id).unlink(missing_ok=True)
                    except OSError:
                        pass
                self.sending = 0
                self.sent_seq = seq
                self.cond.notify_all()


# ---- the client ------------------------------------------------------------------------------

# MlflowClient methods the sweep uses, made through the outage wait (and after the outbox is sent).
_WAITING_METHODS = (
    "get_experiment_by_name", "create_experiment", "restore_experiment", "get_experiment", "search_runs",
    "get_run", "create_run", "update_run", "set_terminated", "delete_run", "log_batch", "log_metric",
    "log_param", "set_tag", "get_metric_history", "log_text", "log_dict", "log_figure", "log_image",
    "log_artifact", "log_artifacts", "list_artifacts", "download_artifacts", "search_logged_models",
    "get_logged_model", "create_logged_model", "finalize_logged_model", "delete_logged_model",
)


class ResilientClient(MlflowClient):
    """An MlflowClient that waits out MLflow server outages (see the module docstring)."""

    def __init__(self, tracking_uri: str, outage_limit_s: float | None = None):
        super().__init__(tracking_uri)
        self.uri = tracking_uri
        self._outage = _Outage(tracking_uri, outage_limit_s)
        self.outbox = _Outbox(self)
        _OUTBOXES.add(self.outbox)

    def flush(self) -> None:
        if threading.current_thread() is not self.outbox.thread:
            self.outbox.flush()

    def call(self, fn: Callable[[], T], what: str) -> T:
        """fn() (e.g. fluent MLflow calls) after the outbox is sent, waiting out an outage."""
        self.flush()
        return self._outage.call(fn, what)


_OUTBOXES: "weakref.WeakSet[_Outbox]" = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """A process that ends normally (e.g. a trial actor Tune stops gracefully) sends what it still
    holds, for a few seconds at most; what is left stays in the spool."""
    for box in list(_OUTBOXES):
        if box.put_seq > box.sent_seq and box.error is None:
            box.wait_sent(box.put_seq, EXIT_FLUSH_S)


def _waiting(name: str):
    raw = getattr(MlflowClient, name)

    def method(self, *args, **kwargs):
        if getattr(self._outage._local, "depth", 0):  # MlflowClient calling itself
            return raw(self, *args, **kwargs)
        return self.call(lambda: raw(self, *args, **kwargs), name)

    method.__name__ = name
    method.__doc__ = raw.__doc__
    return method


for _name in _WAITING_METHODS:
    if hasattr(MlflowClient, _name):
        setattr(ResilientClient, _name, _waiting(_name))


def client(tracking_uri: str) -> ResilientClient:
    mlflow.set_tracking_uri(tracking_uri)
    return ResilientClient(tracking_uri)


def with_retry(c: MlflowClient, what: str, fn: Callable[[], T]) -> T:
    """fn() through c's outage wait (for the fluent API: artifacts, the model); plain fn() for a
    client that is not a ResilientClient."""
    return c.call(fn, what) if isinstance(c, ResilientClient) else fn()


def flush(c: MlflowClient) -> None:
    """Send every buffered metric now (raises MlflowUnavailable past the outage limit)."""
    if isinstance(c, ResilientClient):
        c.flush()


def replay_spool(c: MlflowClient, run_id: str) -> int:
    """Send the metrics an earlier attempt left unsent in run_id's spool file; returns how many.
    Already-stored points are not stored twice (same key, step, value and timestamp)."""
    path = _spool_path(run_id)
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    rows = []
    for line in lines:
        try:
            rows.extend(json.loads(line))
        except ValueError:
            pass  # a line cut short by the kill
    for i in range(0, len(rows), MAX_BATCH):
        c.log_batch(run_id, metrics=_metrics_of(rows[i : i + MAX_BATCH]))
    path.unlink(missing_ok=True)
    if rows:
        log.info("run %s: sent %d metric value(s) an earlier attempt had buffered", run_id, len(rows))
    return len(rows)


# ---- runs ------------------------------------------------------------------------------------

# The experiment's kind. Earlier MLflow 3 UIs open an experiment by it (model training: on its
# runs); 3.17's follows its sidebar switch instead (see ui_link), which is why the links exist.
TAG_EXPERIMENT_KIND, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if TAG_EXPERIMENT_KIND not in exp.tags:  # a kind the user chose is kept
            c.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return c.create_experiment(name, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def log_dataset(c: MlflowClient, run_id: str, name: str, features, targets, context: str = "train") -> str:
    """Record the data a trial trained on as the run's dataset input (MLflow's Dataset column):
    its name and a digest of its rows, so runs on different data (dataset, subset, seed of the
    split) are told apart. Returns the digest."""
    from mlflow.entities import DatasetInput, InputTag

    ds = mlflow.data.from_numpy(features, targets=targets, name=name)
    inputs = [DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    try:
        c.log_inputs(run_id, datasets=inputs)
    except mlflow.exceptions.MlflowException as e:
        # Trials that start together log the same rows into the experiment at once, and the
        # store's insert of the shared dataset row can lose that race ("UNIQUE constraint
        # failed"). The row exists now: linking it to this run again succeeds.
        if "unique constraint" not in str(e).lower() and "duplicate" not in str(e).lower():
            raise
        c.log_inputs(run_id, datasets=inputs)
    return ds.digest


# MLflow 3.17's UI opens an experiment on the side of its sidebar switch (GenAI | Model training)
# that the browser last chose, GenAI in a new browser: a traces overview with nothing in it. A link
# carrying workflowType=machine_learning opens on the runs whatever the switch says. Links are
# relative (the UI's hash routes), so they work wherever the store is served.
UI_QUERY = {"workflowType": "machine_learning"}
TAG_OWN_NOTE = "tp.note"  # the experiment description a sweep last wrote (one a user wrote is kept)


def ui_link(exp_id: str, run_id: str | None = None, artifact: str | None = None, *, trials_of: str | None = None,
            metric: str | None = None, mode: str = "max", charts: bool = False) -> str:
    """A link into the MLflow UI: an experiment's runs, a run or one of its artifacts, or the
    trials of sweep ``trials_of`` without its parent run, best ``metric`` first, as the table or
    the charts (the UI charts the first 10 runs listed). Sorted by anything but time, the UI lists
    runs flat; sorted by time it nests them under their collapsed parent, which hid the trials
    from the table and the charts."""
    from urllib.parse import quote, urlencode

    query = dict(UI_QUERY)
    if run_id:
        path = f"#/experiments/{exp_id}/runs/{run_id}" + (f"/artifacts/{artifact}" if artifact else "")
    else:
        path = f"#/experiments/{exp_id}/runs"
        if trials_of:
            if not metric:
                raise ValueError("a sweep's trials are listed flat only sorted by a metric")
            query["searchFilter"] = f"tags.`{TAG_KIND}` = '{KIND_TRIAL}' and tags.`{TAG_SWEEP}` = '{trials_of}'"
        if metric:
            query["orderByKey"], query["orderByAsc"] = f"metrics.`{metric}`", str(mode == "min").lower()
        if charts:
            query["compareRunsMode"] = "CHART"
    return path + "?" + urlencode(query, quote_via=quote)


def sweep_links(exp_id: str, parent_id: str, sweep_id: str, metric: str, mode: str = "max") -> dict[str, str]:
    """The UI's pages of a sweep: its comparison table and plots (artifacts of the parent run,
    there once the sweep ends), its trials as a table and as charts, its parent run."""
    return {
        "comparison": ui_link(exp_id, parent_id, "comparison/comparison.md"),
        "plots": ui_link(exp_id, parent_id, "comparison"),
        "trials": ui_link(exp_id, trials_of=sweep_id, metric=metric, mode=mode),
        "charts": ui_link(exp_id, trials_of=sweep_id, metric=metric, mode=mode, charts=True),
        "parent": ui_link(exp_id, parent_id),
    }


# The parent run's description (MLflow shows it on the run's page, in Markdown): where the
# comparison is, as links.
PARENT_NOTE = (
    "Sweep {sweep_id}: one nested run per trial. When it ends, the comparison of the rules is in this "
    "run's artifacts: [the table]({comparison}) (`comparison/comparison.md`) and [the plots]({plots}) "
    "beside it; `spec.yaml` is the spec it ran. Its trials, best first: [table]({trials}), [charts]({charts})."
)


def experiment_note(sweep_id: str, state: str, done: int, n_trials: int, metric: str, best: dict[str, float],
                    links: dict[str, str]) -> str:
    """The experiment's description, about its latest sweep. The runs page shows it above the
    runs table, folded to about one line: the links come first, short enough to stay in it; the
    figures follow. (The experiments list shows the first words, unrendered.)"""
    trials = f"{n_trials} trials" if done == n_trials else f"{done} of {n_trials} trials done"
    head = (f"Latest sweep {sweep_id} ({state}, {trials}): [rule comparison]({links['comparison']}) · "
            f"[plots]({links['plots']}) · [trials]({links['trials']}) · [charts]({links['charts']})")
    figures = ", ".join(f"{k} {v:.4f}" for k, v in best.items())
    return head + (f"\n\n{metric}, mean over seeds of each rule's best config: {figures}." if figures else "")


def describe_experiment(c: MlflowClient, exp_id: str, note: str) -> bool:
    """Set the experiment's description to ``note`` unless a user wrote their own (one that is not
    the note a sweep last wrote). True if it was set."""
    tags = c.get_experiment(exp_id).tags
    current = tags.get(TAG_NOTE)
    if current and current != tags.get(TAG_OWN_NOTE):
        return False
    c.set_experiment_tag(exp_id, TAG_NOTE, note)
    c.set_experiment_tag(exp_id, TAG_OWN_NOTE, note)
    return True


def find_run(c: MlflowClient, exp_id: str, **tags: str):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([exp_id], filter_string=flt, max_results=2, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def parent_run(c: MlflowClient, exp_id: str, sweep_id: str, spec_yaml: str, description: str = "",
               metric: str | None = None, mode: str | None = None) -> str:
    """The sweep's parent run, created once; a resumed sweep reopens it. ``metric`` and ``mode``
    (the spec's search metric, by default a spec's default) order the trials its description
    links to."""
    from worker.spec.sections import SearchConfig

    run = find_run(c, exp_id, **{TAG_SWEEP: sweep_id, TAG_KIND: KIND_SWEEP})
    if run is not None:
        c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = c.create_run(exp_id, run_name=f"sweep {sweep_id}", tags={TAG_SWEEP: sweep_id, TAG_KIND: KIND_SWEEP})
    run_id = run.info.run_id
    # The links name the run, so the description comes once it exists.
    default = SearchConfig()
    links = sweep_links(exp_id, run_id, sweep_id, metric or default.metric, mode or default.mode)
    note = PARENT_NOTE.format(sweep_id=sweep_id, **links)
    c.set_tag(run_id, TAG_NOTE, "\n\n".join(t for t in (description, note) if t))
    c.log_text(run_id, spec_yaml, "spec.yaml")
    return run_id


def child_run(c: MlflowClient, exp_id: str, parent_id: str, sweep_id: str, trial_id: str,
              tags: dict[str, str], params: dict[str, Any], name: str) -> tuple[str, bool]:
    """(run_id, created). A retried trial gets its existing run back, with the metrics a killed
    attempt left buffered sent and the logged models it left PENDING removed."""
    run = find_run(c, exp_id, **{TAG_SWEEP: sweep_id, TAG_TRIAL: trial_id})
    if run is not None:
        run_id = run.info.run_id
        c.update_run(run_id, status="RUNNING")
        replay_spool(c, run_id)
        discard_pending_models(c, exp_id, run_id)
        return run_id, False
    all_tags = {TAG_SWEEP: sweep_id, TAG_TRIAL: trial_id, TAG_KIND: KIND_TRIAL,
                TAG_PARENT: parent_id, TAG_STATUS: TrialStatus.RUNNING.value, **tags}
    run = c.create_run(exp_id, run_name=name, tags=all_tags)
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id, True


def discard_pending_models(c: MlflowClient, exp_id: str, run_id: str) -> list[str]:
    """Delete the logged models of run_id left PENDING (an attempt killed, or cut off by an outage,
    while logging its model: their artifacts may be partial) or FAILED; returns their ids. The
    trial then logs its model again (worker.trainable: a run keeps one READY model)."""
    from mlflow.entities import LoggedModelStatus

    models, token = [], None
    while True:
        page = c.search_logged_models(experiment_ids=[exp_id], filter_string=f"source_run_id = '{run_id}'",
                                      page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            break
    gone = []
    for m in models:
        if m.status in (LoggedModelStatus.PENDING, LoggedModelStatus.FAILED):
            c.delete_logged_model(m.model_id)
            gone.append(m.model_id)
    if gone:
        log.info("run %s: removed %d unfinished logged model(s) of an earlier attempt: %s", run_id, len(gone),
                 ", ".join(gone))
    return gone


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log one step's metrics. Through a ResilientClient on a server this never waits: the points
    go to the outbox (raises MlflowUnavailable once an outage has outlasted the limit)."""
    import math

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    # MLflow metric names cannot hold every character; '/' is allowed.
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)]
    if not ms:
        return
    if isinstance(c, ResilientClient) and _is_http(c.uri):
        seq = c.outbox.put(run_id, ms)
        # While MLflow answers, wait (a little) until the points are stored, as a plain call would,
        # so a trial that Tune stops right after this epoch's report has them in MLflow.
        deadline = time.monotonic() + SYNC_WAIT_S
        while c._outage.since is None and time.monotonic() < deadline:
            if c.outbox.wait_sent(seq, 0.05):
                break
    else:
        c.log_batch(run_id, metrics=ms)
