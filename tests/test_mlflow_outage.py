"""MLflow server outages, against a real ``mlflow server`` on loopback (sqlite store, proxied
artifacts) that is stopped mid-trial and started again on the same port and store:

* a trial's metrics are buffered while the server is away (log_metrics returns at once, so training
  goes on) and reach MLflow once it is back: every step once, none lost, none twice; artifacts and a
  logged model asked for during the outage wait for it and get through; a tag set during the outage
  too;
* a server that stays away longer than the limit (TP_MLFLOW_OUTAGE_LIMIT_S) fails the trial's next
  call with MlflowUnavailable, and the unsent points stay in the spool for the attempt that resumes;
* a logged model left PENDING by a killed attempt is removed when the trial resumes in its run
  (tracking.child_run), and the resumed attempt's model is the run's one READY model.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
# The stop must outlast what the client does on its own before it settles into waiting: the
# outbox's /health backoff climbs 0.5, 1, 2, 4 s to its 5 s cap (7.5 s), and a log_metrics call
# waits at most SYNC_WAIT_S (5 s) while no outage is known. 20 s gives a few probes at the cap
# (then the restart adds ~10 s more of outage); longer proves nothing more.
OUTAGE_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1:port with one sqlite store and artifact folder across restarts."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / f"server{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [PY, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--serve-artifacts",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.root)

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_up(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        while not self.up():
            assert self.proc.poll() is None, (self.root / f"server{self.starts}.log").read_text()[-3000:]
            assert time.monotonic() - t0 < timeout, "mlflow server did not answer"
            time.sleep(0.2)
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # the port is free again once nothing listens
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """One server for the module (a start on a new store takes ~20 s): each test has its own
    experiment in it, and the tests that need an outage stop it and start it again."""
    srv = Server(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    try:
        srv.wait_up()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(module_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "data"))  # the spool goes here
    if not module_server.up():  # a test that failed mid-outage left it stopped
        module_server.stop()
        module_server.start()
        module_server.wait_up()
    return module_server


def tiny_model():
    from tp_engine.config import TrialConfig
    from tp_engine.data import load_dataset
    from tp_engine.train import train

    cfg = TrialConfig(rule="bp", dataset="xor", hidden=[8, 8], epochs=1, batch_size=50, diag_size=100)
    ds = load_dataset("xor", seed=0)
    return train(cfg, data=ds).model, ds


def trial_run(c, name: str):
    from worker import tracking

    exp = tracking.experiment_id(c, name)
    parent = tracking.parent_run(c, exp, "sw-outage", "name: x\n")
    run_id, created = tracking.child_run(c, exp, parent, "sw-outage", "t1", {}, {"lr": 0.1}, "t1")
    assert created
    return exp, parent, run_id


@pytest.mark.parametrize("text, unreachable", [
    ("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/get failed with exception HTTPConnectionPool("
     "host='127.0.0.1', port=1): Max retries exceeded with url: /x (Caused by NewConnectionError('...: Failed "
     "to establish a new connection: [Errno 111] Connection refused'))", True),
    ("API request to http://h/api/2.0/mlflow/runs/log-batch failed with exception HTTPConnectionPool(host='h', "
     "port=5000): Max retries exceeded with url: /x (Caused by ResponseError('too many 503 error responses'))",
     True),
    ("API request to http://h/api/2.0/mlflow/runs/log-batch failed with exception HTTPConnectionPool(host='h', "
     "port=5000): Max retries exceeded with url: /x (Caused by ResponseError('too many 500 error responses'))",
     False),
    ("RESOURCE_DOES_NOT_EXIST: Run with id=0 not found", False),
])
def test_unreachable_is_told_from_a_refusal(text, unreachable):
    from mlflow.exceptions import MlflowException

    from worker import tracking

    assert tracking._looks_unavailable(MlflowException(text)) is unreachable


def test_outage_mid_trial_buffers_then_delivers_everything_once(server, tmp_path, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from worker import tracking
    from worker.mlflow_model import log_model

    c = tracking.client(server.uri)
    exp, _, run_id = trial_run(c, "outage")
    t = time.monotonic()
    with pytest.raises(mlflow.exceptions.MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        c.get_run("0" * 32)  # a reachable server's refusal is not waited out
    assert time.monotonic() - t < 10
    model, ds = tiny_model()
    step = 0
    slowest = 0.0

    def epoch() -> None:
        nonlocal step, slowest
        step += 1
        t = time.monotonic()
        tracking.log_metrics(c, run_id, {"loss": 1.0 / step, "valid_accuracy": step / 1000.0}, step=step)
        slowest = max(slowest, time.monotonic() - t)

    # The stop outlasts the client's own waits (see OUTAGE_S).
    assert OUTAGE_S >= 3 * tracking.PROBE_MAX_S + tracking.SYNC_WAIT_S
    for _ in range(3):
        epoch()
    tracking.flush(c)
    spool = tracking._spool_path(run_id)
    assert not spool.exists()

    server.stop()
    t_down = time.monotonic()
    steps_before = step
    after: dict[str, float] = {}

    def epilogue() -> None:
        # What a trial's end does, asked for while MLflow is away: it waits for the buffered points,
        # then logs the artifacts and the model, then tags and closes the run.
        def artifacts():
            with mlflow.start_run(run_id=run_id):
                log_model(model, tmp_path, ds.x_test[:5])
                mlflow.log_dict({"steps": "all"}, "summary.json")
        tracking.with_retry(c, "artifacts", artifacts)
        after["artifacts"] = time.monotonic()
        c.set_tag(run_id, tracking.TAG_STATUS, "completed")
        after["tag"] = time.monotonic()

    waiting = threading.Thread(target=epilogue, daemon=True)
    while time.monotonic() - t_down < OUTAGE_S:  # "training" goes on: one epoch a second
        epoch()
        if step == steps_before + 5:
            assert spool.exists() and len(spool.read_text().splitlines()) == 5
            waiting.start()
        time.sleep(1.0)
    assert c.outbox.pending() == 2 * (step - steps_before)
    server.start()
    t_start = time.monotonic()
    while not server.up():
        epoch()
        time.sleep(1.0)
    t_up = time.monotonic()
    buffered = step - steps_before
    tracking.flush(c)
    t_sent = time.monotonic()
    waiting.join(120)
    assert not waiting.is_alive() and "tag" in after
    for _ in range(2):
        epoch()
    tracking.flush(c)
    c.set_terminated(run_id, "FINISHED")

    with capsys.disabled():
        print(f"\nMLflow away {t_up - t_down:.1f} s (stopped {t_start - t_down:.1f} s, then {t_up - t_start:.1f} s "
              f"to answer); {buffered} epochs ({2 * buffered} points) buffered, slowest log_metrics "
              f"{slowest * 1000:.1f} ms; buffer sent {t_sent - t_up:.2f} s after the server answered; "
              f"artifacts + model {after['artifacts'] - t_up:.1f} s after")
    assert slowest < 2.0  # training never waited on MLflow (its own retries wait minutes)
    assert not spool.exists()
    fresh = MlflowClient(server.uri)  # what anyone else sees
    for key in ("loss", "valid_accuracy"):
        hist = fresh.get_metric_history(run_id, key)
        assert sorted(m.step for m in hist) == list(range(1, step + 1)), key  # none lost, none twice
    run = fresh.get_run(run_id)
    assert run.data.tags[tracking.TAG_STATUS] == "completed" and run.info.status == "FINISHED"
    assert {a.path for a in fresh.list_artifacts(run_id)} >= {"summary.json"}
    models = fresh.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    assert [m.status.name for m in models] == ["READY"]
    loaded = mlflow.pyfunc.load_model(models[0].model_uri)
    assert loaded.predict(ds.x_test[:5]).shape[0] == 5


def test_outage_longer_than_the_limit_fails_the_trial_and_keeps_the_points(server, monkeypatch):
    from worker import tracking

    c = tracking.client(server.uri)
    exp, parent, run_id = trial_run(c, "limit")
    tracking.log_metrics(c, run_id, {"loss": 1.0}, step=1)
    tracking.flush(c)
    server.stop()
    monkeypatch.setenv(tracking.OUTAGE_LIMIT_ENV, "4")
    c2 = tracking.client(server.uri)  # a trial process started with the limit set
    t0 = time.monotonic()
    tracking.log_metrics(c2, run_id, {"loss": 0.5}, step=2)  # buffered: no error yet
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(tracking.MlflowUnavailable, match="TP_MLFLOW_OUTAGE_LIMIT_S"):
        deadline, step = time.monotonic() + 30, 2
        while time.monotonic() < deadline:  # one epoch every half second
            step += 1
            tracking.log_metrics(c2, run_id, {"loss": 1.0 / step}, step=step)
            time.sleep(0.5)
    assert 4 <= time.monotonic() - t0 < 20
    with pytest.raises(tracking.MlflowUnavailable):
        c2.set_tag(run_id, "x", "y")
    spool = tracking._spool_path(run_id)
    assert spool.exists()  # the unsent points, for the attempt that resumes
    # The trial is retried once MLflow is back: the resumed attempt sends them.
    server.start()
    server.wait_up()
    c3 = tracking.client(server.uri)
    again, created = tracking.child_run(c3, exp, parent, "sw-outage", "t1", {}, {"lr": 0.1}, "t1")
    assert (again, created) == (run_id, False) and not spool.exists()
    # every epoch logged before the error, once (the one that raised was not taken)
    assert sorted(m.step for m in c3.get_metric_history(run_id, "loss")) == list(range(1, step))


def test_pending_model_of_a_killed_attempt_is_removed_when_the_trial_resumes(server, tmp_path):
    import mlflow

    from worker import tracking
    from worker.mlflow_model import log_model

    c = tracking.client(server.uri)
    exp, parent, run_id = trial_run(c, "pending")
    # An attempt killed while logging its model: log_model first makes the logged model (PENDING),
    # then uploads its files, then marks it READY. Killed after part of the upload.
    killed = subprocess.run(
        [PY, "-c", f"""
