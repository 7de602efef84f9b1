"""The dispatcher: moves queued sweeps onto the Ray cluster as Ray Jobs and follows them.

Runs as a thread inside the API process (``service.api``), or alone:

    python -m service.dispatcher [--poll-interval 1] [--once]

Run exactly one dispatcher per queue.

Every tick (``poll_interval`` seconds, or at once when woken by the API):

1. Each RUNNING sweep is polled. Its Ray Job's submission id is derived from the queue record:
   ``<sweep id>`` for attempt 1 and ``<sweep id>-r<attempt>`` after that (``submission_id``), so
   nothing but the queue has to survive a restart. What the job left in the sweep's folder
   (``worker.lifecycle.SweepFolder``: started.json, progress.json) is copied into the queue. The
   job's end maps to the sweep's end:

   * SUCCEEDED -> succeeded
   * FAILED -> failed (error = Ray's message and the tail of the job's logs); cancelled if a
     cancel was requested; resubmitted (as below) if Ray says the job's supervisor actor died
     (the job was lost with its node, not failed by itself)
   * STOPPED with a cancel request -> cancelled, once no actor of the job is alive any more
     (waits up to ``cancel_settle_s``; the error field notes any that outlived that)
   * STOPPED without a cancel request (someone or something stopped it: the service or the
     cluster died) and a job that has vanished (no such submission id: a new cluster) ->
     resubmitted as ``<id>-r<attempt+1>``; ``worker.job`` resumes from Tune's storage, so
     finished trials are not rerun and their MLflow child runs are reused. After
     ``max_attempts`` attempts the sweep fails instead.

   A running sweep with ``cancel_requested`` gets ``stop_job``: the job's runtime_env sets
   ``RAY_JOB_STOP_SIGNAL=SIGINT`` (Tune saves its state on SIGINT) and
   ``RAY_JOB_STOP_WAIT_TIME_S`` (how long Ray waits before SIGKILL). Ray's job supervisor reads
   both from the job's own environment, so this holds whatever the head was started with.

   Because polling is the same at all times, the first tick after a (re)start *is* the
   reconciliation of every sweep left RUNNING: running jobs are adopted, finished ones get their
   end state, vanished or stopped ones are resubmitted.

2. Queued sweeps are claimed with ``claim_next(max_running=settings.max_concurrent)`` (Ray Jobs
   are not a queue: every submitted job starts at once), their spec is written to
   ``sweeps_dir/<id>/spec.yaml`` and the job ``python -m worker.job <id>`` is submitted with
   ``submission_id`` as above. A submission id that already exists is adopted, not an error.

   A submission that fails because the cluster is not ready (``cluster_not_ready``: the Jobs API
   cannot be reached, answers 502/503/504, or a head that has just (re)started answers 500 "No
   available agent to submit job" while its job agent registers) created no job: the sweep stays
   RUNNING on the same attempt and the same submission id is submitted again after a backoff
   (``not_ready_backoff``: 1 s doubling to 30 s), with a log line each time. Such waits never use
   up an attempt. ``job.json`` is written once Ray has taken the job, so a dispatcher restarted
   meanwhile sees that the current attempt never reached Ray (its job.json names an earlier
   submission, or there is none) and submits it again instead of counting a lost job.

Ray's Jobs API is reached at ``settings.ray_address`` (``RAY_ADDRESS``, e.g.
http://127.0.0.1:8265). Ray 2.60 clusters use token auth: this process needs ``RAY_AUTH_MODE=token``
and the cluster's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
While the Jobs API cannot be reached nothing is changed; the dispatcher retries every tick.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from service.queue import (UNAVAILABLE_ERRORS, InvalidTransition, SweepQueue, SweepRecord, SweepState,
                           unavailable_reason)
from service.settings import Settings
from worker.lifecycle import SweepFolder

log = logging.getLogger("service.dispatcher")

ENTRYPOINT = "python -m worker.job {sweep_id}"
# Variables of the service's environment passed on to the job when set (trials inherit them).
PASS_THROUGH_ENV = ("TP_TRIAL_HOOKS", "TF_CPP_MIN_LOG_LEVEL", "TP_MLFLOW_OUTAGE_LIMIT_S")
# Ray job error types that say the job was lost rather than that the sweep failed: resubmitted.
INFRA_ERRORS = frozenset({"JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE"})


def submission_id(sweep_id: str, attempt: int) -> str:
    """The Ray Job submission id of a sweep's ``attempt`` (1-based)."""
    return sweep_id if attempt <= 1 else f"{sweep_id}-r{attempt}"


