"""The dispatcher and a Ray cluster that is not ready for jobs: a submission refused because the
cluster cannot take jobs yet (the Jobs API unreachable, or a (re)started head's HTTP 500 "No
available agent to submit job") created no job, so it is waited out and submitted again on the
same attempt; only a job that Ray took and then lost uses up an attempt.

The end-to-end test runs a real Ray head on loopback: the dispatcher starts while the head is still
coming up, the head's whole session is then SIGKILLed and a new head started on the same ports,
and the sweep must end up running as <id>-r2 (one attempt for the lost job, none for the waits).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.dispatcher import (ClusterNotReady, Dispatcher, RayUnavailable, cluster_not_ready,
                                not_ready_backoff, submission_id)
from service.queue import SweepQueue, SweepState
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
RAY = str(Path(PY).parent / "ray")
NO_AGENT = ("Request failed with status code 500: No available agent to submit job, please try again "
            "later.")


# -- which submission errors mean "not ready" ---------------------------------------------------

@pytest.mark.parametrize("error, not_ready", [
    (RuntimeError(NO_AGENT), True),  # what Ray 2.60's job_head.py answers while no agent is there
    (RuntimeError("Request failed with status code 503: Service Unavailable"), True),
    (RuntimeError("Request failed with status code 502: Bad Gateway"), True),
    (ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:1."), True),
    (RayUnavailable("cannot reach the Ray Jobs API at http://127.0.0.1:1: Connection refused"), True),
    (RuntimeError("Request failed with status code 400: Invalid request: entrypoint must be a string"), False),
    (RuntimeError("Request failed with status code 500: Traceback ... KeyError: 'x'"), False),
    (RuntimeError("Request failed with status code 401: Missing authentication token"), False),
    (ValueError("bad runtime_env"), False),
])
def test_not_ready_errors_are_told_from_the_others(error, not_ready):
    assert cluster_not_ready(error) is not_ready


def test_the_wait_doubles_up_to_30_s():
    assert [not_ready_backoff(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


# -- a real Ray head ------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_pids(sid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getsid(int(d)) == sid:
                    out.add(int(d))
            except OSError:
                pass
    return out


class Head:
    """``ray start --head --block`` on loopback, in a session of its own (its workers stay in it),
    so a crash is a SIGKILL to every process of that session."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.gcs, self.dash, self.agent, self.agent_grpc, self.mgr, self.runtime_env = free_ports(6)
        self.proc: subprocess.Popen | None = None
        self.n = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def start(self) -> None:
        self.n += 1
        # Token auth (ray_token: the same mode and token as this process).
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        # A temp dir per head: the killed head's pointers would make `ray start` refuse.
        temp = Path(f"/tmp/tpdr_{self.gcs}_{self.n}")
        self.temp = temp
        self.log = open(self.tmp / f"head{self.n}.log", "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={self.gcs}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}", "--include-dashboard=true",
             f"--dashboard-agent-listen-port={self.agent}", f"--dashboard-agent-grpc-port={self.agent_grpc}",
             f"--node-manager-port={self.mgr}", f"--runtime-env-agent-port={self.runtime_env}",
             "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.tmp)

    def kill(self) -> None:
        """Every process of the head's session, at once (a crash, not a shutdown)."""
        if self.proc is None:
            return
        sid = self.proc.pid
        for _ in range(20):
            pids = session_pids(sid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.3)
        self.proc.wait(10)
        subprocess.run(["rm", "-rf", str(self.temp)], check=False)


def job_status(client, sub_id: str) -> str | None:
    try:
        return str(client.get_job_info(sub_id).status.value)
    except Exception:  # noqa: BLE001
        return None


@pytest.fixture
def ray_token(tmp_path):
    """Token auth with a token of this test's own, for the head and this process. Ray caches its
    auth mode and token per process: both are reloaded here, and again after the test."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
    from ray._raylet import AuthenticationTokenLoader, Config

    def reload() -> None:
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    path = tmp_path / "ray_token"
    path.write_text(generate_new_authentication_token())
    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
    reload()
    try:
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload()


def test_head_not_ready_then_restarted_uses_one_attempt(tmp_path, monkeypatch, caplog, ray_token):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setattr("service.dispatcher.ENTRYPOINT", f'{PY} -c "import time; time.sleep(900)"')

    def said() -> str:
        return "\n".join(r.getMessage()[:300] for r in caplog.records[-15:])

    def wait_running(sub_id: str, since: float):
        """(client, seconds since ``since``) once the head, coming up while the dispatcher keeps
        trying, runs the job ``sub_id``."""
        client = None
        while True:
            assert time.monotonic() - since < 180, said()
            if client is None:
                try:
                    client = JobSubmissionClient(head.address)
                except Exception:  # noqa: BLE001
                    pass
            if client is not None and job_status(client, sub_id) == "RUNNING":
                return client, time.monotonic() - since
            time.sleep(0.5)

    head = Head(tmp_path)
    settings = Settings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", ray_address=head.address,
                        service_url=None, data_dir=tmp_path, db_url=f"sqlite:///{tmp_path / 'queue.db'}",
                        api_token=None, api_host="127.0.0.1", api_port=0, max_concurrent=1)
    caplog.set_level(logging.INFO, logger="service.dispatcher")
    with SweepQueue(settings.db_url) as q:
        sid = q.submit("t", "name: t\n").id
        # A dispatcher that claimed the sweep and then died before Ray took its job: attempt 1,
        # RUNNING, no job.json. Its successor must submit attempt 1, not count it as lost.
        assert q.claim_next().attempts == 1
        d = Dispatcher(settings, q, poll_interval=0.25)
        t0 = time.monotonic()
        head.start()
        try:
            d.start()
            _, first = wait_running(sid, t0)
            rec = q.get(sid)
            assert rec.state is SweepState.RUNNING and rec.attempts == 1

            # The head crashes; a new one starts on the same ports at once (a new cluster).
            head.kill()
            t1 = time.monotonic()
            head.start()
            r2 = submission_id(sid, 2)
            client, second = wait_running(r2, t1)
            time.sleep(2)  # a few more ticks: nothing changes
            rec = q.get(sid)
            assert rec.state is SweepState.RUNNING and rec.attempts == 2, rec
            assert job_status(client, submission_id(sid, 3)) is None
        finally:
            d.stop()
            head.kill()
    waits = [r.getMessage() for r in caplog.records if "not ready for job" in r.getMessage()]
    no_agent = [w for w in waits if "No available agent" in w]
    # what the run saw (pytest -s shows it)
    print(f"\nfirst head: job running after {first:.1f}s; restarted head: {r2} running after {second:.1f}s; "
          f"{len(waits)} not-ready wait(s), {len(no_agent)} of them 'No available agent'")
    for w in waits:
        print("  ", w[:240])
    assert any("was never submitted" in r.getMessage() for r in caplog.records)
    assert not any("giving up" in r.getMessage() for r in caplog.records)
