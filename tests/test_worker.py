"""The sweep worker end to end: real local Ray (2 CPUs) running real trials, logging to a real
MLflow (a SQLite store per test, and once a real ``mlflow server`` over HTTP with proxied
artifacts).

Covered: one child run per trial with per-epoch histories, tags, params and a loadable model; the
comparison left on the parent run; a trial that fails once and resumes from its checkpoint; a
sweep driver killed mid-way and resumed with the same sweep id; a diverging trial; ASHA early
stopping. All trials are tiny (2-D synthetic sets, a few epochs), so the time goes into Ray and
MLflow themselves; one Ray instance is shared by the whole module.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the editable install may not map the packages yet
    sys.path.insert(0, str(ROOT))

from worker import tracking  # noqa: E402
from worker.spec import SweepSpec  # noqa: E402
from worker.sweep import run_sweep  # noqa: E402
from worker.trainable import TRIAL_HOOKS_ENV  # noqa: E402

from tests.faults import FAIL_ONCE_MARKER_ENV  # noqa: E402
from tests.local_ray import local_ray  # noqa: E402

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.timeout(900)

PARENT_ARTIFACTS = {
    "spec.yaml",
    "comparison/comparison.md",
    "comparison/comparison.csv",
    "comparison/learning_curves.png",
    "comparison/angle_bp.png",
}


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fail_marker(tmp_path_factory) -> Path:
    """The tests.faults.fail_once_at_epoch_2 marker every Ray worker of this module sees. While the
    file exists the fault is disarmed (a trial fails only when the marker is missing); a test arms it by deleting
    it."""
    path = tmp_path_factory.mktemp("marker") / "fail_once"
    path.write_text("disarmed")
    return path


@pytest.fixture(scope="module")
def mlflow_server_proc(tmp_path_factory):
    """Start ``mlflow server`` early (it needs 15-50 s to answer on this machine) so it boots while
    the other tests run; ``mlflow_server`` waits for it."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        exe = ROOT / ".venv" / "bin" / "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{d}/server.db",
         "--serve-artifacts", "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=d,
        start_new_session=True,
    )
    info = {"proc": proc, "url": f"http://127.0.0.1:{port}", "log": d / "server.log"}
    yield info
    _kill_group(proc, signal.SIGTERM, grace=15)
    log.close()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_server_proc) -> str:
    proc, url = mlflow_server_proc["proc"], mlflow_server_proc["url"]
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{_tail(mlflow_server_proc['log'])}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow server did not answer /health in 180 s:\n{_tail(mlflow_server_proc['log'])}")


@pytest.fixture(scope="module", autouse=True)
def ray_local(request, fail_marker):
    """One local Ray for the whole module, every trial of which runs the fail-once fault hook."""
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("mlflow_server_proc")  # boot it now, in the background
    with local_ray({TRIAL_HOOKS_ENV: "tests.faults:fail_once_at_epoch_2", FAIL_ONCE_MARKER_ENV: str(fail_marker)}):
        yield


@pytest.fixture(autouse=True)
def _fresh_cwd(tmp_path, monkeypatch):
    """Keep anything a sweep writes relative to the working directory out of the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "sweep_data"))


# ---- helpers ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _kill_group(proc: subprocess.Popen, sig: int, grace: float = 10) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def make_spec(text: str) -> SweepSpec:
    return SweepSpec.from_yaml(textwrap.dedent(text))


def sqlite_store(tmp_path: Path, spec: SweepSpec) -> str:
    """A SQLite tracking URI in tmp_path, with the spec's experiment made beforehand so its
    artifacts also land in tmp_path (not in ./mlruns)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    MlflowClient(uri).create_experiment(spec.name, artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


def children(c: MlflowClient, exp_id: str, parent_id: str):
    return c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                         max_results=1000)


def history(c: MlflowClient, run_id: str, key: str = "valid_accuracy"):
    return sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def steps(c: MlflowClient, run_id: str, key: str = "valid_accuracy") -> list[int]:
    return [m.step for m in history(c, run_id, key)]