def _tail(text: str, lines: int = 30, chars: int = 4000) -> str:
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-chars:]


class RayUnavailable(Exception):
    """The Jobs API could not be reached (or refused us); nothing was changed."""


class ClusterNotReady(RayUnavailable):
    """A submission found the cluster not ready; no job was made. The sweep waits (logged)."""


# Ray's answers while a (re)started head is not yet ready for jobs (no job is made).
NOT_READY_MARKERS = ("no available agent", "not ready", "please try again later", "failed to connect to ray",
                     "connection refused", "max retries exceeded", "connection aborted", "remotedisconnected",
                     "failed to establish a new connection")
NOT_READY_BACKOFF = (1.0, 30.0)  # seconds: first wait, longest wait


def cluster_not_ready(e: BaseException) -> bool:
    """True if a failed submit_job says the cluster is not (yet) able to take jobs, so no job was
    made: a connection error, HTTP 502/503/504, or an HTTP 500 whose message says so (a new
    head's "No available agent to submit job, please try again later")."""
    import requests

    if isinstance(e, RayUnavailable) and not isinstance(e, ClusterNotReady):
        return True  # raised by client(): the Jobs API could not be reached at all
    if isinstance(e, (requests.exceptions.ConnectionError, ConnectionError)):
        return True
    code = _status_code(e)
    text = str(e).lower()
    if code in (502, 503, 504):
        return True
    if code is not None and code != 500:
        return False
    return any(m in text for m in NOT_READY_MARKERS)


def not_ready_backoff(waits: int) -> float:
    """Seconds before the submission after the ``waits``-th not-ready answer (1, 2, 4, ..., 30)."""
    first, longest = NOT_READY_BACKOFF
    return min(longest, first * 2 ** max(0, waits - 1))