import os, signal, mlflow
mlflow.set_tracking_uri({server.uri!r})
with mlflow.start_run(run_id={run_id!r}):
    m = mlflow.initialize_logged_model(name="model", source_run_id={run_id!r})
    open("MLmodel", "w").write("partial")
    mlflow.MlflowClient().log_model_artifact(m.model_id, "MLmodel")
    print(m.model_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    pending_id = killed.stdout.split()[0]
    assert c.get_logged_model(pending_id).status.name == "PENDING"

    again, created = tracking.child_run(c, exp, parent, "sw-outage", "t1", {}, {"lr": 0.1}, "t1")
    assert (again, created) == (run_id, False)
    assert c.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'") == []
    model, ds = tiny_model()
    with mlflow.start_run(run_id=run_id):
        log_model(model, tmp_path, ds.x_test[:5])
    models = c.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    assert [m.status.name for m in models] == ["READY"] and models[0].model_id != pending_id


SWEEP_SPEC = """
name: tp-test-mlflow-outage
base: {dataset: mnist, subset: 3000, hidden: [240, 240], epochs: EPOCHS, batch_size: 100}
parameters:
  rule: {distribution: values, values: [dtp]}
search: {method: grid, seeds: [0, 1], max_concurrent_trials: 2}
failure: {max_failures: 0}
"""
# Trials of a second or two an epoch: 30 epochs keep them training before, through and after a
# 20 s stop (plus the restart), which outlasts the client's own waits as OUTAGE_S does.
SWEEP_EPOCHS = 30
SWEEP_OUTAGE_S = 20.0

DRIVER = """
import sys
sys.path.insert(0, {root!r})
from worker.spec import SweepSpec
from worker.sweep import run_sweep
spec = SweepSpec.from_yaml(open({spec!r}).read())
r = run_sweep(spec, {uri!r}, {storage!r}, sweep_id="sw-mlflowout01", num_cpus=2)
print("OUTCOME", r.state, flush=True)
"""


def test_real_sweep_trains_through_an_outage(server, tmp_path):
    """Two MNIST trials (a second or two an epoch each) on a local Ray; MLflow is stopped for 20 s
    once both have logged a few epochs, then started again: the sweep succeeds, both trials' runs
    have every epoch once, points logged while the server was away among them, and a READY model."""
    from mlflow.tracking import MlflowClient

    from worker import tracking
    from worker.spec import SweepSpec

    assert SWEEP_OUTAGE_S >= 3 * tracking.PROBE_MAX_S + tracking.SYNC_WAIT_S
    spec = SweepSpec.from_yaml(SWEEP_SPEC.replace("EPOCHS", str(SWEEP_EPOCHS)))
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    (tmp_path / "driver.py").write_text(DRIVER.format(root=str(REPO), spec=str(tmp_path / "spec.yaml"),
                                                      uri=server.uri, storage=str(tmp_path / "tune")))
    env = {**os.environ, "SWEEP_DATA_DIR": str(tmp_path / "data"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # The MNIST cache of the test run, so nothing is fetched again.
    cache = Path(os.environ.get("SWEEP_DATA_DIR", REPO / "sweep_data")) / "cache"
    (tmp_path / "data").mkdir(exist_ok=True)
    if cache.is_dir():
        (tmp_path / "data" / "cache").symlink_to(cache)
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([PY, str(tmp_path / "driver.py")], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    fresh = MlflowClient(server.uri)
    try:
        t0 = time.monotonic()
        while True:  # both trials have logged 3 epochs
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            assert time.monotonic() - t0 < 240, "trials did not start"
            exp = fresh.get_experiment_by_name(spec.name)
            runs = fresh.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'trial'") if exp else []
            done = [max((m.step for m in fresh.get_metric_history(r.info.run_id, "valid_accuracy")), default=0)
                    for r in runs]
            if len(done) == 2 and min(done) >= 3:
                break
            time.sleep(1)
        server.stop()
        wall_down = time.time() * 1000
        time.sleep(SWEEP_OUTAGE_S)
        assert proc.poll() is None, "the sweep ended while MLflow was away"
        spooled = sorted(p.name for p in (tmp_path / "data" / tracking.SPOOL_DIR).glob("*.jsonl"))
        server.start()
        server.wait_up()
        wall_up = time.time() * 1000
        proc.wait(400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    out = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 0 and "OUTCOME succeeded" in out, out[-4000:]
    assert len(spooled) == 2  # both trials had points waiting while the server was away
    runs = fresh.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'trial'")
    assert len(runs) == 2
    during = 0
    for r in runs:
        hist = fresh.get_metric_history(r.info.run_id, "valid_accuracy")
        assert sorted(m.step for m in hist) == list(range(1, SWEEP_EPOCHS + 1)), r.info.run_name
        during += sum(wall_down < m.timestamp < wall_up for m in hist)
        assert r.info.status == "FINISHED" and r.data.tags[tracking.TAG_STATUS] == "completed"
        models = fresh.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'")
        assert [m.status.name for m in models] == ["READY"]
    assert not list((tmp_path / "data" / tracking.SPOOL_DIR).glob("*.jsonl"))
    print(f"\nsweep: MLflow away {(wall_up - wall_down) / 1000:.0f} s; {during} epochs (of 2 x {SWEEP_EPOCHS}) "
          f"trained and logged meanwhile; every epoch in MLflow once")
    assert during >= 5