def logged_models(exp_id: str, run_id: str, status: str | None = "READY"):
    """The run's logged models (by default only the finished ones: a trial killed while logging
    its model leaves a PENDING one behind)."""
    flt = f"source_run_id = '{run_id}'"
    models = mlflow.search_logged_models(experiment_ids=[exp_id], filter_string=flt, output_format="list")
    return [m for m in models if status is None or str(getattr(m.status, "name", m.status)) == status]


def wait_for(cond, timeout: float, what: str, interval: float = 1.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def check_child(c: MlflowClient, spec: SweepSpec, result, run, epochs: int, status: str = "completed") -> None:
    """A trial's child run: tags, params (the flattened trial config), one point per epoch."""
    t, p = run.data.tags, run.data.params
    assert t["mlflow.parentRunId"] == result.parent_run_id
    assert t[tracking.TAG_SWEEP] == result.sweep_id
    assert t[tracking.TAG_KIND] == "trial"
    assert t[tracking.TAG_TRIAL]
    assert t[tracking.TAG_STATUS] == status, (t[tracking.TAG_STATUS], run.info.run_id)
    assert run.info.status == "FINISHED"
    swept = {k: json.loads(p[k]) if k == "hidden" else p[k] for k in spec.parameters}
    overrides = {k: _param_value(p[k]) for k in spec.parameters}
    cfg = spec.trial_config({**overrides, "seed": int(t["seed"])})
    assert t["rule"] == cfg.rule and t["backend"] == cfg.backend == "numpy"
    assert t["seed"] == str(cfg.seed) and t["dataset"] == cfg.dataset
    assert t["config_hash"] == cfg.config_hash(), swept
    assert p == {k: str(v) for k, v in cfg.flat().items()}
    if status == "completed":
        for key in ("valid_accuracy", "train_loss", "seconds_per_epoch", "angle_bp/1"):
            assert steps(c, run.info.run_id, key) == list(range(1, epochs + 1)), key
        for key in ("setup/mlflow_s", "setup/data_s", "setup/engine_s"):  # once per attempt, at its first epoch
            got = history(c, run.info.run_id, key)
            at = [h.step for h in got]
            assert at and at[0] == 1 and at == sorted(set(at)), (key, at)
            assert all(0.0 <= h.value < 600 for h in got), (key, got)
        m = run.data.metrics
        assert m["final/epochs"] == epochs
        assert 0.0 <= m["final/best_valid_accuracy"] <= 1.0


def _param_value(raw: str):
    """An MLflow param string back to the value the spec swept."""
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def check_model(exp_id: str, run_id: str, x: np.ndarray) -> None:
    models = logged_models(exp_id, run_id, status=None)
    assert len(models) == 1, [m.model_id for m in models]
    assert models[0].name == "model"
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.metadata.model_id == models[0].model_id
    pred = np.asarray(model.predict(x))
    assert pred.shape == (len(x),)
    assert set(np.unique(pred)) <= {0, 1}


def check_parent(c: MlflowClient, spec: SweepSpec, result, tmp_path: Path) -> None:
    parent = c.get_run(result.parent_run_id)
    assert parent.data.tags[tracking.TAG_KIND] == "sweep"
    assert parent.data.tags["sweep_state"] == result.state
    assert parent.info.status == ("FINISHED" if result.state == "succeeded" else parent.info.status)
    listed = {a.path for a in c.list_artifacts(result.parent_run_id)}
    listed |= {a.path for a in c.list_artifacts(result.parent_run_id, "comparison")}
    assert PARENT_ARTIFACTS <= listed, listed
    dl = Path(c.download_artifacts(result.parent_run_id, "", str(tmp_path / "parent_dl")))
    assert SweepSpec.from_yaml((dl / "spec.yaml").read_text()) == spec
    md = (dl / "comparison" / "comparison.md").read_text()
    csv_text = (dl / "comparison" / "comparison.csv").read_text()
    rules = sorted({r["rule"] for r in result.table})
    for rule in rules:
        assert f"`{rule}`" in md
        assert f"\n{rule}," in csv_text
    for name in ("learning_curves.png", "angle_bp.png"):
        assert (dl / "comparison" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k, v in result.trial_status.items():
        assert parent.data.metrics[f"trials/{k}"] == v


def statuses_of(runs) -> collections.Counter:
    return collections.Counter(r.data.tags.get(tracking.TAG_STATUS) for r in runs)


def check_uninterrupted(c: MlflowClient, run_id: str, cfg) -> None:
    """The child run's per-epoch metrics are those of the same config trained straight through in
    this process, bit for bit (a resume restarting from fresh weights, or dropping optimizer
    state or a random stream, changes them): every metric but seconds_per_epoch, every epoch once."""
    from tp_engine.train import train

    expected = train(cfg).history
    assert len(expected) == cfg.epochs
    for key in expected[0]:
        if key in ("epoch", "seconds_per_epoch"):
            continue
        got = history(c, run_id, key)
        assert [m.step for m in got] == list(range(1, cfg.epochs + 1)), key
        assert [m.value for m in got] == [h[key] for h in expected], key


# ---- 1. the smoke sweep -----------------------------------------------------------------------

SMOKE = """
name: tp-test-smoke
description: two rules x {n} seed(s) on xor
base: {{dataset: xor, hidden: [8], epochs: 3, batch_size: 50, subset: 600, diag_size: 100}}
parameters:
  rule: {{distribution: values, values: [bp, dtp]}}
search: {{method: grid, seeds: {seeds}, max_concurrent_trials: 2}}
"""


def smoke_spec(seeds: list[int]) -> SweepSpec:
    return make_spec(SMOKE.format(n=len(seeds), seeds=seeds))


def _smoke(uri: str, tmp_path: Path, seeds: list[int]) -> None:
    spec = smoke_spec(seeds)
    n = 2 * len(seeds)
    mlflow.set_tracking_uri(uri)
    seen = []
    result = run_sweep(spec, uri, str(tmp_path / "tune"), num_cpus=2,
                       on_progress=lambda p: seen.append(p.as_dict()))
    assert result.state == "succeeded", result
    assert result.trial_status == {"completed": n}
    assert repr(result.trial_status) == repr({"completed": n})  # printed as such by the CLIs, no enum reprs
    assert result.n_trials == n
    assert seen and seen[-1]["done"] == n and seen[-1]["errored"] == 0

    c = MlflowClient(uri)
    runs = children(c, result.experiment_id, result.parent_run_id)
    assert len(runs) == n, [r.data.tags.get("trial_id") for r in runs]
    assert len({r.data.tags["trial_id"] for r in runs}) == n
    assert sorted((r.data.tags["rule"], r.data.tags["seed"]) for r in runs) == sorted(
        (rule, str(seed)) for rule in ("bp", "dtp") for seed in seeds)
    # Tune created the trials in the dry run's order, longest first: dtp's, then bp's (a trial
    # id ends with its creation index).
    by_index = sorted(runs, key=lambda r: r.data.tags["trial_id"].rsplit("_", 1)[1])
    assert [(r.data.tags["rule"], r.data.tags["seed"]) for r in by_index] == [
        (t["params"]["rule"], str(t["seed"])) for t in spec.expand()]
    assert spec.expand()[0]["params"]["rule"] == "dtp"
    for run in runs:
        check_child(c, spec, result, run, epochs=3)
    from tp_engine.data import load_dataset

    x = load_dataset("xor", seed=0, subset=600).x_test[:17]
    loaded_rules = set()
    for run in runs:
        if run.data.tags["rule"] not in loaded_rules:  # loading costs a few seconds each
            loaded_rules.add(run.data.tags["rule"])
            check_model(result.experiment_id, run.info.run_id, x)
        else:
            assert len(logged_models(result.experiment_id, run.info.run_id, status=None)) == 1
    check_parent(c, spec, result, tmp_path)
    rows = {r["rule"]: r for r in result.table}
    assert set(rows) == {"bp", "dtp"}
    for r in rows.values():
        assert r["trials"] == r["seeds"] == len(seeds) and r["statuses"] == f"completed:{len(seeds)}"
        assert r["epochs"] == 3


def test_smoke_sweep_sqlite(tmp_path):
    _smoke(sqlite_store(tmp_path, smoke_spec([0, 1])), tmp_path, [0, 1])


# ---- 2. a trial that fails once resumes from its checkpoint -----------------------------------


def test_failed_trial_is_retried_from_its_checkpoint(tmp_path, fail_marker):
    spec = make_spec("""
        name: tp-test-fail-once
        base: {dataset: xor, hidden: [8], epochs: 4, batch_size: 50, subset: 600, diag_size: 100}
        parameters:
          rule: {distribution: values, values: [dtp]}
        search: {method: grid, seeds: [0]}
        failure: {max_failures: 2}
    """)
    uri = sqlite_store(tmp_path, spec)
    fail_marker.unlink()  # arm: the first trial to reach epoch 2 raises once
    seen = []
    try:
        result = run_sweep(spec, uri, str(tmp_path / "tune"), num_cpus=2,
                           on_progress=lambda p: seen.append(p.as_dict()))
    finally:
        failed_trial = fail_marker.read_text() if fail_marker.exists() else None
        fail_marker.write_text("disarmed")
    assert failed_trial, "the injected failure never happened"
    assert result.state == "succeeded"
    assert result.trial_status == {"completed": 1}

    c = MlflowClient(uri)
    runs = children(c, result.experiment_id, result.parent_run_id)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["trial_id"] == failed_trial
    check_child(c, spec, result, run, epochs=4)  # epochs 1..4, each exactly once
    assert len(logged_models(result.experiment_id, run.info.run_id, status=None)) == 1

    # It resumed at epoch 2 instead of starting over: Tune got 4 epoch reports in all (epoch 1,
    # then 2, 3 and 4 from the retry; a restart would have reported epoch 1 again), and the
    # restart (a new worker process) sits between epoch 1 and epoch 2 in the MLflow history.
    assert seen[-1]["epochs_reported"] == 4, seen[-1]
    ts = [m.timestamp for m in history(c, run.info.run_id)]
    gaps = np.diff(ts)
    assert gaps[0] == max(gaps), ts
    assert run.data.metrics["final/epochs"] == 4  # the summary includes the checkpointed epoch 1
    # ... and continued exactly: its history is an uninterrupted run's.
    check_uninterrupted(c, run.info.run_id, spec.trial_config({"rule": "dtp", "seed": 0}))


# ---- 3. the sweep driver is killed, and the sweep is resumed ----------------------------------

KILL_SPEC = """
name: tp-test-resume
base: {dataset: xor, hidden: [8], epochs: 4, batch_size: 50, subset: 600, diag_size: 100}
parameters:
  rule: {distribution: values, values: [bp, dtp, lstp]}
search: {method: grid, seeds: [0], max_concurrent_trials: 2}
"""

DRIVER = """
import sys
sys.path.insert(0, {root!r})
from worker.spec import SweepSpec
from worker.sweep import run_sweep
spec = SweepSpec.from_yaml(open({spec!r}).read())
run_sweep(spec, {uri!r}, {storage!r}, sweep_id={sweep_id!r}, num_cpus=2)
"""


def test_killed_sweep_resumes_only_missing_trials(tmp_path):
    spec = make_spec(KILL_SPEC)
    uri = sqlite_store(tmp_path, spec)
    storage = tmp_path / "tune"
    sweep_id = "sw-killtest01"
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    (tmp_path / "driver.py").write_text(DRIVER.format(root=str(ROOT), spec=str(tmp_path / "spec.yaml"),
                                                      uri=uri, storage=str(storage), sweep_id=sweep_id))
    # The driver joins this module's Ray cluster (as a Ray Job's driver would): killing it ends
    # its job, and Ray then kills the job's trial actors.
    env = {k: v for k, v in os.environ.items() if k != TRIAL_HOOKS_ENV}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    c = MlflowClient(uri)
    flt = f"tags.sweep_id = '{sweep_id}' and tags.`tp.kind` = 'trial' and tags.status = 'completed'"
    try:
        exp_id = c.get_experiment_by_name(spec.name).experiment_id
        wait_for(lambda: c.search_runs([exp_id], filter_string=flt), 300,
                 "a trial to complete in the first driver", proc=proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies without any cleanup
        proc.wait(timeout=30)
    finally:
        _kill_group(proc, signal.SIGKILL, grace=5)
        log.close()
    # Ray ends the dead driver's trial actors; wait until their CPUs are free again.
    t_kill = time.time()
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 120, "the killed job's trials to end")
    print(f"[resume] CPUs free {time.time() - t_kill:.1f} s after the kill")

    done_before = {r.info.run_id: r for r in c.search_runs([exp_id], filter_string=flt)}
    assert done_before
    print(f"[resume] completed before the kill: {len(done_before)} of {spec.n_trials()}")
    before = {rid: ([(m.step, m.timestamp, m.value) for m in history(c, rid)], r.info.end_time,
                    r.data.metrics["final/epochs"]) for rid, r in done_before.items()}

    seen = []
    result = run_sweep(spec, uri, str(storage), sweep_id=sweep_id, num_cpus=2,
                       on_progress=lambda p: seen.append(p.as_dict()))
    print(f"[resume] resumed sweep took {result.seconds:.1f} s")
    assert result.state == "succeeded", (result.trial_status, _tail(tmp_path / "driver.log"))
    assert result.trial_status == {"completed": 3}
    runs = children(c, result.experiment_id, result.parent_run_id)
    assert len(runs) == 3, [r.data.tags["trial_id"] for r in runs]
    assert len({r.data.tags["trial_id"] for r in runs}) == 3
    for run in runs:
        check_child(c, spec, result, run, epochs=4)
        assert len(logged_models(result.experiment_id, run.info.run_id)) == 1, run.data.tags["trial_id"]
        # Finished before the kill or resumed after it, each history is an uninterrupted run's.
        check_uninterrupted(c, run.info.run_id, spec.trial_config({"rule": run.data.tags["rule"], "seed": 0}))
    by_id = {r.info.run_id: r for r in runs}
    for rid, (hist, end_time, n_epochs) in before.items():
        # not run again: the same epochs at the same times, and the run was not reopened
        assert [(m.step, m.timestamp, m.value) for m in history(c, rid)] == hist
        assert by_id[rid].info.end_time == end_time, by_id[rid].data.tags["trial_id"]
        assert by_id[rid].data.metrics["final/epochs"] == n_epochs
        assert len(logged_models(result.experiment_id, rid, status=None)) == 1
    assert len([r for r in c.search_runs([exp_id]) if r.data.tags.get("tp.kind") == "sweep"]) == 1
    check_parent(c, spec, result, tmp_path)
    # The resumed run's progress display was fed too.
    assert seen and seen[-1]["done"] == 3


# ---- 3b. the driver dies right after a checkpoint rotation -------------------------------------

# The driver dies (SIGKILL, no cleanup) the moment Tune has registered a trial's third checkpoint:
# the older ones have just been rotated away (Tune's num_to_keep) or pruned (worker.sweep's
# _PruneCheckpoints), while the experiment state on storage still names one of them (Tune
# snapshots it only every few checkpoints or seconds). The resumed sweep must continue that trial
# from its newest checkpoint, not fail it with "does not exist on storage anymore" (the flaky
# failure of test_killed_sweep_resumes_only_missing_trials, here made to happen every time).
ROTATION_DRIVER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from ray.tune.experiment.trial import Trial
from worker.spec import SweepSpec
from worker.sweep import run_sweep

registered = Trial.on_checkpoint
def on_checkpoint(self, result):
    registered(self, result)
    if self.storage.current_checkpoint_index >= 2:  # checkpoint_000002 registered
        # Let a snapshot being copied to storage land first: a state file torn by the kill is
        # another failure (Tune restarts the whole experiment), not the one tested here.
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
Trial.on_checkpoint = on_checkpoint
# A snapshot at every step, so the state names the checkpoint just before (not none at all).
os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
spec = SweepSpec.from_yaml(open({spec!r}).read())
run_sweep(spec, {uri!r}, {storage!r}, sweep_id={sweep_id!r}, num_cpus=2)
"""

ROTATION_SPEC = """
name: tp-test-rotation
base: {dataset: xor, rule: dtp, hidden: [8], epochs: 5, batch_size: 50, subset: 600, diag_size: 100}
search: {method: grid, seeds: [0]}
"""
# The kill point is deterministic, so one run fails every time without the fix (5 of 5 measured
# with Tune's num_to_keep=1 rotation); set TP_ROTATION_REPEATS to repeat it.
ROTATION_REPEATS = int(os.environ.get("TP_ROTATION_REPEATS", "1"))


def test_driver_killed_right_after_checkpoint_rotation_resumes(tmp_path):
    spec = make_spec(ROTATION_SPEC)
    uri = sqlite_store(tmp_path, spec)
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != TRIAL_HOOKS_ENV}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    c = MlflowClient(uri)
    exp_id = c.get_experiment_by_name(spec.name).experiment_id
    outcomes = []
    for rep in range(ROTATION_REPEATS):
        sweep_id, storage = f"sw-rotation{rep:02d}", tmp_path / f"tune{rep}"
        driver = tmp_path / f"driver{rep}.py"
        driver.write_text(ROTATION_DRIVER.format(root=str(ROOT), spec=str(tmp_path / "spec.yaml"), uri=uri,
                                                 storage=str(storage), sweep_id=sweep_id))
        with open(tmp_path / f"driver{rep}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, str(driver)], cwd=tmp_path, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                proc.wait(timeout=240)
            finally:
                _kill_group(proc, signal.SIGKILL, grace=5)
        assert proc.returncode == -signal.SIGKILL, _tail(tmp_path / f"driver{rep}.log")
        wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 120, "the killed job's trial to end")
        seen = []
        result = run_sweep(spec, uri, str(storage), sweep_id=sweep_id, num_cpus=2,
                           on_progress=lambda p: seen.append(p.as_dict()))
        # Epochs Tune got from the resumed trial: 2 when it went on from checkpoint_000002
        # (epoch 3), 5 had it started over.
        outcomes.append((result.trial_status, seen[-1]["epochs_reported"] if seen else 0))
        if result.trial_status != {"completed": 1}:
            continue
        (run,) = children(c, exp_id, result.parent_run_id)
        check_uninterrupted(c, run.info.run_id, spec.trial_config({"seed": 0}))
    print(f"[rotation] outcomes of {ROTATION_REPEATS} kill-after-rotation resumes: {outcomes}")
    assert [o[0] for o in outcomes] == [{"completed": 1}] * ROTATION_REPEATS, outcomes
    # A worker outliving its driver for a moment may finish epoch 4 or 5 itself.
    assert all(1 <= o[1] <= 2 for o in outcomes), outcomes


# ---- 4. a diverging trial ---------------------------------------------------------------------


def test_diverging_trial_is_marked_diverged(tmp_path):
    spec = make_spec("""
        name: tp-test-diverge
        base:
          dataset: xor
          subset: 1000
          rule: dtp
          activation: linear
          hidden: [16, 16]
          alpha: 100
          optimizer: {name: sgd, momentum: 0}
          epochs: 3
          batch_size: 50
          diag_size: 100
        parameters:
          optimizer.lr: {distribution: values, values: [0.001, 10]}
        search: {method: grid, seeds: [0], max_concurrent_trials: 2}
    """)
    uri = sqlite_store(tmp_path, spec)
    result = run_sweep(spec, uri, str(tmp_path / "tune"), num_cpus=2)
    assert result.state == "succeeded"
    assert result.trial_status == {"completed": 1, "diverged": 1}
    c = MlflowClient(uri)
    runs = {r.data.params["optimizer.lr"]: r for r in children(c, result.experiment_id, result.parent_run_id)}
    assert set(runs) == {"0.001", "10.0"}
    check_child(c, spec, result, runs["0.001"], epochs=3, status="completed")
    check_child(c, spec, result, runs["10.0"], epochs=3, status="diverged")
    bad = runs["10.0"].info.run_id
    s = steps(c, bad)
    assert len(s) < 3 and s == list(range(1, len(s) + 1))
    assert result.table[0]["statuses"] == "completed:1 diverged:1"
    check_parent(c, spec, result, tmp_path)


# ---- 5. ASHA early stopping -------------------------------------------------------------------


def test_asha_early_stopping(tmp_path):
    spec = make_spec("""
        name: tp-test-asha
        base: {dataset: spiral, rule: dtp, hidden: [16], epochs: 3, batch_size: 50, subset: 600, diag_size: 100}
        parameters:
          # good rates first, so the poor one meets a populated rung and is cut there
          optimizer.lr: {distribution: values, values: [0.03, 0.003, 0.000001]}
        search: {method: grid, seeds: [0], max_concurrent_trials: 2}
        early_stop: {enabled: true, grace_period: 1, reduction_factor: 2}
    """)
    uri = sqlite_store(tmp_path, spec)
    result = run_sweep(spec, uri, str(tmp_path / "tune"), num_cpus=2)
    assert result.state == "succeeded"
    print(f"[asha] trial statuses: {result.trial_status}")
    assert set(result.trial_status) <= {"completed", "early_stopped"}, result.trial_status
    assert sum(result.trial_status.values()) == 3
    c = MlflowClient(uri)
    runs = children(c, result.experiment_id, result.parent_run_id)
    assert len(runs) == 3
    assert statuses_of(runs) == collections.Counter(result.trial_status)
    for run in runs:
        status = run.data.tags[tracking.TAG_STATUS]
        check_child(c, spec, result, run, epochs=3, status=status)
        if status == "completed":
            assert len(logged_models(result.experiment_id, run.info.run_id, status=None)) == 1
        else:
            s = steps(c, run.info.run_id)
            assert 1 <= len(s) < 3 and s == list(range(1, len(s) + 1))
    counted = collections.Counter()
    for row in result.table:
        for part in row["statuses"].split():
            k, v = part.split(":")
            counted[k] += int(v)
    assert counted == collections.Counter(result.trial_status)
    check_parent(c, spec, result, tmp_path)


# ---- 1b. the smoke sweep against a real MLflow server over HTTP (last: it boots meanwhile) -----


def test_smoke_sweep_mlflow_server(tmp_path, mlflow_server):
    _smoke(mlflow_server, tmp_path, [0])  # one seed: the sqlite run covers the seeds


def test_progress_callback_pickled_by_an_older_version_finds_the_running_sweep():
    """A resumed sweep runs with the callback Tune pickled on its first run. One pickled before the
    callback was keyed by sweep id (progress stored as ``progress``, a random key) must still
    report to the run_sweep call now resuming it, not crash the driver."""
    import pickle

    from worker import sweep as sw

    old = sw._ProgressCallback.__new__(sw._ProgressCallback)
    old.__dict__.update(progress=sw.Progress(total=6), metric="valid_accuracy", mode="max",
                        key="0cb37093")
    restored = pickle.loads(pickle.dumps(old))
    seen = []
    live = sw._progress_callback(sw.Progress(total=6), "valid_accuracy", "max", seen.append,
                                 "sw-resumed")
    try:
        restored.on_trial_result(0, [], None, {"rule": "bp", "valid_accuracy": 0.5})
        assert restored.progress is live.progress
        assert live.progress.best == {"bp": 0.5} and live.progress.epochs_reported == 1
        assert seen and seen[-1] is live.progress
    finally:
        sw._LISTENERS.pop("sw-resumed", None)