@dataclass
class _Follow:
    """What this process remembers about one running sweep (lost on restart, which is fine)."""

    submission_id: str
    stop_sent_at: float | None = None
    stopped_seen_at: float | None = None
    # Not yet taken by Ray (the cluster was not ready): when to submit again, and how many waits.
    submit_at: float | None = None
    not_ready: int = 0


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        queue: SweepQueue,
        *,
        poll_interval: float = 1.0,
        max_attempts: int = 3,
        stop_wait_s: int = 60,
        cancel_settle_s: float = 30.0,
        extra_env: dict[str, str] | None = None,
    ):
        self.settings = settings
        self.queue = queue
        self.poll_interval = float(poll_interval)
        self.max_attempts = int(max_attempts)
        self.stop_wait_s = int(stop_wait_s)
        self.cancel_settle_s = float(cancel_settle_s)
        self.extra_env = dict(extra_env or {})
        self._client = None
        self._follow: dict[str, _Follow] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> threading.Thread:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="sweep-dispatcher", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling (running jobs keep running on Ray; a restart adopts them)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def run(self) -> None:
        log.info("dispatcher started: Ray %s, max %d sweep(s) at once, poll %.1fs",
                 self.settings.ray_address, self.settings.max_concurrent, self.poll_interval)
        while not self._stop.is_set():
            try:
                self.tick()
                if self._last_error:
                    log.info("dispatcher recovered")
                    self._last_error = None
            except UNAVAILABLE_ERRORS as e:
                # The queue database is away (restarting, locked): nothing half-done is lost (each
                # queue call is one transaction) and the next tick reconnects (pool_pre_ping).
                msg = f"queue database unavailable: {unavailable_reason(e)}"
                if msg != self._last_error:
                    log.warning("dispatcher tick failed (retrying every %.1fs): %s", self.poll_interval, msg)
                    self._last_error = msg
            except ClusterNotReady:
                self._client = None  # launch() said it; a new head wants a new client
            except Exception as e:  # keep the loop alive whatever happens; say it once
                msg = f"{type(e).__name__}: {e}"
                if msg != self._last_error:
                    log.warning("dispatcher tick failed (retrying every %.1fs): %s", self.poll_interval, msg,
                                exc_info=not isinstance(e, RayUnavailable))
                    self._last_error = msg
                self._client = None
            self._wake.wait(self.poll_interval)
            self._wake.clear()
        log.info("dispatcher stopped")

    # ---- Ray -----------------------------------------------------------------------------

    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.settings.ray_address)
            except Exception as e:
                raise RayUnavailable(f"cannot reach the Ray Jobs API at {self.settings.ray_address}: "
                                     f"{_one_line(e)}{_auth_hint(e)}") from None
        return self._client

    def _job_info(self, sub_id: str):
        """JobDetails, or None if Ray has no such job."""
        try:
            return self.client().get_job_info(sub_id)
        except RuntimeError as e:
            if _status_code(e) == 404 or "does not exist" in str(e):
                return None
            raise RayUnavailable(f"get_job_info({sub_id}): {_one_line(e)}{_auth_hint(e)}") from None
        except Exception as e:  # requests' connection errors and the like
            raise RayUnavailable(f"get_job_info({sub_id}): {_one_line(e)}") from None

    def runtime_env(self) -> dict[str, Any]:
        env = {
            "MLFLOW_TRACKING_URI": self.settings.tracking_uri,
            "SWEEP_DATA_DIR": str(self.settings.data_dir),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # Read by Ray's job supervisor (it runs with the job's env_vars): stop = SIGINT, so
            # Tune saves the experiment, then SIGKILL after this many seconds.
            "RAY_JOB_STOP_SIGNAL": "SIGINT",
            "RAY_JOB_STOP_WAIT_TIME_S": str(self.stop_wait_s),
        }
        for name in PASS_THROUGH_ENV:
            if os.environ.get(name):
                env[name] = os.environ[name]
        env.update(self.extra_env)
        return {"env_vars": env}

    def _alive_actors(self, job_id: str | None) -> list[Any]:
        """Actors of a Ray job (hex job id) still alive (trials are ImplicitFunc actors)."""
        if not job_id:
            return []
        from ray.util.state import list_actors

        try:
            return list_actors(address=self.settings.ray_address,
                               filters=[("job_id", "=", job_id), ("state", "=", "ALIVE")],
                               limit=1000, raise_on_missing_output=False)
        except Exception as e:
            log.warning("listing the actors of job %s failed: %s", job_id, _one_line(e))
            return []

    # ---- one tick ------------------------------------------------------------------------

    def tick(self) -> None:
        """Poll every running sweep, then start queued ones while there is room."""
        for rec in self.queue.running():
            self.poll(rec)
        live = {r.id for r in self.queue.running()}
        for sid in list(self._follow):
            if sid not in live:
                del self._follow[sid]
        self.client()  # don't claim anything while Ray cannot be reached
        while not self._stop.is_set():
            rec = self.queue.claim_next(max_running=self.settings.max_concurrent)
            if rec is None:
                break
            self.launch(rec)

    def launch(self, rec: SweepRecord) -> None:
        """Write the spec and submit (or adopt) the Ray Job of ``rec``'s current attempt. If the
        cluster is not ready, the sweep stays RUNNING on this attempt and ``poll`` submits it again
        after a backoff (raises ClusterNotReady, so this tick claims nothing more)."""
        sub_id = submission_id(rec.id, rec.attempts)
        folder = SweepFolder(self.settings.data_dir, rec.id)
        folder.write_spec(rec.spec_yaml)
        try:
            self.client().submit_job(
                entrypoint=ENTRYPOINT.format(sweep_id=rec.id),
                submission_id=sub_id,
                runtime_env=self.runtime_env(),
                metadata={"sweep_id": rec.id, "attempt": str(rec.attempts), "name": rec.name[:200]},
            )
            log.info("%s: submitted Ray job %s (attempt %d)", rec.id, sub_id, rec.attempts)
        except Exception as e:
            if isinstance(e, RuntimeError) and "already exists" in str(e):
                log.info("%s: Ray job %s already exists: adopting it", rec.id, sub_id)
            elif cluster_not_ready(e):
                self._wait_for_cluster(rec, sub_id, e)
            elif isinstance(e, RuntimeError):
                code = _status_code(e)
                if code is not None and 400 <= code < 500 and code not in (401, 403, 408, 429):
                    # Ray refused this job (bad request): retrying would not help.
                    log.error("%s: Ray refused job %s: %s", rec.id, sub_id, _one_line(e))
                    self._finish(rec, SweepState.FAILED, f"Ray refused the job {sub_id}: {_one_line(e)}")
                    return
                # Other 5xx, auth, timeouts: the cluster (or our access to it) is unwell; retry later.
                self._requeue(rec, f"submit {sub_id}: {_one_line(e)}")
                raise RayUnavailable(f"submit_job({sub_id}): {_one_line(e)}{_auth_hint(e)}") from None
            else:
                self._requeue(rec, f"submit {sub_id}: {_one_line(e)}")
                raise RayUnavailable(f"submit_job({sub_id}): {_one_line(e)}") from None
        folder.write_job(sub_id, rec.attempts, self.settings.ray_address)  # Ray has it now
        self._follow[rec.id] = _Follow(sub_id)

    def _wait_for_cluster(self, rec: SweepRecord, sub_id: str, e: BaseException) -> None:
        """The cluster is not ready: keep the sweep RUNNING on this attempt, submit again later."""
        follow = self._follow.get(rec.id)
        if follow is None or follow.submission_id != sub_id:
            follow = self._follow[rec.id] = _Follow(sub_id)
        follow.not_ready += 1
        wait = not_ready_backoff(follow.not_ready)
        follow.submit_at = time.monotonic() + wait
        log.warning("%s: Ray cluster not ready for job %s (%s); submitting it again in %.0fs "
                    "(wait %d; attempt %d of %d, not used up by waiting)", rec.id, sub_id, _one_line(e), wait,
                    follow.not_ready, rec.attempts, self.max_attempts)
        raise ClusterNotReady(f"submit_job({sub_id}): {_one_line(e)}")

    def poll(self, rec: SweepRecord) -> None:
        """Follow one RUNNING sweep (also: reconcile it after a restart)."""
        sub_id = submission_id(rec.id, rec.attempts)
        follow = self._follow.get(rec.id)
        if follow is None or follow.submission_id != sub_id:
            follow = self._follow[rec.id] = _Follow(sub_id)
        self._sync_files(rec)
        if follow.submit_at is not None:  # waiting for the cluster to take this attempt's job
            if rec.cancel_requested:
                self._finish(rec, SweepState.CANCELLED, None)
            elif time.monotonic() >= follow.submit_at:
                self.launch(rec)
            return
        info = self._job_info(sub_id)
        if info is None:
            if not self._reached_ray(rec, sub_id):
                # This attempt was never taken by Ray (a dispatcher restarted while the cluster
                # was not ready): submit it now; no attempt is lost.
                log.info("%s: Ray job %s was never submitted: submitting it (attempt %d)", rec.id, sub_id,
                         rec.attempts)
                if rec.cancel_requested:
                    self._finish(rec, SweepState.CANCELLED, None)
                else:
                    self.launch(rec)
                return
            self._resubmit(rec, f"Ray job {sub_id} does not exist (new cluster?)")
            return
        status = str(getattr(info.status, "value", info.status))
        if status in ("PENDING", "RUNNING"):
            if rec.cancel_requested:
                now = time.monotonic()
                # Ask again now and then: a stop sent while the job was still PENDING can be lost.
                if follow.stop_sent_at is None or now - follow.stop_sent_at > max(30.0, self.stop_wait_s):
                    log.info("%s: cancel requested: stopping Ray job %s", rec.id, sub_id)
                    try:
                        self.client().stop_job(sub_id)
                    except RuntimeError as e:
                        log.warning("%s: stop_job(%s) failed: %s", rec.id, sub_id, _one_line(e))
                    follow.stop_sent_at = now
            return
        # The job has ended.
        if status == "SUCCEEDED":
            self._finish(rec, SweepState.SUCCEEDED, None)
        elif status == "FAILED":
            error_type = str(getattr(info.error_type, "value", info.error_type) or "")
            if rec.cancel_requested:
                self._finish(rec, SweepState.CANCELLED, None)
            elif error_type in INFRA_ERRORS:
                # Not the sweep's fault (the supervisor, and with it the driver, was lost, e.g. with
                # its node): run it again; it resumes.
                self._resubmit(rec, f"Ray job {sub_id} failed: {error_type}: {_one_line(info.message or '')}")
            else:
                self._finish(rec, SweepState.FAILED, self._failure_text(sub_id, info))
        elif status == "STOPPED":
            if rec.cancel_requested:
                self._settle_cancel(rec, follow, info)
            else:
                self._resubmit(rec, f"Ray job {sub_id} was stopped without a cancel request")
        else:
            log.warning("%s: Ray job %s has unknown status %s", rec.id, sub_id, status)

    # ---- helpers -------------------------------------------------------------------------

    def _reached_ray(self, rec: SweepRecord, sub_id: str) -> bool:
        """Did Ray ever take ``sub_id``? job.json is written once it has (see launch)."""
        from worker.lifecycle import JOB, read_json

        job = read_json(SweepFolder(self.settings.data_dir, rec.id).path / JOB) or {}
        return job.get("submission_id") == sub_id

    def _sync_files(self, rec: SweepRecord) -> SweepRecord:
        """Copy the job's started.json / progress.json into the queue when they changed."""
        folder = SweepFolder(self.settings.data_dir, rec.id)
        started = folder.started()
        progress = folder.progress()
        exp = run = None
        if started:
            exp = str(started.get("experiment_id") or "") or None
            run = str(started.get("parent_run_id") or "") or None
            if exp == rec.mlflow_experiment_id:
                exp = None
            if run == rec.mlflow_parent_run_id:
                run = None
        if progress == rec.progress:
            progress = None
        if exp or run or progress is not None:
            self.queue.update(rec.id, progress=progress, mlflow_experiment_id=exp, mlflow_parent_run_id=run)
        return rec

    def _finish(self, rec: SweepRecord, state: SweepState, error: str | None) -> None:
        self._sync_files(rec)
        self._final_progress(rec)
        try:
            self.queue.mark(rec.id, state, error=error)
            log.info("%s: %s%s", rec.id, state.value, f" ({error.splitlines()[0]})" if error else "")
        except InvalidTransition as e:
            log.info("%s: not marked %s: %s", rec.id, state.value, e)
        self._follow.pop(rec.id, None)

    def _final_progress(self, rec: SweepRecord) -> None:
        """Progress with the final counts of the job's result.json (a job that died before
        writing its final progress.json still gets them, if it wrote a result)."""
        progress = SweepFolder(self.settings.data_dir, rec.id).final_progress(rec.progress)
        if progress is not None:
            self.queue.update(rec.id, progress=progress)

    def _requeue(self, rec: SweepRecord, why: str) -> None:
        try:
            new = self.queue.mark(rec.id, SweepState.QUEUED)
            log.warning("%s: back to %s (%s)", rec.id, new.state.value, why)
        except (InvalidTransition, KeyError) as e:
            log.warning("%s: could not requeue: %s", rec.id, e)
        self._follow.pop(rec.id, None)

    def _resubmit(self, rec: SweepRecord, why: str) -> None:
        """The job is gone or was stopped from outside: run the sweep again (it resumes)."""
        if rec.cancel_requested:
            self._finish(rec, SweepState.CANCELLED, None)
            return
        if rec.attempts >= self.max_attempts:
            self._finish(rec, SweepState.FAILED, f"{why}; giving up after {rec.attempts} attempt(s)")
            return
        log.warning("%s: %s: resubmitting (attempt %d)", rec.id, why, rec.attempts + 1)
        # running -> queued -> running: attempts += 1, so the new job gets a new submission id.
        # (If a cancel arrives in between, mark(QUEUED) makes it CANCELLED instead.)
        back = self.queue.mark(rec.id, SweepState.QUEUED)
        if back.state is not SweepState.QUEUED:
            self._follow.pop(rec.id, None)
            return
        self.launch(self.queue.mark(rec.id, SweepState.RUNNING))

    def _settle_cancel(self, rec: SweepRecord, follow: _Follow, info) -> None:
        """The job stopped after a cancel: mark cancelled once none of its actors is alive."""
        now = time.monotonic()
        if follow.stopped_seen_at is None:
            follow.stopped_seen_at = now
        alive = self._alive_actors(getattr(info, "job_id", None))
        if alive and now - follow.stopped_seen_at < self.cancel_settle_s:
            log.info("%s: job stopped; waiting for %d actor(s) to exit", rec.id, len(alive))
            return
        note = None
        if alive:
            names = sorted({getattr(a, "class_name", "?") for a in alive})
            note = (f"cancelled, but {len(alive)} actor(s) of Ray job {info.job_id} ({', '.join(names)}) "
                    f"were still alive {self.cancel_settle_s:.0f}s after the job stopped")
            log.warning("%s: %s", rec.id, note)
        self._finish(rec, SweepState.CANCELLED, note)

    def _failure_text(self, sub_id: str, info) -> str:
        parts = [f"Ray job {sub_id} failed"]
        message = getattr(info, "message", None)
        if message:
            parts[0] += f": {message.strip().splitlines()[0][:500]}"
        try:
            logs = self.client().get_job_logs(sub_id)
        except Exception as e:
            logs = f"(job logs unavailable: {_one_line(e)})"
        if logs and logs.strip():
            parts.append("--- last lines of the job log ---\n" + _tail(logs))
        return "\n".join(parts)


def _status_code(e: BaseException) -> int | None:
    """The HTTP status in Ray's "Request failed with status code NNN: ..." errors."""
    m = re.search(r"status code (\d{3})", str(e))
    return int(m.group(1)) if m else None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:400] + "...") if len(text) > 400 else text or type(e).__name__


def _auth_hint(e: BaseException) -> str:
    s = str(e).lower()
    if "authentication" in s or "401" in s or "403" in s or "token" in s:
        return (" (the cluster uses Ray token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH to the cluster's token)")
    return ""


def main(argv: list[str] | None = None) -> int:
    from service.settings import load

    p = argparse.ArgumentParser(prog="python -m service.dispatcher",
                                description="Run the sweep dispatcher without the API (one per queue).")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls (default 1)")
    p.add_argument("--max-attempts", type=int, default=3, help="Ray job submissions per sweep (default 3)")
    p.add_argument("--once", action="store_true", help="one tick, then exit")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load()
    if not settings.ray_address:
        print("service.dispatcher: RAY_ADDRESS (the Ray Jobs API URL, e.g. http://127.0.0.1:8265) is not set",
              file=sys.stderr)
        return 2
    if args.poll_interval <= 0 or args.max_attempts < 1:
        print("service.dispatcher: --poll-interval must be > 0 and --max-attempts >= 1", file=sys.stderr)
        return 2
    with SweepQueue(settings.db_url) as q:
        d = Dispatcher(settings, q, poll_interval=args.poll_interval, max_attempts=args.max_attempts)
        if args.once:
            try:
                d.tick()
            except RayUnavailable as e:
                print(f"service.dispatcher: {e}", file=sys.stderr)
                return 1
            return 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: d.stop(timeout=0))
        d.start()
        while d._thread is not None and d._thread.is_alive():
            d._thread.join(0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
